"""Command-line options of the entry points, shared by `python -m jobs.X` and `flowers X`.

No Ray or torch here: the `flowers` CLI builds every parser at start-up and stays fast.
"""
from __future__ import annotations

import argparse

from flowers.config import ResourcesConfig, ScoreConfig, SearchConfig

# what `flowers submit` can queue: `python -m jobs.<name>`
ENTRYPOINTS = ("study", "tune", "score", "deploy")


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    """`flowers study` / `python -m jobs.study`."""
    p.add_argument("--config", "-c", default="configs/study.yaml", help="study YAML (default configs/study.yaml)")
    p.add_argument("--profile", "-p", help="profile merged into every trial config, e.g. study-cpu or smoke")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="study.KEY=VALUE changes the study; other keys change every trial config (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study (Tuner.restore)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under .flowers/)")


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """`flowers tune` / `python -m jobs.tune`: a search around one level config."""
    p.add_argument("--config", "-c", help="level YAML to search around (e.g. configs/level1.yaml)")
    p.add_argument("--profile", "-p", help="profile merged on top: a name under configs/profiles/ (cpu, smoke) or a path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=SPACE",
                   help="search space, e.g. optim.lr=loguniform:1e-4:3e-3 or data.augment=choice:light,strong (repeatable)")
    p.add_argument("--samples", type=int, default=SearchConfig.num_samples, help="number of trials")
    p.add_argument("--asha", action="store_true", help="stop weak trials early (ASHA on val_acc)")
    p.add_argument("--name", default=SearchConfig.name, help="experiment name (MLflow and Tune)")
    p.add_argument("--cpus-per-trial", type=float, default=ResourcesConfig.cpus_per_trial)
    p.add_argument("--max-concurrent", type=int, default=ResourcesConfig.max_concurrent)
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the embedded "
                                          "store under .flowers/)")


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    """`flowers score` / `python -m jobs.score`."""
    d = ScoreConfig()
    p.add_argument("dirs", nargs="+", metavar="DIR", help="image folders, searched recursively "
                   "(.jpg .jpeg .png .webp .bmp, any case)")
    p.add_argument("--model", required=True, help="models:/name@alias, models:/name/3, runs:/..., or a path")
    p.add_argument("--out", required=True, help="output Parquet file (written atomically)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per model call (default {d.batch_size})")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="model actors (default: one per cluster CPU, at most one per batch)")
    p.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker,
                   help="CPUs (= torch threads) per actor (default: cluster CPUs / workers)")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"labels and probabilities kept per image (default {d.top_k})")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, a running local cluster, or a new local Ray)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="keep the rows already in --out and score only the rest")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar/log lines")


def score_settings(args: argparse.Namespace) -> ScoreConfig:
    """The parsed score options as settings."""
    return ScoreConfig(batch_size=args.batch_size, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                       top_k=args.top_k, resume=args.resume, overwrite=args.overwrite, progress=args.progress)


def search_settings(args: argparse.Namespace) -> SearchConfig:
    """The parsed tune options as settings."""
    resources = ResourcesConfig(cpus_per_trial=args.cpus_per_trial, max_concurrent=args.max_concurrent)
    return SearchConfig(name=args.name, num_samples=args.samples, asha=args.asha, resources=resources)
