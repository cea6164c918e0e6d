"""Overhead of Tune + MLflow over a bare `fit()`: the same config, same epochs, 1 trial.

Compares fit's own wall time (bare) with the same fit inside a Tune trial that reports
and checkpoints every epoch while the driver logs to MLflow (target <= 10 %), and
prints the whole Tune experiment wall (worker start included) separately.

    python bench/tune_overhead.py                         # synthetic data, smoke profile
    python bench/tune_overhead.py --real --classes 10 --profile study-cpu
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

# `python bench/X.py` puts bench/ first on the import path
from _common import REPO, data_overrides, write_study  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true")
    p.add_argument("--classes", type=int, default=None)
    p.add_argument("--profile", default=str(REPO / "configs/profiles/smoke.yaml"))
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from flowers.registry import uris as registry
    from flowers.registry import tracking as T
    from flowers.study.plan import build_trials, load_study
    from flowers.training.tasks import make_task
    from flowers.training.loop import fit
    from raylink.connect import connect
    from jobs.tune import run_tune

    over, desc = data_overrides(args.real, args.classes)
    over += [f"train.epochs={args.epochs}", "train.threads=1"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-ovh-"))
    path = write_study(tmp, "overhead", args.profile, over, ablation=None,
                       levels={"l1": str(REPO / "configs/level1.yaml")},
                       resources={"cpus_per_trial": 1, "max_concurrent": 1})
    study, d = load_study(path)
    spec = build_trials(study, d)[0]

    bare = fit(spec.cfg, make_task(spec.cfg), run_dir=tmp / "bare")
    bare_wall = json.loads((tmp / "bare/metrics.json").read_text())["wall_seconds"]
    bare_epochs = sum(h["epoch_seconds"] for h in bare.history)

    connect(num_cpus=2)
    target = T.configure(registry.resolve_target(None, study.home))
    t0 = time.perf_counter()
    run_tune(study, [spec], target)
    exp_wall = time.perf_counter() - t0
    tuned = json.loads((Path(study.home) / "tune/overhead-runs/l1/metrics.json").read_text())
    tune_wall = tuned["wall_seconds"]
    tune_epochs = sum(h["epoch_seconds"] for h in tuned["history"])
    print(f"data: {desc}; profile {Path(args.profile).name}, {args.epochs} epochs, 1 thread")
    print(f"bare fit():          wall {bare_wall:.1f} s, epochs {bare_epochs:.1f} s")
    print(f"fit() in Tune+MLflow: wall {tune_wall:.1f} s, epochs {tune_epochs:.1f} s "
          f"(whole experiment incl. worker start {exp_wall:.1f} s)")
    print(f"overhead of Tune+MLflow on fit wall: {100 * (tune_wall / bare_wall - 1):+.1f} % (target <= 10 %)")


if __name__ == "__main__":
    main()
