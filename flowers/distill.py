"""L5: knowledge distillation into a small student, as a task in the shared training loop.

loss = α·T²·KL(teacher_T ‖ student_T) + (1 − α)·CE(student, labels)   (Hinton et al. 2015)

The T² keeps the KD gradients on the same scale as the CE gradients when T changes.

Teacher signal, two modes (recorded as the `distill_mode` param of the stage):

- `cache_teacher: true` (default): the teacher (usually the L4 ensemble: three ResNet-50s) runs
  ONCE per training image before training, with the eval transform (resize + centre crop, no
  augmentation); its probabilities are kept in memory keyed by dataset index. Trade-off: the
  student sees augmented crops but is matched to the teacher's view of the whole image, so the
  target ignores what the crop cut off. In exchange an epoch costs only the student's
  forward/backward instead of three ResNet-50 forwards per batch, which on a CPU is the
  difference between minutes and hours.
- `cache_teacher: false`: the teacher runs on the same augmented batch every step (exact KD).
  The loop hands tasks the *normalized* float batch; the teacher needs the raw uint8 batch
  (its own preprocessing and its own normalization, possibly another mean/std or size). The
  normalization is an affine map of uint8 values, so inverting it and rounding recovers the
  uint8 pixels exactly; that keeps the training loop unchanged and every teacher kind
  (checkpoint, ensemble, ONNX) usable through its one `predict_proba(uint8)` interface.

Teachers return probabilities (an ensemble has no single set of logits); tempering them uses
softmax(log p / T), which equals softmax(z / T) for any logits z with softmax(z) = p.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowers import config as C
from flowers.stages import StageResult

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- loss


def _looks_like_probs(t: torch.Tensor) -> bool:
    return bool((t >= 0).all() and torch.allclose(t.sum(-1), torch.ones_like(t[..., 0]), atol=1e-3))


def kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, T: float,
            alpha: float, teacher_is_logits: bool | None = None) -> torch.Tensor:
    """α·T²·KL(teacher_T ‖ student_T) + (1 − α)·CE; `teacher` holds probabilities or logits
    (auto-detected unless `teacher_is_logits` says which)."""
    teacher = teacher.detach().float()
    if teacher_is_logits is None:
        teacher_is_logits = not _looks_like_probs(teacher)
    # log-probabilities at T=1 either way; log p is a valid set of logits for p
    t_logits = teacher if teacher_is_logits else torch.log(teacher.clamp_min(1e-30))
    t_log_T = F.log_softmax(t_logits / T, dim=-1)
    s_log_T = F.log_softmax(student_logits.float() / T, dim=-1)
    kl = F.kl_div(s_log_T, t_log_T, reduction="batchmean", log_target=True)
    loss = alpha * T * T * kl
    if alpha < 1.0:
        if labels is None:
            raise ValueError("labels are needed when alpha < 1")
        loss = loss + (1.0 - alpha) * F.cross_entropy(student_logits.float(), labels)
    return loss


# ----------------------------------------------------------------------------- task


class DistillationTask:
    """Task for `flowers.train.fit`: the student learns from a teacher model loaded by URI."""

    name = "distill"

    def __init__(self, teacher_uri: str, temperature: float = 4.0, alpha: float = 0.7, cache_teacher: bool = True,
                 batch_size: int = 64, workers: int = 0, progress: bool = False) -> None:
        self.teacher_uri = teacher_uri
        self.T = float(temperature)
        self.alpha = float(alpha)
        self.cache_teacher = cache_teacher
        self.batch_size = batch_size
        self.workers = workers
        self.progress = progress
        self.teacher = None
        self.cache: torch.Tensor | None = None
        self.mode = "cached" if cache_teacher else "online"
        self.setup_seconds = 0.0
        self._unnorm: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_config(cls, cfg: C.Config) -> "DistillationTask":
        if not cfg.distill.teacher:
            raise C.ConfigError("distill.teacher: a teacher model URI is required (e.g. --set distill.teacher=models:/flowers-ensemble@champion)")
        return cls(cfg.distill.teacher, cfg.distill.temperature, cfg.distill.alpha, cfg.distill.cache_teacher,
                   cfg.data.eval_batch_size, cfg.data.workers, cfg.train.progress)

    def setup(self, data, device: torch.device) -> None:
        """Load the teacher, check its classes, and (cached mode) precompute its probabilities."""
        from flowers.predict import load_model

        t0 = time.perf_counter()
        self.teacher = load_model(self.teacher_uri, "cpu" if device.type == "cpu" else str(device))
        if list(self.teacher.class_names) != list(data.class_names):
            raise C.ConfigError(
                f"distill.teacher '{self.teacher_uri}' predicts {len(self.teacher.class_names)} classes but the "
                f"student's data has {len(data.class_names)} (or another order); distill on the teacher's dataset")
        pp = data.preprocessing
        # x_norm = u * scale - shift  (flowers.data.transforms.Normalize)  →  u = (x_norm + shift) / scale
        scale = 1.0 / (255.0 * torch.tensor(pp.std).view(1, 3, 1, 1))
        shift = (torch.tensor(pp.mean) / torch.tensor(pp.std)).view(1, 3, 1, 1)
        self._unnorm = (scale.to(device), shift.to(device))
        if self.cache_teacher:
            self.cache = self.teacher_probs_for(data).to(device)
        self.setup_seconds = time.perf_counter() - t0
        log.info("distillation teacher %s (%s mode) ready in %.1fs", self.teacher_uri, self.mode, self.setup_seconds)

    @torch.inference_mode()
    def teacher_probs_for(self, data) -> torch.Tensor:
        """Teacher probabilities for every training image, in dataset order (eval transform, teacher's size)."""
        from torch.utils.data import DataLoader

        from flowers.data import LabeledImages
        from flowers.data.transforms import eval_transform
        from flowers.train import _bar

        tp = self.teacher.preprocessing
        ds = LabeledImages(data.train.paths, data.train.labels, eval_transform(tp), draft_size=tp.resize_size)
        loader = DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.workers)
        out = torch.empty(len(ds), len(data.class_names))
        for x, _, idx in _bar(loader, self.progress, desc="teacher cache"):
            out[idx] = torch.from_numpy(np.asarray(self.teacher.predict_proba(x), dtype=np.float32))
        return out

    def _online(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self._unnorm
        u8 = ((x.detach().float() + shift) / scale).round().clamp(0, 255).to(torch.uint8)
        size = self.teacher.preprocessing.image_size
        if u8.shape[-1] != size:
            u8 = F.interpolate(u8.float(), size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
        with torch.inference_mode():
            p = self.teacher.predict_proba(u8.cpu())
        return torch.from_numpy(np.asarray(p, dtype=np.float32)).to(x.device)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            raise RuntimeError("DistillationTask.setup() must run before training")
        logits = model(x)
        teacher = self.cache[idx.to(self.cache.device)] if self.cache is not None else self._online(x)
        return {"loss": kd_loss(logits, teacher, y, self.T, self.alpha, teacher_is_logits=False), "logits": logits}


# ----------------------------------------------------------------------------- the L5 stage


def _probs(model, paths, labels, pp, batch_size: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """A model's probabilities on images with ITS preprocessing (teacher and student sizes may differ)."""
    from flowers.data import LabeledImages
    from flowers.data.transforms import eval_transform
    from flowers.evaluate_model import probabilities

    ds = LabeledImages(paths, labels, eval_transform(pp), draft_size=pp.resize_size)
    return probabilities(model, ds, batch_size, workers, progress=False)


def run_distill_stage(cfg: C.Config, out_dir: Path, callback: Callable | None = None,
                      threshold_policy: str = "coverage", threshold_target: float = 0.9,
                      latency_iters: int = 50, explain_images: int = 8, export_kwargs: dict | None = None,
                      ood_images: int = 32) -> StageResult:
    """Distil (fit with DistillationTask) → export fp32/INT8 ONNX + TorchScript → threshold on val →
    evaluate fp32, INT8, dynamic INT8 and the teacher on test → batch-1 latency. Returns the
    exported student folder (manifest kind `onnx`, file = static INT8) with flat metrics."""
    from flowers import uncertainty as U
    from flowers.evaluate import compute_metrics, write_eval_artifacts
    from flowers.export import export_student, latency, load_variant, update_manifest
    from flowers.predict import load_model
    from flowers.train import build_data, fit

    if cfg.task != "distill":
        cfg = C.replace(cfg, {"task": "distill"})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = DistillationTask.from_config(cfg)
    res = fit(cfg, task=task, callback=callback, run_dir=out_dir / "train")

    student = load_model(res.best_checkpoint)
    pp = student.preprocessing
    data = build_data(cfg.data, pp, seed=cfg.train.seed)
    model_dir = export_student(res.best_checkpoint, out_dir / "model", data.eval_part("train"),
                               extra={"teacher": cfg.distill.teacher, "distill_mode": task.mode},
                               **(export_kwargs or {}))
    variants = {"int8": load_variant(model_dir, "int8"), "dynamic_int8": load_variant(model_dir, "dynamic_int8"),
                "onnx_fp32": load_variant(model_dir, "fp32")}
    bs, nw = cfg.data.eval_batch_size, cfg.data.workers
    torch.set_grad_enabled(False)
    test_paths, test_labels = data.test.paths, data.test.labels
    val_int8, val_labels = _probs(variants["int8"], data.val.paths, data.val.labels, pp, bs, nw)
    probs = {"fp32": _probs(student, test_paths, test_labels, pp, bs, nw)[0]}
    for k, m in variants.items():
        probs[k] = _probs(m, test_paths, test_labels, pp, bs, nw)[0]
    probs["teacher"] = _probs(task.teacher, test_paths, test_labels, task.teacher.preprocessing, bs, nw)[0]
    labels = np.asarray(test_labels)

    metrics: dict[str, float] = {}
    test_m, files = write_eval_artifacts(probs["int8"], labels, data.class_names, out_dir, prefix="test_int8")
    fp = compute_metrics(probs["fp32"], labels)
    metrics.update({"test_top1": fp["top1"], "test_top5": fp["top5"], "test_nll": fp["nll"], "test_ece": fp["ece"],
                    "val_top1": res.best_val_acc,
                    "int8_test_top1": test_m["top1"], "int8_test_top5": test_m["top5"], "int8_test_nll": test_m["nll"],
                    "onnx_fp32_test_top1": compute_metrics(probs["onnx_fp32"], labels)["top1"],
                    "dynamic_int8_test_top1": compute_metrics(probs["dynamic_int8"], labels)["top1"],
                    "teacher_test_top1": compute_metrics(probs["teacher"], labels)["top1"],
                    "int8_agreement": float((probs["int8"].argmax(1) == probs["fp32"].argmax(1)).mean()),
                    "student_teacher_agreement": float((probs["fp32"].argmax(1) == probs["teacher"].argmax(1)).mean()),
                    "teacher_setup_seconds": task.setup_seconds})
    metrics["int8_drop_points"] = 100 * (metrics["test_top1"] - metrics["int8_test_top1"])
    metrics["student_gap_to_teacher_points"] = 100 * (metrics["teacher_test_top1"] - metrics["test_top1"])

    # uncertainty on the deployed (INT8) model: threshold on val, judged on test
    thr = U.choose_threshold(val_int8, val_labels, threshold_policy, threshold_target)
    metrics["uncertainty_threshold"] = thr
    metrics.update(U.selective_summary(probs["int8"], labels, thr))
    curves = {"student int8": U.risk_coverage(probs["int8"], labels), "student fp32": U.risk_coverage(probs["fp32"], labels),
              "teacher": U.risk_coverage(probs["teacher"], labels)}
    artifacts = list(files.values())
    artifacts.append(U.plot_risk_coverage(curves, out_dir / "test_risk_coverage.png", metrics["coverage_at_threshold"]))
    metrics.update(U.ood_report(variants["int8"].predict_proba, probs["int8"], pp.image_size, n=ood_images, threshold=thr))

    # batch-1 latency, one process, same machine (contention from other processes shows in p95)
    x1 = torch.randint(0, 256, (1, 3, pp.image_size, pp.image_size), dtype=torch.uint8)
    xt = F.interpolate(x1.float(), size=(task.teacher.preprocessing.image_size,) * 2).to(torch.uint8)
    for key, fn, x in (("fp32", student.predict_proba, x1), ("int8", variants["int8"].predict_proba, x1),
                       ("dynamic_int8", variants["dynamic_int8"].predict_proba, x1),
                       ("onnx_fp32", variants["onnx_fp32"].predict_proba, x1),
                       ("teacher", task.teacher.predict_proba, xt)):
        lat = latency(fn, x, iters=latency_iters if key != "teacher" else max(5, latency_iters // 5))
        metrics[f"latency_{key}_p50_ms"] = lat["p50_ms"]
        metrics[f"latency_{key}_p95_ms"] = lat["p95_ms"]
    metrics["speedup_int8_vs_teacher"] = metrics["latency_teacher_p50_ms"] / metrics["latency_int8_p50_ms"]
    torch.set_grad_enabled(True)

    if explain_images:
        from flowers.explain import explain_dataset

        artifacts += explain_dataset(student, data.eval_part("test"), probs["fp32"], labels, out_dir / "explain",
                                     n=explain_images, pairs=min(3, explain_images))
    update_manifest(model_dir, uncertainty_threshold=thr, test_accuracy=metrics["int8_test_top1"],
                    uncertainty_policy={"policy": threshold_policy, "target": threshold_target},
                    data=data.source, metrics={k: v for k, v in metrics.items() if np.isfinite(v)})
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    params: dict[str, Any] = {"distill_mode": task.mode, "teacher": cfg.distill.teacher, "temperature": task.T,
                              "alpha": task.alpha, "student": cfg.model.name, "uncertainty_policy": threshold_policy,
                              "uncertainty_target": threshold_target}
    params.update({k: v for k, v in C.to_flat_dict(cfg).items() if isinstance(v, (str, int, float, bool)) or v is None})
    log.info("student fp32 %.4f, int8 %.4f, teacher %.4f; int8 p50 %.2f ms vs teacher %.1f ms",
             metrics["test_top1"], metrics["int8_test_top1"], metrics["teacher_test_top1"],
             metrics["latency_int8_p50_ms"], metrics["latency_teacher_p50_ms"])
    return StageResult(model_dir=model_dir, metrics={k: float(v) for k, v in metrics.items()}, params=params,
                       artifacts=artifacts + [res.best_checkpoint, res.run_dir / "curves.png"],
                       tags={"stage": "l5", "registered_name": "flowers-student", "distill_mode": task.mode})
