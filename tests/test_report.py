"""Study report: sections from MLflow, 'not run' for missing stages, seed figures alongside."""
from __future__ import annotations

import pytest

from flowers.report import render


def _info(stages=None):
    trial = {"key": "l1", "status": "FINISHED", "run_id": "r1", "roles": ["l1", "ablation"],
             "axes": {"augment": "light", "schedule": "constant"},
             "metrics": {"best_val_acc": 0.9, "test_top1": 0.85},
             "params": {"data.root": "/d", "data.split": "random", "data.seed": "0", "data.image_size": "128",
                        "model.arch": "efficientnet_lite0", "model.attention": "False", "model.pretrained": "packaged",
                        "train.epochs": "2", "data.classes": "None", "data.max_train_batches": "120"}, "tags": {}}
    return {"study": "s", "parent": {"params": {}, "tags": {"hardware": "CPU X, 2 cores, no GPU"}, "metrics": {}, "status": "FINISHED"},
            "trials": [trial], "stages": stages or {},
            "champions": {"l1": {"run_id": "r1", "version": "1", "uri": "models:/flowers-l1@champion"}}}


def test_render_levels_ablation_and_not_run(tmp_path):
    md = render(_info(), tmp_path)
    assert "| L1 transfer baseline | l1 |" in md and "90.00 | 85.00 | 97.68 | 97.31 |" in md
    assert "| L3 attention pooling | – | – | not run | not run | 98.41 | 97.68 |" in md
    assert "| light | constant | l1 | 90.00 | 85.00 |" in md
    assert "128 px, efficientnet_lite0" in md and "split random" in md and "CPU X, 2 cores" in md
    assert md.count("not run") >= 4  # L2, L3 (x2), L4, L5
    assert (tmp_path / "levels.png").is_file() and (tmp_path / "ablation.png").is_file()


def test_render_l4_l5_when_present(tmp_path):
    stages = {
        "l4-ensemble": {"metrics": {"val_top1": 0.95, "test_top1": 0.94, "member_l1_test_top1": 0.9,
                                    "member_l3_test_top1": 0.91, "mean_disagreement": 0.05}, "params": {}},
        "l5-distill": {"metrics": {"test_top1": 0.9, "int8_test_top1": 0.89, "teacher_test_top1": 0.94,
                                   "latency_fp32_p50_ms": 10.0, "latency_int8_p50_ms": 5.0,
                                   "latency_dynamic_int8_p50_ms": 7.0, "latency_teacher_p50_ms": 80.0},
                       "params": {"model.arch": "mobilenet_v3_large"}},
    }
    md = render(_info(stages), tmp_path)
    assert "| member l1 | 90.00 |" in md and "**94.00**" in md and "mean_disagreement 0.0500" in md
    assert "| student INT8 (static) | 89.00 | 5.0 |" in md and "| teacher | 94.00 | 80.0 |" in md
    assert "| seed student INT8 | – | 59 |" in md


@pytest.mark.slow
def test_report_from_a_real_study(small_study):
    _, outcome = small_study
    text = outcome.report.read_text()
    assert "## L2 ablation grid" in text and "| l1 |" in text
    assert "## L4 ensemble" in text and "member l1" in text  # ensemble ran over l1 + l3
    assert "## L5 student" in text and text.split("## L5 student")[1].strip().splitlines()[-1] == "not run"
    assert (outcome.report.parent / "ablation.png").is_file()
