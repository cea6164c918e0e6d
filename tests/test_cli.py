"""`flowers` command line: help tells the story, bad configs give one line and exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def flowers(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flowers.cli.main", *args], capture_output=True, text=True, cwd=REPO, env=env)


def test_help_lists_levels_and_commands():
    r = flowers("--help")
    assert r.returncode == 0
    for word in ["L1", "L5", "train", "evaluate", "data", "--profile cpu"]:
        assert word in r.stdout


def test_bad_config_key_is_one_line_exit_2():
    r = flowers("train", "-c", "configs/level1.yaml", "--set", "optim.lrr=1")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown config key 'optim.lrr' (valid keys under 'optim': backbone_lr_mult, grad_clip, label_smoothing, lr, schedule, warmup_epochs, weight_decay)"


def test_wrong_type_and_missing_data(tmp_path):
    r = flowers("train", "-c", "configs/level1.yaml", "--set", "data.batch_size=abc")
    assert r.returncode == 2 and "data.batch_size: expected an integer" in r.stderr
    r = flowers("train", "-c", "configs/level1.yaml", "-p", "smoke", "--set", f"data.root={tmp_path}/missing")
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_train_then_evaluate_via_cli(synth_root, tmp_path):
    r = flowers("train", "-c", "configs/level1.yaml", "-p", "smoke", "--set", f"data.root={synth_root}",
                "--set", "train.epochs=1", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout[: r.stdout.rindex("}") + 1])["run_dir"] == str(tmp_path / "run")
    r = flowers("evaluate", "--checkpoint", str(tmp_path / "run/best.pt"), "--split", "val", "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ev/val_confusion.png").is_file() and (tmp_path / "ev/val_metrics.json").is_file()


def test_data_synth_and_verify(tmp_path):
    r = flowers("data", "synth", str(tmp_path / "s"), "--classes", "3", "--per-class", "6")
    assert r.returncode == 0
    r = flowers("data", "verify", "--root", str(tmp_path / "s"))
    assert r.returncode == 0 and "images: 18" in r.stdout


def test_submit_takes_its_flags_before_the_double_dash_and_requires_a_tracking_server():
    """`flowers submit study --address URL -- ARGS`: the job's args follow `--`; a submitted study
    without a tracking URI would lose its store with the job's temporary working dir."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "flowers.cli.main", "submit", "study", "--address", "http://127.0.0.1:1", "--",
           "--profile", "smoke"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "needs a tracking server" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run(cmd + ["--tracking-uri", "http://127.0.0.1:2"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "cannot reach the Ray Jobs API at http://127.0.0.1:1" in r.stderr, r.stderr
