"""Batch scoring on the local multi-node cluster (tests/cluster_fixture.py): inputs and output on S3
(moto), the model by models:/ from the MLflow server, a driver on the head's machine that scores
nothing itself. Faults: a worker node killed mid-job, and the driver killed then resumed; either
way every input ends up in exactly one row of the committed output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

N_IMAGES = 800
MODEL = "flowers-score-test"


@pytest.fixture(scope="module")
def model_uri(cluster_env, trained_run):
    """The smoke model registered on the cluster's MLflow server (artifacts on S3), alias champion."""
    import mlflow

    from flowers.registry import uris as R
    from flowers.registry import tracking as T

    old = mlflow.get_tracking_uri()
    try:
        target = T.configure(R.resolve_target(cluster_env["MLFLOW_TRACKING_URI"]))
        tr = T.StudyTracker("score-cluster-models", target)
        run = tr.child("model", "trial")
        tr.log_model_dir(run, trained_run.run_dir, "model", MODEL, alias=R.CHAMPION)
        tr.finish(run)
    finally:
        mlflow.set_tracking_uri(old)
        os.environ["MLFLOW_TRACKING_URI"] = cluster_env["MLFLOW_TRACKING_URI"]
    return f"models:/{MODEL}@champion"


@pytest.fixture(scope="module")
def s3(cluster_env):
    import boto3

    return boto3.client("s3", endpoint_url=cluster_env["AWS_ENDPOINT_URL_S3"])


@pytest.fixture(scope="module")
def inputs(s3) -> list[str]:
    """N small JPEGs under s3://flowers/score/in/ (every 100th one corrupt)."""
    import io

    from PIL import Image

    def put(i: int) -> str:
        buf = io.BytesIO()
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG")
        body = buf.getvalue()[:200] if i % 100 == 7 else buf.getvalue()
        key = f"score/in/{i // 100}/img{i:04d}.jpg"
        s3.put_object(Bucket="flowers", Key=key, Body=body)
        return f"s3://flowers/{key}"

    with ThreadPoolExecutor(8) as pool:
        return sorted(pool.map(put, range(N_IMAGES)))


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.score", *args], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _parts(s3, prefix: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="flowers", Prefix=prefix + "/"):
        keys += [o["Key"].rsplit("/", 1)[1] for o in page.get("Contents", [])]
    return sorted(k for k in keys if k.startswith("part-"))


def _wait_parts(s3, prefix: str, n: int, proc: subprocess.Popen, timeout: float = 600) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {n} parts were written:\n{err[-4000:]}")
        parts = _parts(s3, prefix)
        if len(parts) >= n:
            return parts
        time.sleep(0.3)
    raise AssertionError(f"fewer than {n} parts after {timeout}s")


def _check_once(out: str, inputs: list[str]) -> dict:
    """Committed, and each input path in exactly one row (via the manifest and via pyarrow alone)."""
    import pyarrow.parquet as pq

    from flowers import storage
    from flowers.scoring.schema import MANIFEST
    from flowers.scoring.sinks import read_dataset

    manifest = json.loads(storage.read_bytes(f"{out}/{MANIFEST}"))
    fs, path = storage.filesystem(out)
    for table in (read_dataset(out), pq.read_table(path, filesystem=fs)):
        counts = Counter(table.column("path").to_pylist())
        assert sorted(counts) == inputs, (len(counts), len(inputs))
        assert set(counts.values()) == {1}, counts.most_common(3)
    assert manifest["rows"] == len(inputs) and manifest["errors"] == N_IMAGES // 100
    assert manifest["model_uri"] == f"models:/{MODEL}/1"  # pinned to the version the alias named
    return manifest


