"""`flowers distill`: L5 knowledge distillation, export (ONNX fp32/INT8, TorchScript), evaluation and latency."""
from __future__ import annotations

import json
import time
from pathlib import Path

from flowers.cli.commands import add_config_args


def register(sub) -> None:
    p = sub.add_parser("distill", help="L5: distil a teacher (ensemble) into a small student and export it as INT8 ONNX",
                       description="Train the student with the distillation task (configs/level5.yaml), export ONNX "
                                   "fp32 + static INT8 + dynamic INT8 + TorchScript, choose the uncertainty threshold on "
                                   "val, evaluate student/INT8/teacher on test and measure batch-1 latency.")
    add_config_args(p)
    p.add_argument("--out", help="output folder (default: train.out_dir/l5-<time>); the student goes to OUT/model")
    p.add_argument("--policy", choices=["coverage", "accuracy"], default="coverage", help="uncertainty threshold policy")
    p.add_argument("--target", type=float, default=0.95, help="target coverage / selective accuracy (default 0.95: at most 5 %% of validation images flagged)")
    p.add_argument("--explain", type=int, default=8, metavar="N", help="Grad-CAM grids for N test images (0: none)")
    p.set_defaults(func=run, heavy=True)


def run(args) -> int:
    from flowers.config import load_config
    from flowers.training.distill import run_distill_stage

    cfg = load_config(args.config or "configs/level5.yaml", args.profile, args.overrides)
    out = Path(args.out or Path(cfg.train.out_dir) / f"{cfg.level}-{time.strftime('%Y%m%d-%H%M%S')}")
    res = run_distill_stage(cfg, out, threshold_policy=args.policy, threshold_target=args.target,
                            explain_images=args.explain)
    keys = ["test_top1", "int8_test_top1", "dynamic_int8_test_top1", "teacher_test_top1", "int8_agreement",
            "latency_fp32_p50_ms", "latency_onnx_fp32_p50_ms", "latency_dynamic_int8_p50_ms", "latency_int8_p50_ms",
            "latency_teacher_p50_ms", "uncertainty_threshold", "coverage_at_threshold", "entropy_auroc"]
    print(json.dumps({"distill_mode": res.params["distill_mode"],
                      **{k: round(res.metrics[k], 4) for k in keys if k in res.metrics}}, indent=2))
    print(f"student: {res.model_dir} (flowers_model.json, model_int8.onnx)")
    return 0
