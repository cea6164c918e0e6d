"""Serve on the local multi-node cluster (tests/cluster_fixture.py): `flowers submit deploy` with a
variant of serve/config.cluster.yaml, HTTP queries through the head's proxy, Prometheus metrics on
the nodes' metrics ports, and a worker node killed under load (Serve replaces its replicas on the
other node; the error count and the time without capacity are printed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

APP = "flowers"
NAMES = {"ensemble": "flowers-clserve-ensemble", "student": "flowers-clserve-student"}
RECOVER_S = 60.0  # a route answers again within this after its node dies (node-death detection included)
REPLACED_S = 180.0  # the lost replicas run again on the surviving node within this

# Serve's own series (proxy: per route; replica: per deployment) and the project's, as Ray's metrics
# agent exports them (application metrics get Ray's `ray_` prefix; counters end in _total)
SERVE_SERIES = ("ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
                "ray_serve_deployment_request_counter_total", "ray_serve_deployment_processing_latency_ms_bucket")
FLOWERS_SERIES = ("ray_flowers_predictions_total", "ray_flowers_uncertain_predictions_total",
                  "ray_flowers_compare_requests_total", "ray_flowers_compare_disagreements_total",
                  "ray_flowers_batch_size_bucket")


def _rolled(ckpt_path: Path, out: Path) -> Path:
    """The same network with its classifier rows rolled by one: every top-1 moves to the next class,
    so this 'student' disagrees with the 'ensemble' on every image (the disagreement counter moves)."""
    import torch

    from flowers.models.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    state = ckpt["model"]
    n = len(ckpt["class_names"])
    head = [k for k, v in state.items() if k.endswith("weight") and v.ndim == 2 and v.shape[0] == n][-1]
    for key in (head, head[: -len("weight")] + "bias"):
        if key in state:
            state[key] = torch.roll(state[key], 1, dims=0)
    out.mkdir(parents=True)
    save_checkpoint(out / "best.pt", ckpt)
    return out


@pytest.fixture(scope="module")
def registered(cluster_env, trained_run, tmp_path_factory):
    """Two small models registered in the cluster's MLflow (@champion), by the study's code path."""
    import mlflow

    from flowers.registry import uris as R
    from flowers.registry import tracking as T

    student_dir = _rolled(trained_run.best_checkpoint, tmp_path_factory.mktemp("clserve") / "student")
    old = mlflow.get_tracking_uri()
    try:
        target = T.configure(R.resolve_target(cluster_env["MLFLOW_TRACKING_URI"]))
        tr = T.StudyTracker("cl-serve", target)
        for role, folder in (("ensemble", trained_run.run_dir), ("student", student_dir)):
            run = tr.child(role, "trial")
            tr.log_model_dir(run, folder, "model", NAMES[role], alias=R.CHAMPION)
            tr.finish(run)
        tr.finish_study()
    finally:
        mlflow.set_tracking_uri(old)
    return {role: f"models:/{name}@champion" for role, name in NAMES.items()}


@pytest.fixture(scope="module")
def serve_port(test_cluster) -> int:
    """One HTTP port for the module (Serve keeps the http_options it started with), free on every
    interface: the proxy binds 0.0.0.0."""
    from raylink.ports import pick_port

    return pick_port("0.0.0.0")


def _config(tmp: Path, port: int, working_dir: str | None = None, args: dict | None = None) -> Path:
    """serve/config.cluster.yaml sized for the test cluster: all nodes share one host (one proxy, on
    the head), 0.25 CPU a replica (two of each fit on one 1-CPU worker), and every prediction flagged
    uncertain (threshold 0) so that counter moves. `working_dir`: the code zip URI for `serve deploy`
    (None: none, the job ships its own working_dir)."""
    cfg = yaml.safe_load((REPO / "serve/config.cluster.yaml").read_text())
    cfg["proxy_location"] = "HeadOnly"
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["runtime_env"].pop("working_dir")
    if working_dir:
        app["runtime_env"]["working_dir"] = working_dir
    app["args"].update(uncertainty_threshold=0.0, **(args or {}))
    for d in app["deployments"]:
        d["ray_actor_options"]["num_cpus"] = 0.25
        d["autoscaling_config"].update(min_replicas=2, max_replicas=2)
    path = tmp / "serve.cluster-test.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _post(url: str, body: bytes, timeout: float = 30.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "image/jpeg"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read()[:300].decode(errors="replace")}
    except (urllib.error.URLError, OSError) as e:  # connection refused/reset, timeout
        return 0, {"error": f"{type(e).__name__}: {e}"}


def _wait_ready(base: str, image: bytes, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = [_post(f"{base}/v1/predict/{m}", image, 10)[0] for m in ("ensemble", "student")]
        if last == [200, 200]:
            return
        time.sleep(2)
    raise AssertionError(f"the app did not answer within {timeout:.0f}s (last statuses {last})")


_STATE = r"""
import json, os, ray
from ray.util.state import list_actors
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
out = {"replicas": [[a.class_name.split(":")[-1], a.node_id, a.state] for a in list_actors(limit=10000)
                    if a.class_name.startswith("ServeReplica:flowers:") and a.state == "ALIVE"],
       "nodes": {n["NodeID"]: [n["NodeManagerAddress"], n["MetricsExportPort"]] for n in ray.nodes() if n["Alive"]}}