def test_worker_node_killed_mid_job(test_cluster, cluster_env, model_uri, inputs, s3):
    """A worker node dies while parts are being written and comes back (a replacement node): the job
    finishes by itself (Ray retries the lost tasks, the actor restarts), or `--resume` finishes it."""
    out = "s3://flowers/score/out-worker-kill"
    args = ["s3://flowers/score/in", "--model", model_uri, "--out", out, "--batch-size", "8", "--part-rows", "16",
            "--no-progress"]
    proc = _start(args, cluster_env)
    before = _wait_parts(s3, "score/out-worker-kill", 2, proc)
    assert proc.poll() is None and "_manifest.json" not in before
    t_kill = time.monotonic()
    test_cluster.kill_worker("worker_a")
    time.sleep(5)
    test_cluster.restart_worker("worker_a")
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    print(f"worker kill to job end: {time.monotonic() - t_kill:.1f}s, rc {proc.returncode}, "
          f"{len(before)} parts before the kill")
    if proc.returncode != 0:  # the fault was not absorbed: resume keeps the finished parts
        print("job failed after the worker kill; resuming:", stderr.strip().splitlines()[-1:])
        r = _start([*args, "--resume"], cluster_env)
        stdout, stderr = r.communicate(timeout=600)
        assert r.returncode == 0, stderr[-4000:]
    assert "scored" in stdout, stderr[-3000:]
    print(stdout.strip().splitlines()[-1], "| duplicates repaired:", "repeats" in stderr)
    manifest = _check_once(out, inputs)
    assert set(before) <= {p["name"] for p in manifest["parts"]}  # parts written before the kill stay


def test_driver_killed_then_resumed(test_cluster, cluster_env, model_uri, inputs, s3):
    """SIGKILL the driver mid-job: complete parts stay, `--resume` scores only the rest (on a cluster
    without GPUs `--gpus-per-worker 1` falls back to CPU with one line), commits, and logs a run."""
    from mlflow import MlflowClient

    out = "s3://flowers/score/out-driver-kill"
    args = ["s3://flowers/score/in", "--model", model_uri, "--out", out, "--batch-size", "8", "--part-rows", "16",
            "--no-progress"]
    proc = _start(args, cluster_env)
    _wait_parts(s3, "score/out-driver-kill", 3, proc)
    proc.kill()
    proc.communicate()
    # the job's tasks die with their driver; wait until no part is added any more
    parts, stable = _parts(s3, "score/out-driver-kill"), 0
    while stable < 6:
        time.sleep(0.5)
        now = _parts(s3, "score/out-driver-kill")
        stable, parts = (stable + 1, parts) if now == parts else (0, now)
    rows_before = 0
    import pyarrow.parquet as pq

    from flowers import storage

    fs, path = storage.filesystem(out)
    for p in parts:
        rows_before += pq.read_metadata(fs.open_input_file(f"{path}/{p}")).num_rows
    assert 0 < rows_before < N_IMAGES and not storage.exists(f"{out}/_manifest.json")

    r = _start([*args, "--resume", "--gpus-per-worker", "1"], cluster_env)
    stdout, stderr = r.communicate(timeout=600)
    assert r.returncode == 0, stderr[-4000:]
    print(f"resume after the driver kill ({len(parts)} parts, {rows_before} rows kept):",
          stdout.strip().splitlines()[-1])
    notes = [ln for ln in stderr.splitlines() if "no GPUs" in ln]
    assert len(notes) == 1 and "scoring on CPU" in notes[0], stderr[-3000:]
    manifest = _check_once(out, inputs)
    assert set(parts) <= {p["name"] for p in manifest["parts"]}
    summary = json.loads(storage.read_bytes(f"{out}/_summary.json"))
    # inputs with a good row before the kill are not scored again (error rows are retried)
    assert summary["skipped"] + summary["scored"] == N_IMAGES
    assert summary["skipped"] >= rows_before - N_IMAGES // 100 and summary["scored"] < N_IMAGES
    assert summary["rows"] == N_IMAGES and 0 <= summary["uncertain_share"] <= 1

    mc = MlflowClient(cluster_env["MLFLOW_TRACKING_URI"])
    exp = mc.get_experiment_by_name("flowers-scoring")
    runs = mc.search_runs([exp.experiment_id], f"tags.`flowers.output` = '{out}'")
    assert len(runs) == 1 and runs[0].data.metrics["rows"] == N_IMAGES
    assert runs[0].data.params["model_uri"] == f"models:/{MODEL}/1" and runs[0].data.params["device"] == "cpu"
