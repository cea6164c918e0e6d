"""The README's quickstart as a newcomer runs it: a plain shell (no venv on PATH, nothing activated), the CLI
called by its full path, from a working folder outside the checkout. Each step is the README's own command
(checked to be in the README), on a tiny synthetic dataset and the smoke profile instead of Flowers-102.

The cluster walkthrough (step 8) has its own test on the local multi-node cluster (tests/test_walkthrough.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent  # the project's venv, which a newcomer calls by path
FLOWERS = str(BIN / "flowers")
PYTHON = str(BIN / "python")

pytestmark = pytest.mark.slow


def plain_env(**extra: str) -> dict[str, str]:
    """What `env -i PATH=/usr/bin:/bin` gives, plus HOME and the variables a step sets itself."""
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), **extra}


def sh(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in r.stderr[-3000:] or r.returncode == 0, r.stderr[-3000:]
    return r


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> bytes:
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = e
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {timeout:.0f} s: {last}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_readme_quickstart_from_a_plain_shell(tmp_path):
    for cmd in ["flowers data verify", "flowers study --profile study-cpu", "flowers ui", "flowers serve",
                "/v1/predict/student?top_k=3", "flowers score ~/photos --model models:/flowers-student@champion",
                "pd.read_parquet('photos.parquet')", "Predictor.from_uri(\"models:/flowers-student@champion\")",
                "flowers models list"]:
        assert cmd in README, f"README quickstart no longer says {cmd!r}: update this test with it"
    work = tmp_path / "work"
    work.mkdir()
    data = tmp_path / "flowers102"
    env = plain_env(FLOWERS_DATA=str(data))

    # 1. the data (synthetic here), then `flowers data verify`
    assert sh([FLOWERS, "data", "synth", str(data), "--classes", "4", "--per-class", "10"], work, env).returncode == 0
    r = sh([FLOWERS, "data", "verify", "--json"], work, env)
    assert r.returncode == 0 and json.loads(r.stdout)["images"] == 40, r.stderr[-2000:]

    # 2. the main job, on the smoke profile and a one-point grid (the README's profile takes 20+ minutes)
    r = sh([FLOWERS, "study", "--profile", "smoke", "--set", "data.split=official", "--set", "train.epochs=1",
            "--set", "study.ablation=null"], work, env, timeout=1800)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert (work / ".flowers" / "mlflow.db").is_file()

    # the registry, as `flowers models list --json` shows it
    r = sh([FLOWERS, "models", "list", "--json"], work, env)
    assert r.returncode == 0, r.stderr[-2000:]
    listed = json.loads(r.stdout)
    text = json.dumps(listed)
    for name in ("flowers-l1", "flowers-ensemble", "flowers-student"):
        assert name in text, text[:2000]
    assert "champion" in text

    # 6. score a folder into Parquet and read it with pandas, as the README does
    photos = data / "jpg"
    r = sh([FLOWERS, "score", str(photos), "--model", "models:/flowers-student@champion", "--out", "photos.parquet"],
           work, env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = sh([PYTHON, "-c", "import pandas as pd; df = pd.read_parquet('photos.parquet'); "
                          "print(len(df), int(df['error'].isna().sum()), sorted(df.columns))"], work, env)
    n, ok, cols = r.stdout.split(" ", 2)
    assert (int(n), int(ok)) == (40, 40) and "uncertain" in cols, r.stdout

    # 7. the Python API in five lines
    first = sorted(photos.glob("*.jpg"))[0]
    code = ("from flowers.inference.predict import Predictor\n"
            "predictor = Predictor.from_uri('models:/flowers-student@champion')\n"
            f"for result in predictor.predict([{str(first)!r}, 'missing.jpg'], top_k=3):\n"
            "    print(result.get('name'), result.get('confidence'), result.get('uncertain'), result.get('error'))\n")
    r = sh([PYTHON, "-c", code], work, env)
    assert r.returncode == 0, r.stderr[-2000:]
    good, bad = r.stdout.strip().splitlines()[-2:]
    assert good.startswith("synthetic") and "None" == good.split()[-1] and "missing.jpg" in bad, r.stdout

    # 4 and 5. serve, send a photo with curl, open the page; Ctrl-C stops it
    port = free_port()
    serve_log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([FLOWERS, "serve", "--port", str(port)], cwd=work, env=env, stdout=serve_log,
                            stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 600, proc)
        r = sh(["curl", "-s", "--data-binary", f"@{first}", "-H", "content-type: image/jpeg",
                f"http://127.0.0.1:{port}/v1/predict/student?top_k=3"], work, env, timeout=120)
        answer = json.loads(r.stdout)
        assert len(answer["top_k"]) == 3 and answer["model"] == "flowers-student" and answer["version"] == "1", answer
        page = wait_http(f"http://127.0.0.1:{port}/", 60).decode()
        assert "<html" in page.lower() and "flowers" in page.lower()
    finally:
        stop(proc)
        serve_log.close()
    assert proc.returncode in (0, 130, -2), (tmp_path / "serve.log").read_text()[-3000:]

    # 3. the MLflow UI on the study's store
    port = free_port()
    ui_log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen([FLOWERS, "ui", "--port", str(port)], cwd=work, env=env, stdout=ui_log,
                            stderr=subprocess.STDOUT)
    try:
        html = wait_http(f"http://127.0.0.1:{port}/", 180, proc).decode()
        assert "mlflow" in html.lower()
        exps = json.loads(wait_http(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name"
                                    "?experiment_name=flowers-study", 60))
        assert exps["experiment"]["name"] == "flowers-study"
    finally:
        stop(proc)
        ui_log.close()
