"""`flowers tune`: a hyperparameter search around one level (ASHA early stopping optional); runs `jobs.tune`."""
from __future__ import annotations


def register(sub) -> None:
    from jobs.options import add_tune_arguments

    p = sub.add_parser("tune", help="hyperparameter search for one level with Ray Tune (optional ASHA), tracked in MLflow")
    add_tune_arguments(p)
    p.set_defaults(func=run, heavy=True)


def run(args) -> int:
    from jobs.tune import run

    return run(args)
