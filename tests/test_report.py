"""Study report: sections from MLflow, 'not run' for missing stages, seed figures alongside."""
from __future__ import annotations

import numpy as np
import pytest

from flowers.models.checkpoint import per_image_record
from flowers.study.report import comparisons, paired, render
from flowers.study.report_html import markdown_to_html
from flowers.registry.run_notes import mlflow_metrics


def _record(correct, n=None, prefix="jpg"):
    """A per-image record over images jpg/image_00001.jpg...: label 0, right where `correct` is true."""
    correct = np.asarray(correct, bool)
    paths = [f"/data/{prefix}/image_{i + 1:05d}.jpg" for i in range(len(correct))]
    return per_image_record(paths, [0] * len(correct), [0 if c else 1 for c in correct])


def _info(stages=None, records=None):
    trial = {"key": "l1", "status": "FINISHED", "run_id": "r1", "roles": ["l1", "ablation"],
             "axes": {"augment": "light", "schedule": "constant"},
             "metrics": mlflow_metrics({"best_val_acc": 0.9, "test_top1": 0.85}),  # as MLflow holds them
             "params": {"data.root": "/d", "data.split": "random", "data.seed": "0", "data.image_size": "128",
                        "model.arch": "efficientnet_lite0", "model.attention": "False", "model.pretrained": "packaged",
                        "train.epochs": "2", "data.classes": "None", "data.max_train_batches": "120"}, "tags": {}}
    return {"study": "s", "parent": {"params": {}, "tags": {"hardware": "CPU X, 2 cores, no GPU"}, "metrics": {}, "status": "FINISHED"},
            "trials": [trial], "stages": stages or {},
            "champions": {"l1": {"run_id": "r1", "version": "1", "uri": "models:/flowers-l1@champion"}},
            "records": records or {}}


def test_render_levels_ablation_and_not_run(tmp_path):
    md = render(_info(), tmp_path)
    assert "| L1 transfer baseline | l1 |" in md and "90.00 | 85.00 | 97.68 | 97.31 |" in md
    assert "| L3 attention pooling | – | – | not run | not run | 98.41 | 97.68 |" in md
    assert "| light | constant | l1 | 90.00 | 85.00 |" in md
    assert "128 px, efficientnet_lite0" in md and "split random" in md and "CPU X, 2 cores" in md
    assert md.count("not run") >= 4  # L2, L3 (x2), L4, L5
    # the seed's table beside this run's, and every comparison row (here without per-image results)
    assert "| L1 transfer baseline | 85.00 | 97.31 | – |" in md
    assert "| L5 student, static INT8 | not run | not reported | ≥ 95 |" in md
    assert "| L5 student INT8, batch-1 p50 latency (ms) | not run | 59 | < 100 |" in md
    for row in ("L2 vs L1", "L3 vs L1", "ensemble vs best member", "student INT8 vs ensemble",
                "student INT8 vs student fp32"):
        assert f"| {row} | not run (or no per-image results) |" in md
    assert (tmp_path / "levels.png").is_file() and (tmp_path / "ablation.png").is_file()
    # the HTML report MLflow's artifact viewer renders: tables as tables, figures inline
    page = markdown_to_html(md, tmp_path, "Study report: s")
    assert page.count("<table>") == sum(line.startswith("|---") for line in md.splitlines()) >= 4
    assert page.count('src="data:image/png;base64,') == 2 and "![" not in page and "**" not in page
    assert "<td>L1 transfer baseline</td>" in page


def test_render_l4_l5_when_present(tmp_path):
    stages = {
        "l4-ensemble": {"metrics": mlflow_metrics({"val_top1": 0.95, "test_top1": 0.94, "member_l1_test_top1": 0.9,
                                                   "member_l3_test_top1": 0.91, "mean_disagreement": 0.05}, "ensemble"),
                        "params": {}},
        "l5-distill": {"metrics": mlflow_metrics({"test_top1": 0.9, "int8_test_top1": 0.89, "teacher_test_top1": 0.94,
                                                  "latency_fp32_p50_ms": 10.0, "latency_int8_p50_ms": 5.0,
                                                  "latency_dynamic_int8_p50_ms": 7.0, "latency_teacher_p50_ms": 80.0},
                                                 "student"),
                       "params": {"model.arch": "mobilenet_v3_large"}},
    }
    md = render(_info(stages), tmp_path)
    assert "| L4 ensemble | 94.00 | not reported | – |" in md and "| L5 student, static INT8 | 89.00 |" in md
    assert "| member l1 | 90.00 |" in md and "**94.00**" in md and "mean_disagreement 0.0500" in md
    assert "| student INT8 (static) | 89.00 | 5.0 |" in md and "| teacher | 94.00 | 80.0 |" in md
    assert "| seed student INT8 | – | 59 |" in md


def test_paired_comparison_numbers_and_refusals():
    # 20 images: A right on 0-15, B right on 0-9: 6 images only A gets right, none only B
    a, b = _record(np.arange(20) < 16), _record(np.arange(20) < 10)
    r = paired(a, b)
    assert r["status"] == "ok" and r["n_images"] == 20
    assert (r["challenger_accuracy"], r["champion_accuracy"]) == (0.8, 0.5)
    assert r["difference"] == pytest.approx(0.3) and 0 < r["difference_low"] < 0.3 < r["difference_high"]
    assert (r["only_challenger"], r["only_champion"]) == (6, 0)
    assert r["p_value"] == pytest.approx(2 * 0.5 ** 6)  # exact McNemar
    # paired by image id, not by position
    shuffled = {**b, "ids": b["ids"][::-1], "labels": b["labels"][::-1], "preds": b["preds"][::-1]}
    assert paired(a, shuffled)["difference"] == pytest.approx(0.3)
    # other images (another split or a capped evaluation): refused, never paired
    assert paired(a, _record(np.arange(20) < 10, prefix="other"))["status"] == "not comparable"
    assert paired(a, _record(np.arange(15) < 10))["status"] == "not comparable"
    assert paired(a, None)["status"] == "missing"


