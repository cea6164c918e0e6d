"""Shared fixtures: tiny synthetic data, a smoke-trained checkpoint, one Ray per session, an MLflow server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.cluster_fixture"]  # `test_cluster`: the local multi-node cluster


def free_port() -> int:
    """A free port outside the ephemeral range, so Ray's own servers cannot take it meanwhile."""
    from raylink.ports import pick_port

    return pick_port()


@pytest.fixture(autouse=True)
def mlflow_env_restored():
    """$MLFLOW_TRACKING_URI as it was before each test. MLflow 3's `set_tracking_uri` also exports the
    URI to the environment, and its default is ./mlflow.db in the working directory, so a test that
    restores "the old URI" that way would send every later study's runs and artifacts into the
    checkout (seen: the small study's whole experiment in ./mlflow.db and ./mlartifacts)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """5 learnable classes x 12 images at 96 px in the VGG layout."""
    from flowers.data import write_synthetic

    root = tmp_path_factory.mktemp("synth") / "flowers"
    write_synthetic(root, num_classes=5, per_class=12, size=96, seed=0)
    return root


@pytest.fixture(scope="session")
def smoke_overrides(synth_root) -> list[str]:
    return [f"data.root={synth_root}", "data.split=official"]


@pytest.fixture(scope="session")
def smoke_config(smoke_overrides):
    from flowers.config import load_config

    return load_config(REPO / "configs/level1.yaml", str(REPO / "configs/profiles/smoke.yaml"), smoke_overrides)


@pytest.fixture(scope="session")
def trained_run(smoke_config, tmp_path_factory):
    """A 2-epoch smoke run on synthetic data: a real checkpoint for predictor/serve/score tests."""
    from flowers.training.tasks import make_task
    from flowers.training.loop import fit

    return fit(smoke_config, make_task(smoke_config), run_dir=tmp_path_factory.mktemp("run") / "l1")


@pytest.fixture(scope="session")
def trained_checkpoint(trained_run) -> Path:
    return trained_run.best_checkpoint


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, no dashboard).

    Serve runs as `flowers serve` does: HAProxy in front (serve/ingress_env.py), on ports of
    its own so a `flowers serve` or another test run on this machine does not collide.
    """
    import ray  # a hard dependency: a broken install fails here instead of skipping
    from flowers.runtime import worker_runtime_env

    from serve.ingress_env import LOCAL_DRAIN_S, ingress_env

    if not ray.is_initialized():
        # read by Ray's processes at start-up, so set before ray.init
        os.environ.update(ingress_env("haproxy", 10 * 1024 * 1024,
                                      {k: free_port() for k in ("stats", "metrics", "fallback", "fallback_grpc")},
                                      LOCAL_DRAIN_S))
        # Serve kills a proxy that is not ready within 3 checks of 5 s; on a loaded 2-core machine
        # HAProxy's manager can take longer to start than that
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
        ray.init(num_cpus=2, include_dashboard=False, runtime_env=worker_runtime_env(),
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback, SQLite-backed; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"), start_new_session=True,
    )  # its own process group: the server's uvicorn worker goes with it at teardown
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("MLflow server did not start: " + (root / "server.log").read_text()[-2000:])
    yield uri
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def real_data_root() -> Path | None:
    root = os.environ.get("FLOWERS_DATA")
    return Path(root) if root and Path(root, "imagelabels.mat").is_file() else None


requires_real_data = pytest.mark.skipif(real_data_root() is None, reason="FLOWERS_DATA not set to a Flowers-102 copy")


# ----------------------------------------------------------------------------- study (issue 3)


def write_small_study(tmp: Path, synth_root: Path, name: str, **study: object) -> Path:
    """A study YAML in `tmp`: levels l1+l3 and a 2x2 grid (augment x schedule) whose light/constant point is L1."""
    import yaml

    (tmp / "ablation.yaml").write_text(yaml.safe_dump({
        "config": str(REPO / "configs/level1.yaml"),
        "axes": {"augment": {"light": {"data.augment": "light"}, "strong": {"data.augment": "strong"}},
                 "schedule": {"constant": {"optim.schedule": "constant"}, "cosine": {"optim.schedule": "cosine"}}}}))
    data = {"name": name, "levels": {"l1": str(REPO / "configs/level1.yaml"), "l3": str(REPO / "configs/level3.yaml")},
            "ablation": "ablation.yaml", "profile": str(REPO / "configs/profiles/smoke.yaml"),
            "overrides": [f"data.root={synth_root}", "data.split=official", "train.epochs=1"],
            "stages": ["tune", "ensemble"], "ensemble_members": ["l1", "l3"],
            "resources": {"cpus_per_trial": 0.5, "max_concurrent": 4}, "max_failures": 0, "home": str(tmp / "home")}
    data.update(study)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def small_study(ray_session, synth_root, tmp_path_factory):
    """A real 5-trial study (4 concurrent trials at 0.5 CPU) on the embedded SQLite store, then the
    L4 ensemble and the L5 distill stage (the smoke student, registered as flowers-student)."""
    import mlflow

    from flowers.study.plan import load_study
    from jobs.study import run_study

    tmp = tmp_path_factory.mktemp("study")
    study, config_dir = load_study(write_small_study(tmp, synth_root, "small", stages=["tune", "ensemble", "distill"],
                                                     distill_config=str(REPO / "configs/level5.yaml")))
    old_env, old_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    # the study's own store under its home, whatever an earlier module-scoped fixture left in the
    # environment (MLflow's set_tracking_uri exports the URI, and those fixtures run outside the
    # per-test restore above)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        outcome = run_study(study, config_dir)
    finally:
        # keep the rest of the session on its own MLflow settings (set_tracking_uri exports the URI too)
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
    return study, outcome


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback with a bucket `flowers`, and the env that points at it."""
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"]).create_bucket(Bucket="flowers")
        yield env
    finally:
        proc.kill()
        proc.wait()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
