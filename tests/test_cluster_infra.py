"""The local test cluster itself (jobs/localcluster/): nodes, masked folders, MLflow on PostgreSQL + S3, faults.

Every Ray check runs in a fresh driver process (`run_python`): the pytest process may hold a
local Ray of its own (`ray_session`), and a real user's driver is a separate process too.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def driver(cluster, code: str, *args: str, timeout: float = 300) -> object:
    """Run `code` as a driver of the cluster; it prints one JSON line last, returned parsed."""
    out = cluster.run_python(code, *args, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


NODES = """
import json, ray
ray.init(log_to_driver=False)
print(json.dumps([{"id": n["NodeID"], "alive": n["Alive"], "label": n["Labels"].get("flowers.node"),
                   "cpus": n["Resources"].get("CPU", 0), "own": {k: v for k, v in n["Resources"].items()
                   if k.startswith("worker_")}} for n in ray.nodes()]))
"""


def test_head_without_cpus_and_two_workers(test_cluster):
    nodes = [n for n in driver(test_cluster, NODES) if n["alive"]]
    by_label = {n["label"]: n for n in nodes}
    assert sorted(by_label) == ["head", "worker_a", "worker_b"], nodes
    assert by_label["head"]["cpus"] == 0
    for name in ("worker_a", "worker_b"):
        assert by_label[name]["cpus"] == 1
        assert by_label[name]["own"] == {name: 1.0}  # the custom resource that pins work to this node
        assert by_label[name]["id"] == test_cluster.node_id(name)


PROBE = """
import json, os, sys, ray
ray.init(log_to_driver=False)
masks, probe = json.loads(sys.argv[1]), sys.argv[2]

@ray.remote(num_cpus=0)
def look():
    try:
        open(os.path.join(masks[0], "written-by-worker"), "w").close()
        write = "ok"
    except OSError as e:
        write = e.strerror
    return {"node": ray.get_runtime_context().get_node_id(), "listing": {m: os.listdir(m) for m in masks},
            "probe_seen": os.path.exists(probe), "write": write, "env": {k: os.environ.get(k) for k in
            ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "FLOWERS_DATA", "MLFLOW_TRACKING_URI")}}

print(json.dumps({w: ray.get(look.options(resources={w: 0.01}).remote()) for w in ("worker_a", "worker_b")}))
"""


def test_workers_cannot_see_or_write_the_drivers_folders(test_cluster):
    from flowers.runtime import allocator_env

    masks = test_cluster.state["masks"]
    assert str(REPO / ".flowers") in masks and str(REPO / "runs") in masks
    probe = REPO / ".flowers" / f"cluster-probe-{uuid.uuid4().hex[:8]}"
    probe.write_text("driver only")
    try:
        seen = driver(test_cluster, PROBE, json.dumps(masks), str(probe))
    finally:
        probe.unlink()
    for name, got in seen.items():
        assert got["node"] == test_cluster.node_id(name)  # the pinned task ran on that node
        assert not got["probe_seen"], f"{name} sees the driver's {probe}"
        assert all(listing == [] for listing in got["listing"].values()), got["listing"]
        assert got["write"] == "Read-only file system"
        # every node carries the project allocator setting; no driver-only settings leak onto nodes
        for k, v in allocator_env().items():
            if k.startswith("MALLOC_"):
                assert got["env"][k] == v
        assert got["env"]["FLOWERS_DATA"] is None and got["env"]["MLFLOW_TRACKING_URI"] is None
    assert not (REPO / ".flowers" / "written-by-worker").exists()


LOG_RUN = """
import json, os, ray
ray.init(log_to_driver=False, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}})

@ray.remote(num_cpus=0, resources={"worker_b": 0.01})
def log_run():
    import mlflow
    mlflow.set_experiment("cluster-infra")
    with mlflow.start_run() as run:
        mlflow.log_metric("acc", 0.5)
        mlflow.log_text("from a worker", "proof/hello.txt")
    return {"run_id": run.info.run_id, "artifact_uri": run.info.artifact_uri}

