"""Wall time of the L2 ablation grid (8 trials) with 2 concurrent trials (1 CPU each) vs 1 (2 CPUs).

    python bench/ablation_parallel.py                    # synthetic data, smoke-size model
    python bench/ablation_parallel.py --real --classes 10 --profile study-cpu   # FLOWERS_DATA
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

# `python bench/X.py` puts bench/ first on the import path
from _common import REPO, data_overrides, write_study  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="use FLOWERS_DATA instead of synthetic data")
    p.add_argument("--classes", type=int, default=None, help="with --real: keep the first N classes")
    p.add_argument("--profile", default=str(REPO / "configs/profiles/smoke.yaml"))
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from flowers.registry import uris as registry
    from flowers.registry import tracking as T
    from flowers.study.plan import build_trials, load_study
    from raylink.connect import connect
    from jobs.tune import run_tune

    over, desc = data_overrides(args.real, args.classes)
    over.append(f"train.epochs={args.epochs}")
    connect(num_cpus=2)
    times = {}
    for conc in (2, 1):
        tmp = Path(tempfile.mkdtemp(prefix="bench-abl-"))
        path = write_study(tmp, f"abl{conc}", args.profile, over,
                           resources={"cpus_per_trial": 2 / conc, "max_concurrent": conc})
        study, d = load_study(path)
        target = T.configure(registry.resolve_target(None, study.home))
        specs = build_trials(study, d)
        t0 = time.perf_counter()
        failed = run_tune(study, specs, target)
        times[conc] = time.perf_counter() - t0
        print(f"{len(specs)} trials, {conc} concurrent x {2 / conc:g} CPU: {times[conc]:.1f} s (failed: {failed})", flush=True)
    print(f"data: {desc}; profile {Path(args.profile).name}, {args.epochs} epoch(s)")
    print(f"ablation grid wall: 2 concurrent {times[2]:.1f} s vs 1 concurrent {times[1]:.1f} s "
          f"-> speed-up x{times[1] / times[2]:.2f}")


if __name__ == "__main__":
    main()
