"""`flowers study`: the whole study (Tune trials, registry, L4/L5 stages, report)."""
from __future__ import annotations


def register(sub) -> None:
    from flowers.study import add_study_args

    p = sub.add_parser("study", help="run the study: L1, L2 ablation grid, L3 in parallel (Tune), then L4/L5; MLflow + report",
                       description="Runs on a local Ray and the embedded MLflow store (.flowers/) unless --address / "
                                   "--tracking-uri say otherwise. Data: $FLOWERS_DATA or --set data.root=DIR.")
    add_study_args(p)
    p.set_defaults(func=run, heavy=True)


def run(args) -> int:
    from flowers.study import main_from_args

    return main_from_args(args)
