"""Batch scoring with Ray Data: `python -m jobs.score DIR... --model URI --out PATH`.

    python -m jobs.score ~/photos --model models:/flowers-student@champion --out photos.parquet
    ray job submit --working-dir . -- python -m jobs.score DIR ... --model URI --out PATH
    flowers score ...                                    # the same

Folders, output rules and the model are checked before Ray starts (`flowers.scoring.plan_scoring`);
then Ray Data feeds batches of paths to an actor pool of `flowers.scoring.Scorer`s (one model
load per actor) and the driver streams the rows into the output (`flowers.scoring.write_scores`).
See docs/scoring.md.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from typing import Sequence

import ray

from flowers import registry
from flowers.config import ScoreConfig
from flowers.runtime import worker_runtime_env
from flowers.scoring import Scorer, ScoreSummary, plan_scoring, write_scores
from jobs import cluster, entry
from jobs.options import add_score_arguments, score_settings

log = logging.getLogger(__name__)


def default_resources(n_images: int, settings: ScoreConfig) -> tuple[int, float]:
    """Actor count and CPUs per actor for the connected cluster: all CPUs by default, one actor per CPU."""
    total = max(1, int(ray.cluster_resources().get("CPU", 1)))
    node_max = max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [total])
    batches = max(1, math.ceil(n_images / settings.batch_size))
    w = settings.workers or max(1, min(total, batches))
    c = settings.cpus_per_worker or max(1, min(node_max, total // w))
    return w, float(c)


def score_folders(dirs: Sequence[str | os.PathLike], model_uri: str, out: str | os.PathLike,
                  settings: ScoreConfig = ScoreConfig(), address: str | None = None) -> ScoreSummary:
    """Score every image under `dirs` with `model_uri` into the Parquet file `out`.

    Connects to Ray (`address`, else $RAY_ADDRESS, else a local Ray) unless already connected.
    """
    t0 = time.perf_counter()
    plan = plan_scoring(dirs, model_uri, out, settings)
    if not plan.todo:
        log.info("all %d images under the folders are already in %s; nothing to do", plan.listed, plan.out)
        kept = plan.keep.num_rows if plan.keep is not None else 0
        return ScoreSummary(plan.out, plan.listed, 0, 0, plan.skipped, kept, time.perf_counter() - t0)

    cluster.connect(address, log_to_driver=False)
    w, cpus = default_resources(len(plan.todo), settings)
    log.info("scoring %d images with %s (v%s) on %d worker(s) x %g CPU, batch %d%s", len(plan.todo),
             plan.model_name, plan.model_version, w, cpus, settings.batch_size,
             f", {plan.skipped} already in the output" if plan.skipped else "")
    ctx = ray.data.DataContext.get_current()  # datasets copy it when built: change it first
    bars_before, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # ours counts errors too
    try:
        # one block per batch, so the actor pool sees work in batch-sized units from the start
        blocks = max(1, min(len(plan.todo), math.ceil(len(plan.todo) / settings.batch_size)))
        ds = ray.data.from_items([{"path": p} for p in plan.todo], override_num_blocks=blocks)
        ds = ds.map_batches(
            Scorer,
            fn_constructor_kwargs={"model_uri": plan.model_uri, "top_k": plan.top_k, "threads": max(1, int(cpus))},
            compute=ray.data.ActorPoolStrategy(size=w),
            batch_size=settings.batch_size,
            batch_format="numpy",
            num_cpus=cpus,
            runtime_env=worker_runtime_env(),
        )
        summary = write_scores(plan, ds.iter_batches(batch_size=None, batch_format="pyarrow"), settings.progress)
    finally:
        ctx.enable_progress_bars = bars_before
    summary.workers, summary.batch_size = w, settings.batch_size
    summary.extra.update(cpus_per_worker=cpus, total_s=time.perf_counter() - t0)
    log.info(summary.line())
    return summary


def run(args: argparse.Namespace) -> int:
    """Score the folders and print the one-line summary."""
    registry.export_store([args.model])  # actors resolve models:/ against the driver's store
    summary = score_folders(args.dirs, args.model, args.out, score_settings(args), address=args.address)
    print(summary.line())
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main("python -m jobs.score", __doc__, add_score_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
