"""Ray Jobs: token lookup, entrypoints, runtime env, and a real head running a small study as a job."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, free_port, write_small_study
from jobs import client as J


def test_auth_token_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert J.auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    assert J.auth_token() == "from-file"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert J.auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert J.auth_token() == "from-env"


def test_entrypoint_address_and_runtime_env(monkeypatch):
    # the job runs with the interpreter (and so the environment) flowers runs in, unless told otherwise
    assert J.entrypoint("study", ["--profile", "study-cpu", "--set", "a=b c"]) == \
        f"{sys.executable} -m jobs.study --profile study-cpu --set 'a=b c'"
    assert J.entrypoint("score", [], python="python") == "python -m jobs.score"
    assert J.entrypoint("tune", ["--param", "optim.lr=loguniform:1e-4:1e-2"], python="/opt/v env/bin/python") == \
        "'/opt/v env/bin/python' -m jobs.tune --param optim.lr=loguniform:1e-4:1e-2"
    with pytest.raises(J.JobsError, match="unknown job"):
        J.entrypoint("nope")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert J.resolve_address() == "http://127.0.0.1:8265"
    assert J.resolve_address("10.0.0.5:6379") == "http://10.0.0.5:8265"
    assert J.resolve_address("ray://head:10001") == "http://head:8265"
    assert J.resolve_address("https://ray.example:443") == "https://ray.example:443"
    monkeypatch.setenv("FLOWERS_DATA", "/data/f")
    env = J.runtime_env(REPO)
    assert env["working_dir"] == str(REPO)
    assert {".venv", ".flowers", "runs", "mlruns", ".git"} <= set(env["excludes"])
    assert env["env_vars"]["FLOWERS_DATA"] == "/data/f"
    assert "MALLOC_TRIM_THRESHOLD_" in env["env_vars"] or os.environ.get("FLOWERS_ALLOCATOR") == "system"


def test_unreachable_address_is_a_clear_error():
    with pytest.raises(J.JobsError, match="cannot reach the Ray Jobs API"):
        J.list_jobs(f"http://127.0.0.1:{free_port()}")


@pytest.fixture
def ray_head(tmp_path):
    """A separate local head (own ports, own --temp-dir) with token auth on; stopped by its own process group."""
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths are length-limited
    port, dash = free_port(), free_port()
    token = uuid.uuid4().hex
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port),
         "--dashboard-port", str(dash), "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--temp-dir", str(temp),
         "--include-dashboard", "true", "--disable-usage-stats",
         # the agents' default ports may be taken by another Ray on this machine
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
         "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        yield address, token
    finally:
        # `ray stop` would stop every Ray on this machine (the test session's, other users'); end only ours
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)  # the head stops its own processes in a second or two; the rest go with SIGKILL
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_submit_study_job_to_a_real_head(ray_head, synth_root, mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    address, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    deadline = time.time() + 90
    while True:  # the dashboard takes a while to come up
        try:
            J.list_jobs(address)
            break
        except J.JobsError:
            if time.time() > deadline:
                raise
            time.sleep(1)
    # without the token the head refuses, and we say what to do
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    with pytest.raises(J.JobsError, match="token"):
        J.list_jobs(address)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)

    path = write_small_study(tmp_path, synth_root, "jobstudy", ablation=None, stages=["tune"],
                             levels={"l1": str(REPO / "configs/level1.yaml")},
                             resources={"cpus_per_trial": 1, "max_concurrent": 1})
    sid = J.submit("study", ["--config", str(path), "--tracking-uri", mlflow_server], address, REPO,
                   python=sys.executable)
    assert any(j["submission_id"] == sid for j in J.list_jobs(address))
    status = J.wait(sid, address, timeout_s=240)
    assert status == "SUCCEEDED", J.logs(sid, address)[-3000:]
    assert "study 'jobstudy' done" in J.logs(sid, address)

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("jobstudy")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.tags.get("flowers.role") for r in runs} == {"study", "trial"}
    assert client.get_model_version_by_alias("flowers-l1", "champion") is not None


def test_cli_builds_its_parser_without_ray_or_torch():
    """`flowers --help` stays fast: the commands take their options from jobs/options.py, not the Ray jobs."""
    code = ("import sys, flowers.cli.main; flowers.cli.main.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:] or out.stdout


def test_workers_get_the_allocator_and_the_drivers_store(monkeypatch):
    from flowers.runtime import worker_runtime_env
    from raylink.connect import worker_env

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert worker_env() == {**worker_runtime_env()["env_vars"], "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert "MLFLOW_TRACKING_URI" not in worker_env()
