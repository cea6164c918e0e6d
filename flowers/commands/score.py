"""`flowers score`: score image folders into a Parquet file with Ray Data (see docs/scoring.md); runs `jobs.score`."""
from __future__ import annotations


def register(sub) -> None:
    from jobs.options import add_score_arguments

    p = sub.add_parser("score", help="score image folders into Parquet with Ray Data",
                       description="Score image folders into a Parquet file with Ray Data (see docs/scoring.md).")
    add_score_arguments(p)
    p.set_defaults(func=run, heavy=True)


def run(args) -> int:
    from jobs.score import run

    return run(args)
