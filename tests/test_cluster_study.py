"""The study on the local multi-node cluster (tests/cluster_fixture.py): head with 0 CPUs, two
worker nodes that cannot see the driver's folders, Tune storage and the dataset on S3 (moto),
MLflow on PostgreSQL with artifacts on S3. Faults: a worker node killed mid-trial, the MLflow
server down for 10 s, the driver killed and the study resumed."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

EPOCHS = 3


@pytest.fixture(scope="module")
def dataset_uri(cluster_env, tmp_path_factory):
    """A synthetic dataset big enough for epochs of a few seconds, published to the cluster's S3."""
    from flowers.data import write_synthetic
    from flowers.data.remote import publish

    root = write_synthetic(tmp_path_factory.mktemp("cdata") / "flowers", num_classes=5, per_class=30, size=96).root
    uri = "s3://flowers/datasets/synth"
    publish(root, uri)
    return uri


def _study_yaml(tmp: Path, name: str, data_uri: str, stages: list[str]) -> Path:
    (tmp / "ablation.yaml").write_text(yaml.safe_dump({
        "config": str(REPO / "configs/level1.yaml"),
        "axes": {"augment": {"light": {"data.augment": "light"}, "strong": {"data.augment": "strong"}}}}))
    data = {"name": name, "ablation": "ablation.yaml", "profile": str(REPO / "configs/profiles/smoke.yaml"),
            "levels": {lv: str(REPO / f"configs/level{lv[1]}.yaml") for lv in ("l1", "l2", "l3")},
            "distill_config": str(REPO / "configs/level5.yaml"),
            "overrides": [f"data.root={data_uri}", "data.split=official", f"train.epochs={EPOCHS}"],
            "stages": stages, "resources": {"cpus_per_trial": 0.5, "max_concurrent": 4},
            "max_failures": 2, "home": str(tmp / "home"), "storage_path": f"s3://flowers/tune/{name}"}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _flowers(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowers.cli.main", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def _submit(path: Path, env: dict[str, str], *extra: str) -> str:
    r = _flowers("submit", "study", "--address", env["RAY_API_SERVER_ADDRESS"], "--python", sys.executable,
                 "--", "--config", str(path),
                 "--tracking-uri", env["MLFLOW_TRACKING_URI"], *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split()[1].rstrip(":")  # "submitted <id>: ..."


def _trial_runs(client, study: str) -> list:
    exp = client.get_experiment_by_name(study)
    return [] if exp is None else client.search_runs([exp.experiment_id], "tags.`flowers.role` = 'trial'")


def _wait_for(what: str, cond, job: str, address: str, timeout: float = 600, poll: float = 1.0):
    """Poll `cond` until it returns something; fail at once if the job ended meanwhile."""
    from jobs import client as J

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = J.status(job, address)
        if st in ("SUCCEEDED", "FAILED", "STOPPED"):
            raise AssertionError(f"job {job} {st} while waiting for {what}:\n{J.logs(job, address)[-4000:]}")
        try:
            hit = cond()
        except Exception:  # the MLflow server may be restarting
            hit = None
        if hit:
            return hit
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def _steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val/acc"))


def test_submitted_study_survives_a_worker_kill_and_an_mlflow_outage(test_cluster, cluster_env, dataset_uri,
                                                                     tmp_path):
    """Submitted with `flowers submit study`; one worker node dies mid-trial and the MLflow server is
    down for 10 s: the study completes, the interrupted trial resumes from its checkpoint on the
    other node (at most one epoch redone), every metric arrives, one run per trial, none RUNNING."""
    from mlflow import MlflowClient

    from jobs import client as J

    env = cluster_env
    name = "cl-faults"
    sid = _submit(_study_yaml(tmp_path, name, dataset_uri, ["tune", "ensemble", "distill"]), env)
    mc = MlflowClient(env["MLFLOW_TRACKING_URI"])
    workers = {test_cluster.node_id(w): w for w in test_cluster.workers}

    def running_trial_after_epoch_1():
        for r in _trial_runs(mc, name):
            if r.info.status == "RUNNING" and r.data.tags.get("ray.node_id") in workers and \
                    1 <= len(_steps(mc, r.info.run_id)) < EPOCHS:
                return r
        return None

    victim = _wait_for("a trial past its first epoch", running_trial_after_epoch_1, sid, env["RAY_API_SERVER_ADDRESS"])
    t_kill = time.monotonic()
    dead = workers[victim.data.tags["ray.node_id"]]
    test_cluster.kill_worker(dead)
    time.sleep(3)
    test_cluster.stop_mlflow()
    time.sleep(10)
    test_cluster.start_mlflow()
    status = J.wait(sid, env["RAY_API_SERVER_ADDRESS"], timeout_s=900)
    logs = J.logs(sid, env["RAY_API_SERVER_ADDRESS"])
    assert status == "SUCCEEDED", logs[-4000:]
    print(f"node kill to study end: {time.monotonic() - t_kill:.1f}s")

    runs = _trial_runs(mc, name)
    keys = [r.data.tags["flowers.key"] for r in runs]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 4, keys  # l1, l2, l3, abl-strong: one run each
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:  # every epoch's metrics arrived, outage or not; a redone epoch at most once
        steps = _steps(mc, r.info.run_id)
        assert set(steps) == set(range(1, EPOCHS + 1)), (r.data.tags["flowers.key"], steps)
        assert len(steps) - EPOCHS <= 1, (r.data.tags["flowers.key"], steps)
    moved = mc.get_run(victim.info.run_id).data.tags["ray.node_ids"].split(",")
    assert len(moved) == 2 and moved[0] != moved[1] and moved[1] in workers, moved
    assert workers[moved[1]] != dead
    # both worker nodes ran trials, and the head (0 CPUs) none
    assert {r.data.tags["ray.node_ids"].split(",")[0] for r in runs} == set(workers)
    stages = mc.search_runs([mc.get_experiment_by_name(name).experiment_id], "tags.`flowers.role` = 'stage'")
    assert sorted(r.info.status for r in stages) == ["FINISHED", "FINISHED"]
    test_cluster.restart_worker(dead)

    # all five registered models load by models:/...@champion in a fresh process on a worker node
    uris = [f"models:/flowers-{n}@champion" for n in ("l1", "l2", "l3", "ensemble", "student")]
    code = r"""
import json, os, subprocess, sys, ray
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
@ray.remote(num_cpus=0, resources={sys.argv[1]: 0.01})
def load(uris, tracking):
    probe = "import json, sys; from flowers.inference.predict import load_model; " \
            "print(json.dumps([[load_model(u).name, len(load_model(u).class_names)] for u in sys.argv[1:]]))"
    p = subprocess.run([sys.executable, "-c", probe, *uris], capture_output=True, text=True,
                       env={**os.environ, "MLFLOW_TRACKING_URI": tracking})
    return ray.get_runtime_context().get_node_id(), p.returncode, p.stdout, p.stderr[-3000:]
print(json.dumps(ray.get(load.remote(json.loads(sys.argv[2]), sys.argv[3]))))
"""
    out = test_cluster.run_python(code, "worker_b", json.dumps(uris), env["MLFLOW_TRACKING_URI"], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    node, rc, stdout, stderr = json.loads(out.stdout.strip().splitlines()[-1])
    assert node == test_cluster.node_id("worker_b") and rc == 0, stderr
    loaded = json.loads(stdout.strip().splitlines()[-1])
    assert [n for n, _ in loaded] == ["flowers-l1", "flowers-l2", "flowers-l3", "flowers-ensemble", "flowers-student"]
    assert {k for _, k in loaded} == {5}


def test_study_resumes_after_its_driver_is_killed(test_cluster, cluster_env, dataset_uri, tmp_path):
    """Kill the study's driver once a trial has finished; `flowers study --resume` (a new driver)
    completes without training the finished trials again."""
    from mlflow import MlflowClient

    from jobs import client as J

    env = cluster_env
    name = "cl-resume"
    path = _study_yaml(tmp_path, name, dataset_uri, ["tune"])
    sid = _submit(path, env)
    mc = MlflowClient(env["MLFLOW_TRACKING_URI"])

    def some_finished():
        runs = _trial_runs(mc, name)
        done = [r for r in runs if r.info.status == "FINISHED"]
        return done if done and len(done) < 4 else None

    done = _wait_for("a finished trial while others run", some_finished, sid, env["RAY_API_SERVER_ADDRESS"])
    J.stop(sid, env["RAY_API_SERVER_ADDRESS"])
    assert J.wait(sid, env["RAY_API_SERVER_ADDRESS"], timeout_s=120) == "STOPPED"
    before = {r.info.run_id: _steps(mc, r.info.run_id) for r in done}
    r = _flowers("study", "--config", str(path), "--resume", "--tracking-uri", env["MLFLOW_TRACKING_URI"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for run_id, steps in before.items():
        assert _steps(mc, run_id) == steps, ("a finished trial was trained again", (r.stdout + r.stderr)[-3000:])
    runs = _trial_runs(mc, name)
    keys = [x.data.tags["flowers.key"] for x in runs]
    assert len(keys) == 4 == len(set(keys)) and {x.info.status for x in runs} == {"FINISHED"}
