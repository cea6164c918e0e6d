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
    p.add_argument("dirs", nargs="+", metavar="INPUT",
                   help="image folders or s3:// prefixes (searched recursively: .jpg .jpeg .png .webp .bmp, any "
                        "case), single images, or listing files naming one path/URI per line (.txt) or in a "
                        "Parquet column (.parquet)")
    p.add_argument("--model", required=True, help="models:/name@alias, models:/name/3, runs:/..., or a path")
    p.add_argument("--out", required=True,
                   help="output: a .parquet file (small local jobs, written atomically), or a folder or "
                        "s3://BUCKET/PREFIX for a dataset of part files committed by _manifest.json")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per model call (default {d.batch_size})")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="model actors (default: one per cluster CPU, or per --gpus-per-worker GPUs; at most one "
                        "per batch)")
    p.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker,
                   help="CPUs (= torch threads) per actor (default: cluster CPUs / workers; 1 with GPUs)")
    p.add_argument("--gpus-per-worker", type=float, default=d.gpus_per_worker,
                   help="GPUs per actor, e.g. 1 or 0.5 (default: CPU only); a cluster without GPUs scores on "
                        "CPU and says so")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"labels and probabilities kept per image (default {d.top_k})")
    p.add_argument("--dataset-threshold", type=int, default=d.dataset_threshold, metavar="N",
                   help=f"more than N images to a local --out: write a dataset folder of part files instead of "
                        f"one file (default {d.dataset_threshold}; 0: always)")
    p.add_argument("--part-rows", type=int, default=d.part_rows, metavar="N",
                   help=f"rows per part file of a dataset output, the most a crash can lose (default {d.part_rows})")
    p.add_argument("--path-column", default=d.path_column, metavar="NAME",
                   help="the column of a Parquet listing that holds the paths (default: path, or its only string "
                        "column)")
    p.add_argument("--shared-fs", action="store_true",
                   help="every Ray node mounts the local inputs, output and model at the same paths (else a "
                        "cluster that spans nodes refuses driver-local paths)")
    p.add_argument("--engine", choices=("auto", "local", "ray"), default=d.engine,
                   help="local: score in this process without Ray (a single-file output of local images); ray: "
                        "Ray Data actors; auto (default): local for a job of local images into one file, with no "
                        "--address/RAY_ADDRESS and at most --local-max images, else ray")
    p.add_argument("--local-max", type=int, default=d.local_max, metavar="N",
                   help=f"--engine auto scores at most N images in-process (default {d.local_max})")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, a running local cluster, or a new local Ray)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI: models:/ resolve there and the summary is logged as a run of the "
                        "flowers-scoring experiment (default: $MLFLOW_TRACKING_URI; unset: no run is logged)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="keep what --out already holds (complete part files after a crash) and score only the rest")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar/log lines")
    # SUPPRESS: `flowers -v score` and `flowers score -v` both work (a default here would reset the former)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging, with where the job's seconds went (plan, model load, decode, predict, ...)")


def score_settings(args: argparse.Namespace) -> ScoreConfig:
    """The parsed score options as settings."""
    return ScoreConfig(batch_size=args.batch_size, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                       gpus_per_worker=args.gpus_per_worker, top_k=args.top_k, resume=args.resume,
                       overwrite=args.overwrite, progress=args.progress, dataset_threshold=args.dataset_threshold,
                       part_rows=args.part_rows, path_column=args.path_column, shared_fs=args.shared_fs,
                       engine=args.engine, local_max=args.local_max)


def search_settings(args: argparse.Namespace) -> SearchConfig:
    """The parsed tune options as settings."""
    resources = ResourcesConfig(cpus_per_trial=args.cpus_per_trial, max_concurrent=args.max_concurrent)
    return SearchConfig(name=args.name, num_samples=args.samples, asha=args.asha, resources=resources)
