"""Resume when Tune's own saved state is unreadable (a driver killed while writing it): only the
trials MLflow does not record as finished run again; finished ones are never retrained."""
from __future__ import annotations

from types import SimpleNamespace

import jobs.tune as JT
from flowers import config as C
from flowers.registry.uris import TrackingTarget
from flowers.study.plan import TrialSpec


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
    monkeypatch.setattr(JT, "trainable", lambda resources, finished=None: None)
    monkeypatch.setattr(JT, "_new_tuner", fake_new_tuner)
    failed = JT.run_tune(study, specs, TrackingTarget("http://mlflow:5000"), resume=True, finished={"l1", "l3"})
    assert failed == [] and ran["keys"] == ["l2"] and ran["name"].startswith("s-resumed-")


def test_a_finished_trial_listed_as_running_by_a_stale_state_is_not_trained_again(ray_session, synth_root, tmp_path):
    """Tune uploads its state to remote storage in the background, so a restored state can still list
    a trial that MLflow records as finished. Given the finished keys, that trial trains nothing and
    its MLflow run (metrics, status, artifacts) is left exactly as the earlier driver finished it;
    a trial not in the list trains."""
    from mlflow import MlflowClient
    from ray import tune

    from flowers.registry import tracking as T
    from flowers.study.plan import run_root
    from jobs.trial import SKIPPED, MlflowStudyCallback

    cfg = C.replace(C.Config(), {"data.root": str(synth_root), "data.split": "official", "data.image_size": 48,
                                 "data.batch_size": 16, "data.workers": 0, "model.arch": "mobilenet_v3_small",
                                 "model.pretrained": False, "train.epochs": 1, "train.progress": False})
    target = TrackingTarget(f"sqlite:///{tmp_path / 'mlflow.db'}")
    T.configure(target)
    earlier = T.StudyTracker("stale", target)
    done = earlier.child("l1", "trial")
    earlier.log_metrics(done, {"val_acc": 0.5}, step=1)
    earlier.finish(done)

    specs = [TrialSpec(k, [k], cfg) for k in ("l1", "l2")]
    grid = tune.Tuner(
        JT.trainable(C.ResourcesConfig(cpus_per_trial=1, max_concurrent=1), {"l1"}),
        param_space={"trial": tune.grid_search([s.to_param(run_root(str(tmp_path / "tune"), "stale")) for s in specs])},
        run_config=tune.RunConfig(name="stale", storage_path=str(tmp_path / "tune"), verbose=0,
                                  callbacks=[MlflowStudyCallback("stale", target, {"study": "stale"})])).fit()
    results = {r.config["trial"]["key"]: r for r in grid}
    assert results["l1"].error is None and results["l1"].metrics.get(SKIPPED) is True
    assert results["l2"].error is None and not results["l2"].metrics.get(SKIPPED)
    client = MlflowClient(target.tracking_uri)
    exp = client.get_experiment_by_name("stale")
    runs = {r.data.tags["flowers.key"]: r for r in client.search_runs([exp.experiment_id], "tags.`flowers.role` = 'trial'")}
    assert set(runs) == {"l1", "l2"} and runs["l1"].info.run_id == done
    assert [m.step for m in client.get_metric_history(done, "val_acc")] == [1]  # nothing logged again
    assert client.list_artifacts(done) == [] and runs["l1"].info.status == "FINISHED"
    assert runs["l2"].info.status == "FINISHED" and client.get_metric_history(runs["l2"].info.run_id, "val/acc")
