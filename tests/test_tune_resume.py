"""Resume when Tune's own saved state is unreadable (a driver killed while writing it): only the
trials MLflow does not record as finished run again; finished ones are never retrained."""
from __future__ import annotations

from types import SimpleNamespace

import jobs.tune as JT
from flowers import config as C
from flowers.registry import TrackingTarget
from flowers.study import TrialSpec


def test_unreadable_tune_state_reruns_only_unfinished_trials(monkeypatch, tmp_path):
    specs = [TrialSpec(k, [k], C.Config()) for k in ("l1", "l2", "l3")]
    study = C.StudyConfig(name="s", home=str(tmp_path))

    class BrokenRestore:
        def fit(self):
            raise ValueError("Expecting value: line 1 column 1 (char 0)")

    ran: dict[str, list[str]] = {}

    def fake_new_tuner(study_, todo, name, *a):
        ran["keys"], ran["name"] = [s.key for s in todo], name
        return SimpleNamespace(fit=lambda: [SimpleNamespace(error=None, config={"trial": {"key": s.key}}) for s in todo])

    monkeypatch.setattr(JT.tune.Tuner, "can_restore", staticmethod(lambda *a, **k: True))
    monkeypatch.setattr(JT.tune.Tuner, "restore", staticmethod(lambda *a, **k: BrokenRestore()))
    monkeypatch.setattr(JT, "trainable", lambda resources: None)
    monkeypatch.setattr(JT, "_new_tuner", fake_new_tuner)
    failed = JT.run_tune(study, specs, TrackingTarget("http://mlflow:5000"), resume=True, finished={"l1", "l3"})
    assert failed == [] and ran["keys"] == ["l2"] and ran["name"].startswith("s-resumed-")
