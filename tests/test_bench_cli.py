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


@pytest.mark.parametrize("store,needle", [("x=/no/such/home", "no mlflow.db"), ("no-equals-sign", "NAME=HOME")])
def test_ensemble_mix_refuses_a_wrong_store_with_one_line(store, needle, tmp_path):
    out = subprocess.run([sys.executable, "bench/ensemble_mix.py", "--store", store], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_ensemble_mix_votes_every_subset_from_stored_probabilities():
    """Two models, each right on different images: the subsets' votes are computed from the probabilities."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from ensemble_mix import vote_table
    finally:
        sys.path.remove(str(REPO / "bench"))
    import numpy as np

    y = np.array([0, 1, 1, 0])
    a = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])  # right on 0 and 2
    b = np.array([[0.4, 0.6], [0.1, 0.9], [0.3, 0.7], [0.8, 0.2]])  # right on 1, 2 and 3
    a_blur = np.array([[0.1, 0.9], [0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])  # wrong everywhere
    suite = {"a": {"clean": a, "blur": a_blur}, "b": {"clean": b, "blur": b}}
    rows = {"+".join(r["members"]): r for r in vote_table({"a": a, "b": b}, suite, y, y)}
    assert set(rows) == {"a", "b", "a+b"}
    assert rows["a"]["clean_test"] == 50.0 and rows["b"]["clean_test"] == 75.0
    assert rows["a+b"]["clean_test"] == 100.0  # mean of the two is right everywhere
    assert rows["a"]["mean"] == rows["a"]["worst"] == 0.0 and rows["a"]["worst_shift"] == "blur"
    assert rows["a+b"]["suite_clean"] == 100.0 and rows["b"]["mean"] == 75.0
