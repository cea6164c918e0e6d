"""L5: distil the teacher (usually the L4 ensemble) into a small student, export it, judge it.

The student trains in the shared loop with `flowers.training.tasks.DistillationTask` (the KD loss and
the teacher modes are documented there); this stage then exports fp32/INT8 ONNX and
TorchScript, evaluates every variant and the teacher on test (each with its own
preprocessing), measures batch-1 latency, and runs the shared stage tail.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flowers import config as C
from flowers.models.checkpoint import PER_IMAGE, per_image_record, read_manifest, write_json
from flowers.data.bundle import build_data
from flowers.evaluation.metrics import compute_metrics, write_eval_artifacts
from flowers.inference.export import REGISTERED_NAME, export_student, sync_onnx_metadata
from flowers.inference.onnx_models import latency, load_variant
from flowers.inference.predict import LoadedModel, load_model, predict_dataset
from flowers.registry.uris import ModelRef
from flowers.training.stages import Explained, StageResult, stage_tail
from flowers.training.tasks import DistillationTask
from flowers.training.loop import fit

log = logging.getLogger(__name__)

FP32_PER_IMAGE = "test_per_image_fp32.json"  # the fp32 student's per-image test results (a stage artifact)


# ----------------------------------------------------------------------------- the L5 stage


def batch1_latency(models: dict[str, LoadedModel], iters: int) -> dict[str, float]:
    """Batch-1 p50/p95 latency of each model, one process, this machine (contention from other
    processes shows in p95); the teacher runs fewer iterations. Plus the INT8 speed-up over the teacher."""
    out: dict[str, float] = {}
    for key, m in models.items():
        lat = latency(m.predict_proba, m.example_batch(1), iters=iters if key != "teacher" else max(5, iters // 5))
        out[f"latency_{key}_p50_ms"], out[f"latency_{key}_p95_ms"] = lat["p50_ms"], lat["p95_ms"]
    out["speedup_int8_vs_teacher"] = out["latency_teacher_p50_ms"] / out["latency_int8_p50_ms"]
    return out


def stage_params(cfg: C.Config, task: DistillationTask, policy: str, target: float) -> dict[str, Any]:
    """The L5 run's params: how it distilled, then the flat config."""
    params: dict[str, Any] = {"distill_mode": task.mode, "teacher": cfg.distill.teacher, "temperature": task.T,
                              "alpha": task.alpha, "student": cfg.model.name, "uncertainty_policy": policy,
                              "uncertainty_target": target}
    params.update({k: v for k, v in C.to_flat_dict(cfg).items() if isinstance(v, (str, int, float, bool)) or v is None})
    return params


def run_distill_stage(cfg: C.Config, out_dir: Path, callback: Callable | None = None,
                      threshold_policy: str = "coverage", threshold_target: float = 0.95,
                      latency_iters: int = 50, explain_images: int = 8, export_kwargs: dict | None = None,
                      ood_images: int = 32, teacher: "ModelRef | None" = None) -> StageResult:
    """Distil (fit with DistillationTask) → export fp32/INT8 ONNX + TorchScript → threshold on val →
    evaluate fp32, INT8, dynamic INT8 and the teacher on test → batch-1 latency. Returns the
    exported student folder (manifest kind `onnx`, file = static INT8) with flat metrics."""
    if cfg.task != "distill":
        cfg = C.replace(cfg, {"task": "distill"})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = DistillationTask.from_config(cfg, teacher)
    res = fit(cfg, task, callback=callback, run_dir=out_dir / "train")

    student = load_model(res.best_checkpoint)
    pp = student.preprocessing
    data = build_data(cfg.data, pp, seed=cfg.train.seed)
    model_dir = export_student(res.best_checkpoint, out_dir / "model", data.eval_part("train"),
                               extra={"teacher": cfg.distill.teacher, "distill_mode": task.mode,
                                      "lineage": {"parents": [{"name": task.teacher.name, "version": task.teacher.version,
                                                               "uri": cfg.distill.teacher}]}},
                               **{"int8_recipe": cfg.distill.int8_recipe, **(export_kwargs or {})})
    variants = {"int8": load_variant(model_dir, "int8"), "dynamic_int8": load_variant(model_dir, "dynamic_int8"),
                "onnx_fp32": load_variant(model_dir, "fp32")}
    bs, nw = cfg.data.eval_batch_size, cfg.data.workers

    def on(model: LoadedModel, split: str) -> tuple[np.ndarray, np.ndarray]:
        # every model on the images in its own eval preprocessing (teacher and student sizes may differ)
        ds = data.eval_part(split, model.transform(), model.draft_size)
        return predict_dataset(model.predict_proba, ds, batch_size=bs, workers=nw)

    val_int8, val_labels = on(variants["int8"], "val")
    probs, labels = {}, np.asarray(data.test.labels)
    for k, m in {"fp32": student, **variants, "teacher": task.teacher}.items():
        probs[k] = on(m, "test")[0]

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

    metrics.update(batch1_latency({"fp32": student, **variants, "teacher": task.teacher}, latency_iters))

    # the deployed (INT8) model's per-image results: the registry gate compares versions on them;
    # the fp32 student's go alongside, so the report can pair INT8 with fp32 image by image
    write_json(model_dir / PER_IMAGE, per_image_record(data.test.paths, labels, probs["int8"].argmax(1)))
    fp32_record = write_json(out_dir / FP32_PER_IMAGE, per_image_record(data.test.paths, labels,
                                                                        probs["fp32"].argmax(1)))
    # uncertainty on the deployed (INT8) model: threshold on val, judged on test
    metrics, tail_files = stage_tail(
        out_dir, model_dir, variants["int8"], (val_int8, val_labels), (probs["int8"], labels),
        {"student int8": probs["int8"], "student fp32": probs["fp32"], "teacher": probs["teacher"]},
        policy=threshold_policy, target=threshold_target, ood_images=ood_images,
        explain=[Explained("student", student, data.eval_part("test"), probs["fp32"])],
        explain_images=explain_images, metrics=metrics,
        manifest={"test_accuracy": metrics["int8_test_top1"], "data": data.source})
    sync_onnx_metadata(model_dir)  # the threshold chosen above travels inside the ONNX files too
    artifacts = list(files.values()) + tail_files + [fp32_record]
    quant = read_manifest(model_dir).get("quantization") or {}
    validated = quant.get("validated_on") or {}
    params = stage_params(cfg, task, threshold_policy, threshold_target)
    log.info("student fp32 %.4f, int8 %.4f, teacher %.4f; int8 p50 %.2f ms vs teacher %.1f ms",
             metrics["test_top1"], metrics["int8_test_top1"], metrics["teacher_test_top1"],
             metrics["latency_int8_p50_ms"], metrics["latency_teacher_p50_ms"])
    return StageResult(model_dir=model_dir, metrics={k: float(v) for k, v in metrics.items()}, params=params,
                       artifacts=artifacts + [res.best_checkpoint, res.run_dir / "curves.png",
                                              res.run_dir / "datasets.json"],
                       tags={"stage": "l5", "registered_name": REGISTERED_NAME, "distill_mode": task.mode,
                             "int8_recipe": str(quant.get("recipe")), "int8_saturation_safe": str(quant.get("saturation_safe")),
                             "int8_validated_on": f"{validated.get('cpu')} ({' '.join(validated.get('flags') or [])})"})