def test_render_comparisons_claim_and_int8_recipe(tmp_path):
    n = 200
    recs = {"l1": _record(np.arange(n) < 150), "l2": _record(np.arange(n) < 140), "l3": _record(np.arange(n) < 160),
            "ensemble": _record(np.arange(n) < 170), "member:l1": _record(np.arange(n) < 150),
            "member:l3": _record(np.arange(n) < 160), "student_int8": _record(np.arange(n) < 168),
            "student_fp32": _record(np.arange(n) < 169)}
    stages = {
        "l4-ensemble": {"metrics": mlflow_metrics({"val_top1": 0.86, "test_top1": 0.85, "member_l1_test_top1": 0.75,
                                    "member_l3_test_top1": 0.80, "architecture_pairs_mean_gain_over_best_member": 0.02,
                                    "architecture_pairs_gain_low": 0.005, "architecture_pairs_gain_high": 0.035,
                                    "hyperparameter_pairs_mean_gain_over_best_member": 0.01,
                                    "hyperparameter_pairs_gain_low": -0.005, "hyperparameter_pairs_gain_high": 0.025,
                                    "arch_minus_hparam_gain": 0.01, "arch_minus_hparam_gain_low": -0.01,
                                    "arch_minus_hparam_gain_high": 0.03}, "ensemble"), "params": {}, "tags": {}},
        "l5-distill": {"metrics": mlflow_metrics({"test_top1": 0.845, "int8_test_top1": 0.84}, "student"), "params": {},
                       "tags": {"int8_recipe": "u8s8_7bit", "int8_saturation_safe": "True",
                                "int8_validated_on": "AMD EPYC (avx2 avx512f avx512_vnni)"}},
    }
    info = _info(stages, recs)
    rows = dict(comparisons(info))
    assert set(rows) == {"L2 vs L1", "L3 vs L1", "ensemble vs best member (l3)", "student INT8 vs ensemble",
                         "student INT8 vs student fp32"}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["ensemble vs best member (l3)"]["difference"] == pytest.approx(0.05)
    md = render(info, tmp_path)
    assert "| L2 vs L1 | 70.00 | 75.00 | -5.00 | [" in md and "| 0 / 10 | 200 |" in md
    assert "| ensemble vs best member (l3) | 85.00 | 80.00 | +5.00 |" in md
    assert "| student INT8 vs student fp32 | 84.00 | 84.50 | -0.50 |" in md
    assert "Architecture minus hyperparameter: **+1.00 points, 95 % interval [-1.00, +3.00]**" in md
    assert "the interval contains 0" in md and "better member: architecture pairs +2.00 points [+0.50, +3.50]; hyperparameter pairs +1.00" in md
    assert "INT8 recipe `u8s8_7bit`" in md and "avx512_vnni" in md


@pytest.mark.slow
def test_report_from_a_real_study(small_study):
    _, outcome = small_study
    text = outcome.report.read_text()
    assert "## L2 ablation grid" in text and "| l1 |" in text
    assert "## L4 ensemble" in text and "member l1" in text  # ensemble ran over l1 + l3
    assert "## L5 student" in text and "| student INT8 (static) |" in text and "INT8 recipe `u8s8_7bit_bc`" in text
    assert (outcome.report.parent / "ablation.png").is_file()
    # per-image results read back from MLflow: the comparisons have numbers (L2 is not a level here)
    assert "| L2 vs L1 | not run" in text
    for row in ("L3 vs L1", "ensemble vs best member", "student INT8 vs ensemble", "student INT8 vs student fp32"):
        line = next(x for x in text.splitlines() if x.startswith(f"| {row}"))
        assert "not run" not in line and "not comparable" not in line and "[" in line, line
    assert "## This run beside the seed" in text and "Architecture minus hyperparameter" not in text  # no hp pair


def test_report_says_when_the_grid_ran_at_a_smaller_budget():
    from flowers.study.report import _grid_budget_note

    grid = [{"params": {"train.epochs": "2"}}, {"params": {"train.epochs": "2"}}]
    levels = [{"params": {"train.epochs": "8"}}, None, {"params": {"train.epochs": "8"}}]
    note = " ".join(_grid_budget_note(grid, levels))
    assert "grid points trained 2 epochs each, the level models 8" in note
    assert _grid_budget_note(grid, [{"params": {"train.epochs": "2"}}]) == []  # same budget: nothing to say
    assert _grid_budget_note([], levels) == []


def test_header_setup_describes_the_level_models_not_a_smaller_grid_point(tmp_path):
    info = _info()
    level = info["trials"][0]
    grid = {**level, "key": "abl-x", "run_id": "r2", "roles": ["ablation"],
            "params": {**level["params"], "train.epochs": "1", "data.max_train_batches": "None"}}
    l3 = {**level, "key": "l3", "run_id": "r3", "roles": ["l3"],
          "params": {**level["params"], "model.attention": "True", "data.max_train_batches": "None"}}
    # MLflow lists the newest run first: L3 and the grid come before L1
    info["trials"] = [grid, l3, {**level, "params": {**level["params"], "data.max_train_batches": "None"}}]
    header = render(info, tmp_path).split("## ")[0]
    assert "Setup (this study's level models)" in header and "2 epochs" in header and "1 epochs" not in header
    assert "attention" not in header  # L1's setup, not L3's (which the level table shows on its own row)
