"""The study's MLflow callback queues writes while the tracking server is away and delivers them,
in order, once it is back; what cannot be delivered is reported, never silently dropped."""
from __future__ import annotations

from types import SimpleNamespace

import jobs.trial as trial_mod
from flowers.registry.uris import TrackingTarget
from jobs.trial import MlflowStudyCallback


class FlakyTracker:
    """Stands in for StudyTracker: every call fails while `down`."""

    def __init__(self) -> None:
        self.down = False
        self.metrics: list[tuple[str, dict, int | None]] = []
        self.finished: list[str] = []
        self.client = SimpleNamespace(get_run=lambda rid: SimpleNamespace(data=SimpleNamespace(tags={})))

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("Connection refused\nlong MLflow traceback")

    def child(self, key, role="trial", tags=None):
        self._check()
        return f"run-{key}"

    def log_params(self, run_id, params):
        self._check()

    def set_tags(self, run_id, tags):
        self._check()

    def log_metrics(self, run_id, metrics, step=None):
        self._check()
        self.metrics.append((run_id, metrics, step))

    def finish(self, run_id, status="FINISHED"):
        self._check()
        self.finished.append(run_id)


def _trial(key: str):
    cfg = {"trial": {"key": key, "roles": ["l1"], "cfg": {"level": "level1"}, "axes": {}}}
    return SimpleNamespace(config=cfg, trial_id=key, checkpoint=None, last_result={})


def test_writes_during_an_outage_are_delivered_in_order_afterwards(monkeypatch):
    monkeypatch.setattr(trial_mod.C, "to_flat_dict", lambda cfg: {})
    monkeypatch.setattr(trial_mod.C, "build", lambda cls, d: d)
    cb = MlflowStudyCallback("s", TrackingTarget("http://mlflow:5000"))
    cb._tracker = tracker = FlakyTracker()
    t = _trial("l1")
    cb.on_trial_result(0, [], t, {"epoch": 1, "val_acc": 0.1, "node_id": "n1"})
    tracker.down = True
    cb.on_trial_result(0, [], t, {"epoch": 2, "val_acc": 0.2, "node_id": "n1"})
    cb.on_trial_result(0, [], t, {"epoch": 3, "val_acc": 0.3, "node_id": "n1"})
    assert [m[2] for m in tracker.metrics] == [1]
    tracker.down = False
    cb.on_trial_complete(0, [], t)
    assert [m[2] for m in tracker.metrics] == [1, 2, 3]
    assert [m[1]["val/acc"] for m in tracker.metrics] == [0.1, 0.2, 0.3]
    assert tracker.finished == ["run-l1"]
    monkeypatch.setattr(trial_mod, "PENDING_WAIT_S", 0)
    cb.on_experiment_end([])
    assert MlflowStudyCallback.undelivered["s"] == 0


def test_what_stays_undelivered_is_counted_for_the_study(monkeypatch):
    monkeypatch.setattr(trial_mod.C, "to_flat_dict", lambda cfg: {})
    monkeypatch.setattr(trial_mod.C, "build", lambda cls, d: d)
    monkeypatch.setattr(trial_mod, "PENDING_WAIT_S", 0)
    cb = MlflowStudyCallback("t", TrackingTarget("http://mlflow:5000"))
    cb._tracker = tracker = FlakyTracker()
    tracker.down = True
    cb.on_trial_result(0, [], _trial("l2"), {"epoch": 1, "val_acc": 0.5})
    cb.on_trial_complete(0, [], _trial("l2"))
    cb.on_experiment_end([])
    assert MlflowStudyCallback.undelivered["t"] == 2 and tracker.metrics == []
