"""L5 distillation: KD loss properties, the online teacher path, and a 1-epoch smoke stage end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowers import config as C
from flowers.training.tasks import DistillationTask, kd_loss


def test_kd_loss_zero_when_student_equals_teacher_alpha_one():
    logits = torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    assert kd_loss(logits, logits, y, T=4.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)
    # teacher given as probabilities: tempering p equals tempering the logits
    assert kd_loss(logits, torch.softmax(logits, 1), y, T=4.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-5)
    # alpha = 0 is plain cross-entropy
    assert kd_loss(logits, torch.randn(6, 5), y, 2.0, 0.0).item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_kd_loss_t_squared_scaling_and_gradients():
    torch.manual_seed(0)
    s = torch.randn(8, 5, requires_grad=True)
    t = torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    for T in (1.0, 2.0, 4.0):
        kl = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
        assert kd_loss(s, t, y, T, 1.0, teacher_is_logits=True).item() == pytest.approx(T * T * kl.item(), rel=1e-5)
    loss = kd_loss(s, t, y, 4.0, 0.7, teacher_is_logits=True)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert loss.item() > 0


def test_online_teacher_sees_exact_uint8_batch(synth_root, monkeypatch):
    """Online mode inverts the loop's normalization: the teacher gets the original pixels back."""
    from flowers.inference import predict
    from flowers.training import tasks
    from flowers.data.bundle import build_data
    from flowers.data.transforms import Normalize, Preprocessing

    pp = Preprocessing.for_size(64)
    data = build_data(C.DataConfig(root=str(synth_root), split="official", image_size=64), pp)
    seen = []

    def proba(x):
        seen.append(x)
        return np.full((len(x), len(data.class_names)), 1 / len(data.class_names), dtype=np.float32)

    teacher = predict.LoadedModel(proba, Preprocessing.for_size(64, (0.5,) * 3, (0.5,) * 3), list(data.class_names), "t")
    monkeypatch.setattr(tasks, "load_model", lambda uri, device="cpu": teacher)
    task = DistillationTask("fake://teacher", temperature=2.0, alpha=0.5, cache_teacher=False)
    task.setup(data, torch.device("cpu"))
    u8 = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    x = Normalize(pp.mean, pp.std)(u8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, len(data.class_names)))
    out = task(model, x, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    assert torch.equal(seen[0], u8)
    out["loss"].backward()
    assert task.mode == "online"


def test_online_teacher_of_another_size_gets_its_own_eval_preprocessing(synth_root, monkeypatch):
    """A 48 px teacher sees the student's 64 px augmented pixels resized and centre-cropped as in its
    own eval transform (resize short side to 55, crop 48), not a plain resize of the student's crop."""
    from flowers.inference import predict
    from flowers.training import tasks
    from flowers.data.bundle import build_data
    from flowers.data.transforms import Normalize, Preprocessing, resize_crop

    pp = Preprocessing.for_size(64)
    data = build_data(C.DataConfig(root=str(synth_root), split="official", image_size=64), pp)
    tpp = Preprocessing.for_size(48)
    seen = []

    def proba(x):
        seen.append(x)
        return np.full((len(x), len(data.class_names)), 1 / len(data.class_names), dtype=np.float32)

    teacher = predict.LoadedModel(proba, tpp, list(data.class_names), "t")
    monkeypatch.setattr(tasks, "load_model", lambda uri, device="cpu": teacher)
    task = DistillationTask("fake://teacher", cache_teacher=False)
    task.setup(data, torch.device("cpu"))
    u8 = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, len(data.class_names)))
    task(model, Normalize(pp.mean, pp.std)(u8), torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert seen[0].shape == (2, 3, 48, 48) and tpp.resize_size == 55
    assert torch.equal(seen[0], resize_crop(tpp)(u8))


def test_teacher_class_mismatch_is_a_config_error(synth_root, monkeypatch):
    from flowers.inference import predict
    from flowers.training import tasks
    from flowers.data.bundle import build_data
    from flowers.data.transforms import Preprocessing

    data = build_data(C.DataConfig(root=str(synth_root), split="official", image_size=64), Preprocessing.for_size(64))
    teacher = predict.LoadedModel(lambda x: None, Preprocessing.for_size(64), ["a", "b"], "t")
    monkeypatch.setattr(tasks, "load_model", lambda uri, device="cpu": teacher)
    with pytest.raises(C.ConfigError, match="classes"):
        DistillationTask("fake://teacher").setup(data, torch.device("cpu"))


@pytest.mark.slow
def test_smoke_distillation_stage_end_to_end(trained_checkpoint, smoke_overrides, tmp_path):
    """Teacher = an ensemble of the smoke checkpoint; 1 epoch through fit, export, evaluation, latency."""
    from flowers.training.distill import run_distill_stage
    from flowers.training.ensemble import build_ensemble
    from flowers.inference.predict import load_model

    teacher = build_ensemble([str(trained_checkpoint)], tmp_path / "teacher")
    cfg = C.load_config("configs/level5.yaml", "configs/profiles/smoke.yaml",
                        smoke_overrides + [f"distill.teacher={teacher}", "train.epochs=1", "model.arch=mobilenet_v3_small",
                                           "model.pretrained=false"])
    res = run_distill_stage(cfg, tmp_path / "l5", latency_iters=5, export_kwargs={"calibration_size": 16},
                            ood_images=4, explain_images=0)
    m = res.metrics
    for key in ("test_top1", "int8_test_top1", "dynamic_int8_test_top1", "teacher_test_top1", "latency_fp32_p50_ms",
                "latency_int8_p50_ms", "latency_dynamic_int8_p50_ms", "latency_teacher_p50_ms", "int8_agreement",
                "uncertainty_threshold", "entropy_auroc", "coverage_at_threshold"):
        assert key in m and np.isfinite(m[key]) or key == "entropy_auroc", key
    assert res.params["distill_mode"] == "cached"
    manifest = json.loads((res.model_dir / "flowers_model.json").read_text())
    assert manifest["kind"] == "onnx" and manifest["file"] == "model_int8.onnx"
    assert manifest["uncertainty_threshold"] == pytest.approx(m["uncertainty_threshold"])
    assert manifest["teacher"] == str(teacher) and manifest["distill_mode"] == "cached"
    ckpt = torch.load(tmp_path / "l5" / "train" / "best.pt", weights_only=False)
    assert ckpt["task"] == "distill"
    loaded = load_model(res.model_dir)
    assert loaded.meta["kind"] == "onnx" and loaded.class_names == manifest["class_names"]
