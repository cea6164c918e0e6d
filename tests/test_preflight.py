"""A study refuses, before anything is written, what would fail later on a cluster: driver-local
storage, tracking or data when trials may run elsewhere; unusable storage, tracking or data."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port
from flowers import config as C
from flowers.data import DataError
from flowers.data.remote import publish
from flowers.registry.uris import TrackingTarget, embedded_target
from flowers.storage import StorageError
from flowers.study.plan import TrialSpec
from jobs.preflight import check_study, check_tracking

SERVER = TrackingTarget("http://mlflow.example:5000")


def _specs(root: str | None) -> list[TrialSpec]:
    cfg = C.replace(C.Config(), {"data.root": root}) if root else C.Config()
    return [TrialSpec("l1", ["l1"], cfg)]


def test_multi_node_refuses_driver_local_tune_storage(tmp_path):
    study = C.StudyConfig(home=str(tmp_path))
    with pytest.raises(C.ConfigError, match=r"study.storage_path=s3://"):
        check_study(study, _specs("s3://b/data"), SERVER, multi_node=True)


def test_multi_node_refuses_an_embedded_mlflow_store(tmp_path):
    study = C.StudyConfig(home=str(tmp_path), storage_path="s3://b/tune")
    with pytest.raises(C.ConfigError, match="--tracking-uri http://"):
        check_study(study, _specs("s3://b/data"), embedded_target(tmp_path), multi_node=True)


def test_multi_node_refuses_a_driver_local_dataset(tmp_path):
    study = C.StudyConfig(home=str(tmp_path), storage_path="s3://b/tune")
    with pytest.raises(C.ConfigError, match="flowers data publish .* --set data.root=s3://"):
        check_study(study, _specs(str(tmp_path / "flowers")), SERVER, multi_node=True)


def test_shared_storage_opts_out_of_the_local_path_checks(tmp_path, monkeypatch):
    study = C.StudyConfig(home=str(tmp_path), shared_storage=True)
    monkeypatch.setattr("jobs.preflight.check_tracking", lambda target: None)
    check_study(study, _specs(str(tmp_path)), SERVER, multi_node=True)  # nothing raised


def test_an_unreachable_tracking_server_is_one_line_and_fast():
    t0 = time.monotonic()
    with pytest.raises(C.ConfigError, match="unreachable") as e:
        check_tracking(TrackingTarget(f"http://127.0.0.1:{free_port()}"))
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 10


def test_missing_bucket_and_bad_dataset_fail_before_any_trial(s3_server, synth_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWERS_CACHE", str(tmp_path / "cache"))
    local = embedded_target(tmp_path)
    with pytest.raises(StorageError, match="not usable"):
        check_study(C.StudyConfig(home=str(tmp_path), storage_path="s3://no-such-bucket/tune"),
                    _specs(None), local, multi_node=False)
    # a published dataset whose file changed after publishing: caught by the driver's check
    import boto3

    publish(synth_root, "s3://flowers/pre/ds")
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL_S3"])
    key = next(o["Key"] for o in s3.list_objects_v2(Bucket="flowers", Prefix="pre/ds/jpg/")["Contents"])
    s3.put_object(Bucket="flowers", Key=key, Body=b"not the published bytes")
    with pytest.raises(DataError, match="does not match|bytes, the manifest says"):
        check_study(C.StudyConfig(home=str(tmp_path), storage_path="s3://flowers/pre/tune"),
                    _specs("s3://flowers/pre/ds"), local, multi_node=False)


def test_study_with_a_missing_bucket_exits_2_and_writes_nothing(s3_server, tmp_path):
    """End to end through the CLI: one line on stderr, exit 2, no MLflow store, no Tune folder."""
    cmd = [sys.executable, "-m", "flowers.cli.main", "study", "--config", str(REPO / "configs/study.yaml"),
           "--profile", "smoke", "--set", "study.storage_path=s3://no-such-bucket/tune",
           "--set", f"study.home={tmp_path / 'home'}", "--set", f"data.root={tmp_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "no-such-bucket" in err[0], r.stderr[-2000:]
    assert not (tmp_path / "home").exists()
