"""MLflow tracking: embedded default, parent/child runs found again, model logging + registry + fresh-process load."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from flowers.registry import governance as G
from flowers.registry import uris as R
from flowers.registry import tracking as T


def test_resolve_target(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = R.resolve_target(None, tmp_path / "h")
    assert t.tracking_uri == f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}" and t.embedded
    assert t.artifact_root == (tmp_path / "h" / "mlartifacts").as_uri()
    assert not (tmp_path / "h").exists()  # resolving creates nothing
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert R.resolve_target(None, tmp_path).tracking_uri == "http://127.0.0.1:9"
    assert R.resolve_target("http://x:1").artifact_root is None
    assert T.clean_metrics({"a": 1, "b": float("nan"), "c": [1], "d": True, "e": 2.5}) == {"a": 1.0, "e": 2.5}


def _log_and_load(uri: str, target: R.TrackingTarget, run, study: str) -> None:
    """Log a real checkpoint in a child run, register it, load it in a fresh process."""
    import mlflow

    old = mlflow.get_tracking_uri()
    try:
        T.configure(target)
        tr = T.StudyTracker(study, target)
        child = tr.child("l1", "trial")
        assert tr.child("l1", "trial") == child
        # a new tracker (a restarted driver) finds the same parent and child
        again = T.StudyTracker(study, target)
        assert again.parent_id == tr.parent_id and again.child("l1", "trial") == child
        tr.log_params(child, {"data.image_size": 64, "model.arch": "mobilenet_v3_small"})
        tr.log_params(child, {"data.image_size": 64})  # idempotent
        for e, h in enumerate(run.history, 1):
            tr.log_metrics(child, h, step=e)
        tr.log_metrics(child, {f"test_{k}": v for k, v in run.test_metrics.items()})
        T.log_run_dir(tr, child, run.run_dir)
        # the session's MLflow server is shared with other tests that may register flowers-l1 too
        before = len(tr.client.search_model_versions("name='flowers-l1'"))
        # a new version is a challenger; champion is set directly here (the gate is tests/test_governance.py)
        version = tr.log_model_dir(child, run.run_dir, "model", "flowers-l1", alias=R.CHAMPION, tags={"trial": "l1"})
        tr.finish(child)
        tr.finish_study()
        assert version == str(before + 1)
        client = tr.client
        assert str(client.get_model_version_by_alias("flowers-l1", "champion").version) == version
        assert client.get_registered_model("flowers-l1").tags[T.STUDY_TAG] == study
        # an MLflow Model with lineage, checksum-pinned manifest and a model card
        mv = client.get_model_version("flowers-l1", version)
        assert {"lineage.split_hash", "lineage.data_checksum", "lineage.config_hash", R.MANIFEST_TAG,
                "flowers.test_accuracy"} <= set(mv.tags)
        # logged as the run's MLflow logged model (the version's source), the model card as the version's description
        lm = R.logged_model(client, child)
        assert lm.source_run_id == child and mv.source in (f"models:/{lm.model_id}", lm.artifact_location)
        arts = {a.path for a in client.list_logged_model_artifacts(lm.model_id)}
        assert {"MLmodel", "model_card.md", "artifacts", "code", "requirements.txt"} <= arts
        assert mv.description.startswith("# Model card: flowers-l1")
        assert {"name": "flowers-l1", "version": version} in json.loads(lm.tags["mlflow.modelVersions"])
        assert "champion" in client.get_registered_model("flowers-l1").description
        # every epoch's value at its step (MLflow's client retries a request whose answer it did not get,
        # so a loaded server may hold a write twice: same step, same value)
        hist = client.get_metric_history(child, "val_acc")
        assert {(m.step, round(m.value, 6)) for m in hist} == {
            (e, round(h["val_acc"], 6)) for e, h in enumerate(run.history, 1)}
    finally:
        mlflow.set_tracking_uri(old)  # exports it as $MLFLOW_TRACKING_URI too
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    code = ("import json; from flowers.inference.predict import load_model; m = load_model('models:/flowers-l1@champion');"
            "print(json.dumps({'acc': m.meta['test_accuracy'], 'name': m.name, 'classes': len(m.class_names)}))")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"acc": pytest.approx(run.test_metrics["top1"]), "name": "flowers-l1", "classes": 5}


def test_log_register_and_load_embedded_sqlite(trained_run, tmp_path):
    target = R.embedded_target(tmp_path / "store")
    _log_and_load(target.tracking_uri, target, trained_run, "embedded")
    assert (tmp_path / "store" / "mlartifacts").is_dir()  # artifacts beside the db, not ./mlruns


def test_log_register_and_load_server(trained_run, mlflow_server):
    _log_and_load(mlflow_server, R.resolve_target(mlflow_server), trained_run, "server")


def test_models_uri_resolves_against_the_embedded_store_without_env(trained_run, tmp_path, monkeypatch):
    """After `make run`, `flowers serve/score/predict` in the same folder find models:/ in .flowers/."""
    import mlflow

    from flowers.inference.predict import load_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # records the original; restored afterwards
    old = mlflow.get_tracking_uri()
    try:
        target = T.configure(R.resolve_target(None))  # the embedded default under ./.flowers
        tr = T.StudyTracker("embedded-default", target)
        child = tr.child("l1", "trial")
        version = tr.log_model_dir(child, trained_run.run_dir, "model", "flowers-l1", tags={})
        tr.finish(child)
        assert G.decide("flowers-l1", version, target.tracking_uri, client=tr.client).decision == "first"
        # a decoy global URI proves the lookup does not depend on process-global MLflow state
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'decoy.db'}")
        os.environ.pop("MLFLOW_TRACKING_URI")  # set by T.configure
        m = load_model("models:/flowers-l1@champion")
        assert (m.name, m.version) == ("flowers-l1", version)
        assert m.meta["test_accuracy"] == pytest.approx(trained_run.test_metrics["top1"])
        assert not (tmp_path / "mlflow.db").exists()
    finally:
        mlflow.set_tracking_uri(old)
