"""`flowers study`: the whole study (Tune trials, registry, L4/L5 stages, report); runs `jobs.study`."""
from __future__ import annotations


def register(sub) -> None:
    from jobs.options import add_study_arguments

    p = sub.add_parser("study", help="run the study: L1, L2 ablation grid, L3 in parallel (Tune), then L4/L5; MLflow + report",
                       description="Runs on a local Ray and the embedded MLflow store (.flowers/) unless --address / "
                                   "--tracking-uri say otherwise. Data: $FLOWERS_DATA or --set data.root=DIR.")
    add_study_arguments(p)
    p.set_defaults(func=run, heavy=True)


def run(args) -> int:
    from jobs.study import run

    return run(args)