print(json.dumps(ray.get(log_run.remote())))
"""


def test_mlflow_run_from_a_worker_lands_in_postgres_and_s3(test_cluster):
    import boto3
    import psycopg2

    from jobs.localcluster import BUCKET

    got = driver(test_cluster, LOG_RUN)
    assert got["artifact_uri"].startswith("mlflow-artifacts:")  # proxied by the server, not a client-side path
    env = test_cluster.env()
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name=env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="mlflow/").get("Contents", [])]
    mine = [k for k in keys if got["run_id"] in k and k.endswith("proof/hello.txt")]
    assert mine, keys
    assert s3.get_object(Bucket=BUCKET, Key=mine[0])["Body"].read() == b"from a worker"
    with psycopg2.connect(test_cluster.postgres_uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (got["run_id"],))
        assert cur.fetchone() == ("FINISHED",)
        cur.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = 'acc'", (got["run_id"],))
        assert cur.fetchone() == (0.5,)


def test_env_command_and_second_up_refused(test_cluster, capsys):
    from flowers.cli.main import main
    from jobs import localcluster as T

    assert main(["cluster", "env", "--state", str(test_cluster.state_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    exported = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    assert exported["RAY_AUTH_MODE"] == "token"
    assert exported["RAY_ADDRESS"] == test_cluster.env()["RAY_ADDRESS"]
    assert {"RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"} <= set(exported)
    with pytest.raises(T.ClusterError, match="is running"):
        T.up(test_cluster.state_dir, workdir=REPO)


def test_token_auth_is_on_for_clients_and_the_jobs_api(test_cluster):
    """Without RAY_AUTH_MODE=token and the token, the GCS refuses a client and the Jobs API answers 401."""
    import os
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    api = test_cluster.env()["RAY_API_SERVER_ADDRESS"] + "/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(api, timeout=10)
    assert refused.value.code == 401
    token = test_cluster.env()["RAY_AUTH_TOKEN"]
    req = urllib.request.Request(api, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as ok:
        assert ok.status == 200
    # a client without the token: Ray retries for about 20 s, logging why; the first refusal is enough
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(test_cluster.state_dir / "no-home"), RAY_ADDRESS=test_cluster.env()["RAY_ADDRESS"])
    p = subprocess.Popen([sys.executable, "-c", "import ray; ray.init(log_to_driver=False)"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, seen = time.monotonic() + 90, ""
    try:
        while time.monotonic() < deadline and "InvalidAuthToken" not in seen:
            line = p.stderr.readline()
            if not line:
                break
            seen += line
    finally:
        p.kill()
        p.wait(10)
    assert "InvalidAuthToken" in seen, seen[-2000:]


WAIT_DEAD = """
import json, sys, time, ray
ray.init(log_to_driver=False)
node, deadline = sys.argv[1], time.monotonic() + 120
while time.monotonic() < deadline:
    alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
    if not alive.get(node, True):
        break
    time.sleep(0.5)
print(json.dumps(alive))
"""


def test_kill_worker_marks_the_node_dead_and_restart_rejoins(test_cluster):
    """Runs last among these: the worker comes back (new node id) for the tests after it."""
    from jobs.localcluster import session_members

    old_id = test_cluster.node_id("worker_b")
    pid = test_cluster.state["workers"]["worker_b"]["pid"]
    assert test_cluster.kill_worker("worker_b") == old_id
    assert session_members(pid) == []  # raylet, workers and agents all gone
    alive = driver(test_cluster, WAIT_DEAD, old_id)
    assert alive[old_id] is False
    assert alive[test_cluster.node_id("worker_a")] is True
    new_id = test_cluster.restart_worker("worker_b")
    assert new_id != old_id
    nodes = {n["label"]: n for n in driver(test_cluster, NODES) if n["alive"]}
    assert nodes["worker_b"]["id"] == new_id and nodes["worker_b"]["cpus"] == 1
