"""The champion/challenger gate against a real MLflow server: a worse challenger stays out, a better
one is promoted, --force is recorded, bad input moves nothing; lineage and the model card."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import free_port
from flowers.registry import governance as G
from flowers.registry import uris as R
from flowers.registry import tracking as T
from flowers.models.checkpoint import load_checkpoint, split_hash, write_checkpoint_folder
from flowers.cli.main import main as cli


@pytest.fixture(scope="module")
def base_ckpt(trained_checkpoint) -> dict:
    return load_checkpoint(trained_checkpoint)


@pytest.fixture
def tracker(mlflow_server):
    """A study tracker on the session's MLflow server; this process's MLflow settings restored after."""
    old, old_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    target = R.resolve_target(mlflow_server)
    T.configure(target)
    yield T.StudyTracker("gate-tests", target)
    mlflow.set_tracking_uri(old)
    if old_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old_env


def _version(tr: T.StudyTracker, ckpt: dict, name: str, correct: np.ndarray, tmp: Path, ids=None) -> str:
    """Register the trained model as `name` with crafted per-image results (`correct[i]`: image i right)."""
    rec = dict(ckpt["test_per_image"])
    labels = np.asarray(rec["labels"])
    rec["preds"] = np.where(correct, labels, (labels + 1) % 5).tolist()
    if ids is not None:
        rec["ids"], rec["split_hash"] = ids, split_hash(ids)
    key = uuid.uuid4().hex[:8]
    folder = write_checkpoint_folder({**ckpt, "test_per_image": rec}, tmp / key / "model")
    run = tr.child(key, "trial")
    version = tr.log_model_dir(run, folder, "model", name)  # the study's path: registered as a challenger
    tr.finish(run)
    return version


def _champion(tr, name) -> str:
    return str(tr.client.get_model_version_by_alias(name, R.CHAMPION).version)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what earlier steps printed
    rc = cli(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_gate_keeps_a_worse_challenger_promotes_a_better_one_and_records_force(tracker, base_ckpt, tmp_path,
                                                                               mlflow_server, capsys):
    tr, name = tracker, f"gate-{uuid.uuid4().hex[:6]}"
    n = len(base_ckpt["test_per_image"]["ids"])
    assert n == 20
    half = np.arange(n) < 10  # right on images 0-9
    v1 = _version(tr, base_ckpt, name, half, tmp_path)
    assert tr.client.get_registered_model(name).aliases == {R.CHALLENGER: v1}
    d1 = G.decide(name, v1, mlflow_server)
    assert (d1.decision, d1.promoted, _champion(tr, name)) == ("first", True, v1)

    # worse: right only on images 0-1, a subset of the champion's
    v2 = _version(tr, base_ckpt, name, np.arange(n) < 2, tmp_path)
    d2 = G.decide(name, v2, mlflow_server)
    assert (d2.decision, d2.promoted, _champion(tr, name)) == ("kept", False, v1)
    tags = tr.client.get_model_version(name, v2).tags
    # by hand: 8 images right only for the champion, none only for the challenger
    assert (tags["gate.only_champion"], tags["gate.only_challenger"]) == ("8", "0")
    assert float(tags["gate.p_value"]) == pytest.approx(2 * 0.5 ** 8)  # exact McNemar: 2 * P(X=0), X~Bin(8, 1/2)
    assert float(tags["gate.difference"]) == pytest.approx(0.1 - 0.5)
    assert (float(tags["gate.challenger_accuracy"]), float(tags["gate.champion_accuracy"])) == (0.1, 0.5)
    # the paired bootstrap: each resample's difference is -K/20 with K ~ Bin(20, 8/20), so the
    # 95% interval is minus the binomial's 97.5% and 2.5% quantiles over 20
    from scipy.stats import binom
    assert float(tags["gate.difference_low"]) == pytest.approx(-binom.ppf(0.975, 20, 0.4) / 20)
    assert float(tags["gate.difference_high"]) == pytest.approx(-binom.ppf(0.025, 20, 0.4) / 20)
    assert tags["gate.decision"] == "kept" and tags["gate.champion_version"] == v1
    assert tags["gate.by"] == G.who() and tags["gate.at"].endswith("Z")
    assert tr.client.get_registered_model(name).aliases == {R.CHAMPION: v1, R.CHALLENGER: v2}

    # better: right on all
    v3 = _version(tr, base_ckpt, name, np.ones(n, bool), tmp_path)
    d3 = G.decide(name, v3, mlflow_server)
    assert (d3.decision, _champion(tr, name)) == ("promoted", v3)
    assert d3.comparison.only_challenger == 10 and d3.comparison.difference == pytest.approx(0.5)
    assert tr.client.get_registered_model(name).aliases == {R.CHAMPION: v3}  # challenger alias retired

    # --force puts the worse one back, and says so
    rc, out, err = _cli(capsys, "models", "promote", name, v2, "--force", "--tracking-uri", mlflow_server)
    assert rc == 0, err
    assert f"{name} version {v2}: forced -> champion" in out
    assert _champion(tr, name) == v2
    tags = tr.client.get_model_version(name, v2).tags
    assert tags["gate.decision"] == "forced" and tags["gate.champion_version"] == v3
    assert tags["gate.reason"].startswith("forced; worse than the champion")

    # the same worse model without --force, against the better champion: refused on the CLI too
    rc, out, _ = _cli(capsys, "models", "promote", name, v3, "--tracking-uri", mlflow_server)
    assert rc == 0 and "promoted -> champion" in out and _champion(tr, name) == v3

    # list and show read it all back
    rc, out, _ = _cli(capsys, "models", "list", name, "--json", "--tracking-uri", mlflow_server)
    rows = json.loads(out)  # one JSON document
    assert [r["version"] for r in rows] == [v3, v2, v1] and rows[0]["aliases"] == [R.CHAMPION]
    assert rows[0]["test_accuracy"] == 1.0 and rows[1]["gate"]["decision"] == "forced"
    rc, out, _ = _cli(capsys, "models", "show", f"{name}@champion", "--json", "--tracking-uri", mlflow_server)
    info = json.loads(out)
    assert info["version"] == v3 and info["gate"]["decision"] == "promoted"
    lineage = info["lineage"]
    assert lineage["split_hash"] == base_ckpt["test_per_image"]["split_hash"]
    assert lineage["data_checksum"] == base_ckpt["lineage"]["data_checksum"]
    assert lineage["config_hash"] == base_ckpt["lineage"]["config_hash"]
    assert lineage["study"] == "gate-tests" and lineage["study_run_id"] == tr.parent_id
    assert lineage["run_id"] == info["run_id"] and "git_commit" in lineage
    rc, out, _ = _cli(capsys, "models", "list", "--tracking-uri", mlflow_server)
    assert rc == 0 and out.splitlines()[0].split()[:4] == ["name", "version", "aliases", "test_acc"]


def test_bad_input_one_line_exit_2_and_no_alias_moves(tracker, base_ckpt, tmp_path, mlflow_server, capsys,
                                                     monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # what the command sets for itself
    tr, name = tracker, f"gate-bad-{uuid.uuid4().hex[:6]}"
    ones = np.ones(20, bool)
    v1 = _version(tr, base_ckpt, name, ones, tmp_path)
    G.decide(name, v1, mlflow_server)
    other = [f"other/{i}" for i in base_ckpt["test_per_image"]["ids"]]
    v2 = _version(tr, base_ckpt, name, ones, tmp_path, ids=other)
    before = tr.client.get_registered_model(name).aliases
    dead = f"http://127.0.0.1:{free_port()}"
    for argv, msg in [
        (["promote", name, v2], "tested on different images (split hash"),  # another split
        (["promote", name, "99"], f"registered model '{name}' has no version 99"),
        (["promote", "no-such-model", "1"], "has no version 1"),
        (["show", f"{name}@nowhere"], f"alias 'nowhere' of '{name}' points to no version"),
        (["show", f"{name}/7"], "has no version 7"),
        (["promote", name, v2, "--margin", "5"], "margin is a fraction"),
    ]:
        rc, out, err = _cli(capsys, "models", *argv, "--tracking-uri", mlflow_server)
        assert rc == 2, (argv, out, err)
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, (argv, err)
        assert tr.client.get_registered_model(name).aliases == before
    # the real command line, in its own process: one line on stderr, exit 2
    r = subprocess.run([sys.executable, "-m", "flowers.cli.main", "models", "promote", name, v2, "--tracking-uri",
                        mlflow_server], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"})
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr[-2000:]
    rc, _, err = _cli(capsys, "models", "list", "--tracking-uri", dead)
    assert rc == 2 and err.startswith(f"error: cannot reach the model registry at {dead}") and err.count("\n") == 1
    rc, out, err = _cli(capsys, "models", "list", "--json", "--tracking-uri", dead)  # still valid JSON
    assert rc == 2 and json.loads(out)["error"].startswith(f"cannot reach the model registry at {dead}")
    assert "gate.decision" not in tr.client.get_model_version(name, v2).tags
    # with --force the other split is accepted, recorded as uncompared
    d = G.decide(name, v2, mlflow_server, force=True)
    assert d.decision == "forced" and d.comparison is None and "different images" in d.reason


def test_study_gate_records_a_refusal_instead_of_failing(tracker, base_ckpt, tmp_path):
    """In a study, a version the gate cannot compare stays a challenger with the reason; the study goes on."""
    from flowers.config import StudyConfig
    from flowers.study.steps import gate

    tr, name = tracker, f"gate-study-{uuid.uuid4().hex[:6]}"
    v1 = _version(tr, base_ckpt, name, np.ones(20, bool), tmp_path)
    study = StudyConfig(name="gate-tests")
    assert gate(study, tr, name, v1).decision == "first"
    v2 = _version(tr, base_ckpt, name, np.ones(20, bool), tmp_path, ids=[f"x/{i}" for i in range(20)])
    d = gate(study, tr, name, v2)
    assert d.decision == "refused" and not d.promoted and _champion(tr, name) == v1
    assert tr.client.get_model_version(name, v2).tags["gate.decision"] == "refused"


def test_model_card(base_ckpt, tmp_path):
    folder = write_checkpoint_folder(base_ckpt, tmp_path / "m")
    from flowers.models.checkpoint import read_manifest, read_per_image

    manifest = {**read_manifest(folder), "uncertainty_threshold": 0.42,
                "uncertainty_policy": {"policy": "coverage", "target": 0.9},
                "metrics": {"coverage_at_threshold": 0.9, "selective_acc_at_threshold": 0.95}}
    card = G.model_card(manifest, read_per_image(folder), "flowers-l1")
    rec = base_ckpt["test_per_image"]
    acc = np.mean(np.asarray(rec["preds"]) == np.asarray(rec["labels"]))
    assert card.startswith("# Model card: flowers-l1")
    for section in ("## Data", "## Metrics (test)", "## Worst ten classes (test)", "## Uncertainty", "## Lineage",
                    "## Intended use", "## Limits"):
        assert section in card
    assert f"| top-1 accuracy | {acc:.4f} | [" in card
    assert "0.420" in card and "90.0% of the images" in card
    assert base_ckpt["lineage"]["data_checksum"] in card and rec["split_hash"] in card
    worst = G.worst_classes(rec, manifest["class_names"])
    assert len(worst) == 5 and worst == sorted(worst, key=lambda r: (r["accuracy"], -r["support"], r["label"]))


def test_lineage_helpers(tmp_path):
    (tmp_path / "a").write_bytes(b"123")
    (tmp_path / "b").write_bytes(b"1234")
    h = G.dataset_checksum([tmp_path / "a", tmp_path / "b"], [0, 1])
    assert h == G.dataset_checksum([tmp_path / "b", tmp_path / "a"], [1, 0])  # order-free
    (tmp_path / "b").write_bytes(b"12345")
    assert G.dataset_checksum([tmp_path / "a", tmp_path / "b"], [0, 1]) != h
    assert G.config_hash({"a": 1, "b": {"c": 2}}) == G.config_hash({"b": {"c": 2}, "a": 1})
    git = G.git_state()
    assert set(git) == {"git_commit", "git_dirty"}
    assert G.git_state(tmp_path) == {"git_commit": None, "git_dirty": None}  # not a checkout
    assert G.parents_text([{"name": "flowers-l1", "version": "3"}, {"uri": "/x/best.pt"}]) == "flowers-l1/3,/x/best.pt"
