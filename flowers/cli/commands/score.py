"""`flowers score`: images (folders, s3:// prefixes, listings) into Parquet, in-process or with Ray Data, via `jobs.score`."""
from __future__ import annotations


def register(sub) -> None:
    from jobs.options import add_score_arguments

    p = sub.add_parser("score", help="score images (folders, s3:// prefixes, listings) into Parquet",
                       description="Score images into a Parquet file, or a dataset folder of part files: small local "
                                   "jobs in this process, the rest with Ray Data (see docs/scoring.md).")
    add_score_arguments(p)
    p.set_defaults(func=run, heavy=True)


def run(args) -> int:
    from jobs.score import run

    return run(args)
