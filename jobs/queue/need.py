"""How many CPUs a job declares it needs: its driver plus what its Ray work asks for at most at once.

Read from the entry point's own options and config, without Ray or torch:
- study: the trials that run at once (`resources.max_concurrent`, at most the number of trials) ×
  `resources.cpus_per_trial`, or the L4/L5 stage's `stage_cpus` when larger;
- tune: `--max-concurrent` × `--cpus-per-trial`;
- score: `--workers` × `--cpus-per-worker` (1 CPU unless given: pass --workers to reserve more);
- deploy: 1.
`flowers submit --num-cpus N` overrides all of it.
"""
from __future__ import annotations

import argparse

from jobs import options as O


def _parse(add_arguments, args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    ns, _ = p.parse_known_args(args)
    return ns


def declared_cpus(kind: str, args: list[str], cwd: str | None = None) -> float:
    """CPUs the job `kind` with entry-point arguments `args` will ask Ray for at most at once."""
    if kind == "study":
        from flowers.study.plan import build_trials, load_study

        ns = _parse(O.add_study_arguments, args)
        study, config_dir = load_study(ns.config, ns.profile, ns.overrides)
        res = study.resources
        trials = len(build_trials(study, config_dir)) if "tune" in study.stages else 0
        tune = res.cpus_per_trial * min(res.max_concurrent, max(trials, 1)) if trials else 0.0
        stages = (res.stage_cpus or 1.0) if set(study.stages) - {"tune"} else 0.0
        return max(tune, stages, 0.0)
    if kind == "tune":
        ns = _parse(O.add_tune_arguments, args)
        return float(ns.cpus_per_trial) * min(int(ns.max_concurrent), max(int(ns.samples), 1))
    if kind == "score":
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--workers", type=int)
        p.add_argument("--cpus-per-worker", type=float)
        ns, _ = p.parse_known_args(args)
        return float(ns.workers or 1) * float(ns.cpus_per_worker or 1.0)
    return 1.0
