"""The inference benches refuse a model they cannot resolve with one line and exit 2, before any work."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cmd", [
    ["bench/inference.py", "--student", "models:/no-such-model@champion"],
    ["bench/score_throughput.py", "--model", "models:/no-such-model@champion", "--limit", "4"],
    ["bench/serve_load.py", "--ensemble", "models:/no-such-model@champion"],
])
def test_a_missing_model_is_one_line_and_exit_2(cmd, tmp_path):
    data = tmp_path / "data"
    (data / "jpg").mkdir(parents=True)  # score_throughput checks its data first: give it a folder
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "FLOWERS_DATA": str(data)}
    out = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no-such-model" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
