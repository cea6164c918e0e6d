"""The one training loop on tiny synthetic data: learns, checkpoints, resumes, evaluates."""
import json

import numpy as np
import pytest
import torch

from flowers import config as C
from flowers.evaluation.metrics import compute_metrics, confusion_matrix, expected_calibration_error, most_confused
from flowers.models.checkpoint import load_checkpoint, model_from_checkpoint
from flowers.training.tasks import ClassificationTask, make_task
from flowers.training.loop import fit, lr_lambda, param_groups


def test_smoke_run_lowers_loss_and_writes_artifacts(trained_run):
    hist = trained_run.history
    assert len(hist) == 2
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    d = trained_run.run_dir
    for name in ["best.pt", "last.pt", "config.yaml", "split.json", "metrics.json", "curves.png",
                 "test_confusion.png", "test_confusion.csv", "test_per_class.csv", "test_most_confused.json"]:
        assert (d / name).is_file(), name
    summary = json.loads((d / "metrics.json").read_text())
    assert summary["best_val_acc"] == max(h["val_acc"] for h in hist)
    assert 0.0 <= summary["test"]["top1"] <= 1.0 and summary["test"]["n"] == len(json.loads((d / "split.json").read_text())["test"])


def test_training_learns_clearly_above_chance(smoke_config, synth_root, tmp_path):
    """The loop learns: 5 synthetic classes (chance 20 %), 4 training images each, an offline-pretrained
    EfficientNet-Lite0 at 64 px for 4 epochs. Test accuracy must be at least 60 %: 12 of the 20 test
    images, which a chance-level model reaches with probability 1e-4."""
    cfg = C.replace(smoke_config, {"model.arch": "efficientnet_lite0", "model.pretrained": "packaged",
                                   "optim.lr": 1e-3, "train.epochs": 4})
    res = fit(cfg, make_task(cfg), run_dir=tmp_path / "learn")
    n_test = res.test_metrics["n"]
    assert n_test == 20
    assert res.test_metrics["top1"] >= 0.6, res.test_metrics
    assert res.best_val_acc >= 0.6 and res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_checkpoint_loads_back_and_reproduces(trained_run, smoke_config):
    ckpt = load_checkpoint(trained_run.best_checkpoint)
    assert ckpt["class_names"] and ckpt["preprocessing"]["image_size"] == 64
    assert {"model", "optimizer", "scheduler", "epoch", "config"} <= set(ckpt)
    assert C.build(C.Config, ckpt["config"]) == smoke_config
    net = model_from_checkpoint(ckpt)
    x = torch.randn(2, 3, 64, 64)
    assert net(x).shape == (2, len(ckpt["class_names"]))
    assert ckpt["test_metrics"]["top1"] == pytest.approx(trained_run.test_metrics["top1"])


def test_resume_continues_from_last(smoke_config, tmp_path):
    cfg = C.replace(smoke_config, {"train.epochs": 1})
    first = fit(cfg, make_task(cfg), run_dir=tmp_path / "r", evaluate_test=False)
    cfg3 = C.replace(smoke_config, {"train.epochs": 3})
    seen = []
    res = fit(cfg3, make_task(cfg3), run_dir=tmp_path / "r", resume_from=first.run_dir / "last.pt",
              callback=lambda m, d: seen.append(m["epoch"]), evaluate_test=False)
    assert seen == [2, 3]  # epoch 1 is not rerun
    assert [h["epoch"] for h in res.history] == [1, 2, 3]


def test_attention_level_trains(smoke_config, tmp_path):
    cfg = C.replace(smoke_config, {"model.attention": True, "train.epochs": 1, "data.max_train_batches": 2})
    res = fit(cfg, make_task(cfg), run_dir=tmp_path / "att")
    assert load_checkpoint(res.best_checkpoint)["model_name"] == "attention_mobilenet_v3_small"


def test_missing_data_root_is_a_clear_error(smoke_config, tmp_path):
    from flowers.data import DataError

    cfg = C.replace(smoke_config, {"data.root": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match="nowhere"):
        fit(cfg, make_task(cfg), run_dir=tmp_path / "x")


def test_schedule_shapes():
    opt = C.OptimConfig(schedule="cosine", warmup_epochs=1)
    f = lr_lambda(opt, total_steps=100, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5, abs=0.01) and f(99) < 0.01
    const = lr_lambda(C.OptimConfig(), 100, 10)
    assert {const(s) for s in (0, 50, 99)} == {1.0}


def test_param_groups_split_backbone_head_and_decay():
    from flowers.models import build_model

    m = build_model("mobilenet_v3_small", 4, pretrained=False)
    groups = param_groups(m, C.OptimConfig(lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.05))
    by = {g["name"]: g for g in groups}
    assert by["backbone"]["lr"] == pytest.approx(1e-4) and by["head"]["lr"] == pytest.approx(1e-3)
    assert by["backbone_no_decay"]["weight_decay"] == 0.0 and by["head"]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_classification_task_label_smoothing_raises_loss_on_confident_logits():
    model = torch.nn.Identity()
    x = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    y = torch.tensor([0, 1])
    plain = ClassificationTask(0.0)(model, x, y, None)["loss"]
    smooth = ClassificationTask(0.1)(model, x, y, None)["loss"]
    assert smooth > plain


def test_metrics_on_hand_made_predictions():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    labels = np.array([0, 1, 1, 2])
    m = compute_metrics(probs, labels)
    assert m["top1"] == 0.75 and m["top5"] == 1.0
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.7, 0.8, 0.3, 0.6])))
    cm = confusion_matrix(labels, probs.argmax(1), 3)
    assert cm.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert most_confused(cm, ["a", "b", "c"])[0] == {"true": "b", "predicted": "a", "count": 1, "true_label": 1, "predicted_label": 0}
    # perfectly calibrated: confidence 1 and always right
    assert expected_calibration_error(np.eye(3), np.arange(3)) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([[0.9, 0.1]] * 10), np.ones(10, int)) == pytest.approx(0.9)
