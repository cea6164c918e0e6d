"""The robustness step on any registered champions: shift suite + non-flower photos, printed as tables.

    MLFLOW_TRACKING_URI=sqlite:///path/.flowers/mlflow.db FLOWERS_DATA=/path/flowers102 \\
        python bench/robustness.py --per-class 2 --out /tmp/robust-before

Scores `models:/flowers-ensemble@champion` (with its members: the levels) and
`models:/flowers-student@champion` on the study-cpu data config (the same split and seed as
`make run`), like the study's robustness step, and prints the CPU model and flags with the tables
(what docs/robustness.md quotes for a study run before the step existed).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from flowers import config as C
from flowers.evaluation.ood import run_ood
from flowers.evaluation.robustness import run_shift_suite
from flowers.evaluation.shifts import parse_shifts
from flowers.study.robustness_step import default_ood_dir, flat_metrics, report_lines

REPO = Path(__file__).resolve().parents[1]


def cpu_line() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    keep = sorted(f for f in flags if f.startswith(("avx", "amx")))
    return f"{model}; {' '.join(keep)}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", metavar="NAME=URI",
                   help="a model to score (repeatable; default: the champion ensemble and student)")
    p.add_argument("--shifts", default="all")
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--ood-dir", default=str(default_ood_dir()))
    p.add_argument("--out", default="robustness-bench")
    p.add_argument("--no-ood", action="store_true", help="the shift suite only")
    args = p.parse_args()
    data_cfg = C.load_config(REPO / "configs/level1.yaml", "study-cpu").data
    pairs = args.model or ["ensemble=models:/flowers-ensemble@champion", "student=models:/flowers-student@champion"]
    uris = dict(x.split("=", 1) for x in pairs)
    out = Path(args.out)
    t0 = time.perf_counter()
    suite = run_shift_suite(uris, parse_shifts(args.shifts), data_cfg, out, per_class=args.per_class, seed=data_cfg.seed)
    t1 = time.perf_counter()
    ood = None if args.no_ood else run_ood(uris, data_cfg, args.ood_dir, out)
    t2 = time.perf_counter()
    metrics, tags = flat_metrics(suite.tables, ood.tables if ood else {}, {"shift_suite": t1 - t0, "ood": t2 - t1})
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "tags": tags}, indent=1))
    print(f"CPU: {cpu_line()}")
    print("\n".join(report_lines({"metrics": metrics, "tags": tags,
                                  "params": {"test_images": suite.images, "per_class": args.per_class,
                                             "ood_photos": ood.photos if ood else 0, "ood_dir": args.ood_dir}})))
    print()
    print(suite.markdown)
    if ood:
        print()
        print(ood.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