print("STATE " + json.dumps(out))
"""


def _state(test_cluster) -> dict:
    out = test_cluster.run_python(_STATE, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    # Ray may print its own notices (a dead node's) on stdout too
    return json.loads(next(ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("STATE "))[6:])


def _scrape(nodes: dict) -> str:
    text = []
    for host, port in nodes.values():
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
                text.append(r.read().decode())
        except OSError:
            pass
    return "\n".join(text)


def test_submitted_app_serves_exports_metrics_and_survives_a_worker_kill(test_cluster, cluster_env, registered,
                                                                        synth_root, serve_port, tmp_path):
    """`flowers submit deploy` puts the app on the cluster; both routes answer over HTTP; Serve's and
    the project's metrics appear on the nodes' metrics ports; a worker node that hosts replicas is
    killed under load: each route answers again within RECOVER_S (errors: only requests caught by the
    loss), and the lost replicas run again on the surviving node."""
    from jobs import client as J

    env = cluster_env
    port = serve_port
    base = f"http://127.0.0.1:{port}"
    r = subprocess.run([sys.executable, "-m", "flowers.cli.main", "submit", "deploy", "--address",
                        env["RAY_API_SERVER_ADDRESS"], "--python", sys.executable, "--wait", "--",
                        "--config", str(_config(tmp_path, port)), "--ensemble", registered["ensemble"],
                        "--student", registered["student"], "--tracking-uri", env["MLFLOW_TRACKING_URI"]],
                       capture_output=True, text=True, cwd=REPO, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    image = sorted((synth_root / "jpg").glob("*.jpg"))[0].read_bytes()
    _wait_ready(base, image)

    # --- HTTP: both routes, and /v1/compare (a disagreement every time: the student is rolled)
    for _ in range(5):
        for m in ("ensemble", "student"):
            status, body = _post(f"{base}/v1/predict/{m}", image)
            assert status == 200 and body["uncertain"] is True, body
        status, body = _post(f"{base}/v1/compare", image)
        assert status == 200 and body["agree"] is False, body
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as resp:
        models = {m["route"]: m for m in json.loads(resp.read())["models"]}
    assert {m["name"] for m in models.values()} == set(NAMES.values())
    assert models["ensemble"]["device"] == "cpu"

    # --- metrics: Ray's agents export every few seconds; poll until all series are there
    state = _state(test_cluster)
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = _scrape(state["nodes"])
        missing = [s for s in SERVE_SERIES + FLOWERS_SERIES if s not in text]
        if not missing:
            break
        time.sleep(3)
    missing = [s for s in SERVE_SERIES + FLOWERS_SERIES if s not in text]
    assert not missing, f"series missing from the nodes' metrics ports: {missing}"
    for series in ("ray_serve_num_http_requests_total", "ray_flowers_compare_disagreements_total"):
        print("\n".join(ln for ln in text.splitlines() if ln.startswith(series))[:1500])

    # --- a worker node that hosts replicas dies under load
    by_node: dict[str, list[str]] = {}
    for dep, node, _ in state["replicas"]:
        by_node.setdefault(node, []).append(dep)
    names = {test_cluster.node_id(w): w for w in test_cluster.workers}
    print(f"replicas per node: { {names.get(n, n[:8]): deps for n, deps in by_node.items()} }")
    victim = next(names[n] for n, deps in by_node.items() if "Ensemble" in deps and n in names)
    survivor = next(w for w in test_cluster.workers if w != victim)

    log: list[tuple[str, float, int]] = []  # (route, time sent, status)
    stop = threading.Event()

    def client(route: str) -> None:
        while not stop.is_set():
            t = time.monotonic()
            status, _ = _post(f"{base}/v1/predict/{route}", image, timeout=30)
            log.append((route, t, status))
            if status != 200:
                time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(m,), daemon=True) for m in ("ensemble", "student")]
    for th in threads:
        th.start()
    time.sleep(5)
    t_kill = time.monotonic()
    test_cluster.kill_worker(victim)
    try:
        # answered again: every route has a success sent after the kill and nothing but successes for 10 s
        deadline = t_kill + RECOVER_S + 30
        while time.monotonic() < deadline:
            after = [(m, t, s) for m, t, s in log if t > t_kill]
            settled = all(any(s == 200 for mm, t, s in after if mm == m and t < time.monotonic() - 10) and
                          all(s == 200 for mm, t, s in after if mm == m and t >= time.monotonic() - 10)
                          for m in ("ensemble", "student"))
            if settled:
                break
            time.sleep(1)
        stop.set()
        for th in threads:
            th.join(60)
        report = {}
        for m in ("ensemble", "student"):
            calls = [(t, s) for mm, t, s in log if mm == m]
            errors = [(t, s) for t, s in calls if s != 200 and t >= t_kill - 30]
            ok_before = max((t for t, s in calls if s == 200 and t < t_kill), default=t_kill)
            ok_after = min((t for t, s in calls if s == 200 and t > t_kill
                            and all(s2 == 200 for t2, s2 in calls if t2 > t)), default=None)
            # without capacity: from the last answered request before the kill to the first request
            # sent after it from which on every request is answered
            gap = None if ok_after is None else ok_after - ok_before
            report[m] = {"requests": len(calls), "errors": len(errors),
                         "error_statuses": sorted({s for _, s in errors}),
                         "without_capacity_s": None if gap is None else round(gap, 2)}
        print(f"worker {victim} killed under load: {json.dumps(report)}")
        for m, rep in report.items():
            assert rep["without_capacity_s"] is not None, f"{m}: never answered steadily again: {report}"
            assert rep["without_capacity_s"] < RECOVER_S, report

        # Serve replaces the lost replicas on the surviving node (min_replicas 2 each)
        survivor_id = test_cluster.node_id(survivor)
        deadline = time.monotonic() + REPLACED_S
        while True:
            reps = _state(test_cluster)["replicas"]
            counts = {d: sum(1 for dd, n, _ in reps if dd == d and n == survivor_id) for d in ("Ensemble", "Student")}
            if counts == {"Ensemble": 2, "Student": 2}:
                break
            assert time.monotonic() < deadline, f"replicas on {survivor} after {REPLACED_S:.0f}s: {counts}"
            time.sleep(3)
        print(f"replicas replaced on {survivor} {time.monotonic() - t_kill:.1f}s after the kill")
        for m in ("ensemble", "student"):
            assert _post(f"{base}/v1/predict/{m}", image)[0] == 200
    finally:
        stop.set()
        test_cluster.restart_worker(victim)
        _delete_app(test_cluster)
    J.list_jobs(env["RAY_API_SERVER_ADDRESS"])  # the Jobs API still answers


def _delete_app(test_cluster) -> None:
    test_cluster.run_python("import os, ray; from ray import serve; "
                            "ray.init(address=os.environ['RAY_ADDRESS'], log_to_driver=False); "
                            f"serve.delete({APP!r})", timeout=120)


def test_serve_deploy_ships_the_code_as_a_zip_uri(test_cluster, cluster_env, registered, synth_root, serve_port,
                                                  tmp_path):
    """`serve deploy` (Serve's own CLI, through the dashboard's REST API) with the cluster config's
    `runtime_env.working_dir` pointing at a zip of the committed code (`git archive`, as
    docs/serving.md builds it): the nodes fetch and unpack it, and the app answers. A file:// URI
    stands in for s3:// (every test node reads /tmp; s3:// needs smart_open on the nodes)."""
    env = cluster_env
    code = tmp_path / "flowers-code.zip"
    subprocess.run(["git", "archive", "--format=zip", "--prefix=flowers/", "-o", str(code), "HEAD"], cwd=REPO,
                   check=True, timeout=120)
    cfg = _config(tmp_path, serve_port, working_dir=code.as_uri(),
                  args={"ensemble_uri": registered["ensemble"], "student_uri": registered["student"],
                        "tracking_uri": env["MLFLOW_TRACKING_URI"]})
    serve_cli = Path(sys.executable).with_name("serve")
    r = subprocess.run([str(serve_cli), "deploy", str(cfg), "-a", env["RAY_API_SERVER_ADDRESS"]],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, **env})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    base = f"http://127.0.0.1:{serve_port}"
    image = sorted((synth_root / "jpg").glob("*.jpg"))[0].read_bytes()
    try:
        _wait_ready(base, image)
        status, body = _post(f"{base}/v1/compare", image)
        assert status == 200 and body["agree"] is False, body
    finally:
        _delete_app(test_cluster)
