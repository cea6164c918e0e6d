"""`flowers score`: score image folders into a Parquet file with Ray Data (see docs/scoring.md)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `flowers score` and `python -m jobs.score`."""
    p.add_argument("dirs", nargs="+", metavar="DIR", help="image folders, searched recursively "
                   "(.jpg .jpeg .png .webp .bmp, any case)")
    p.add_argument("--model", required=True, help="models:/name@alias, models:/name/3, runs:/..., or a path")
    p.add_argument("--out", required=True, help="output Parquet file (written atomically)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("--workers", type=int, default=None,
                   help="model actors (default: one per cluster CPU, at most one per batch)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs (= torch threads) per actor (default: cluster CPUs / workers)")
    p.add_argument("--top-k", type=int, default=5, help="labels and probabilities kept per image (default 5)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, a running local cluster, or a new local Ray)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="keep the rows already in --out and score only the rest")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar/log lines")


def register(sub) -> None:
    p = sub.add_parser("score", help="score image folders into Parquet with Ray Data",
                       description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run, heavy=True)


def run(args) -> int:
    from flowers.predict import export_model_store
    from flowers.scoring import score_folders

    export_model_store([args.model])
    summary = score_folders(args.dirs, args.model, args.out, batch_size=args.batch_size, workers=args.workers,
                            cpus_per_worker=args.cpus_per_worker, top_k=args.top_k, resume=args.resume,
                            overwrite=args.overwrite, address=args.address, progress=args.progress)
    print(summary.line())
    return 0
