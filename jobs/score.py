"""Batch scoring with Ray Data: `python -m jobs.score INPUT... --model URI --out PATH`.

    python -m jobs.score ~/photos --model models:/flowers-student@champion --out photos.parquet
    python -m jobs.score s3://bucket/photos/ more.txt --model models:/flowers-student@champion \\
        --out s3://bucket/scores/photos --gpus-per-worker 1
    ray job submit --working-dir . -- python -m jobs.score INPUT ... --model URI --out PATH
    flowers score ...                                    # the same

Inputs, output rules and the model are checked before Ray starts (`flowers.scoring.plan_scoring`).
Then the workers read the images (a Ray Data datasource, one per filesystem), an
actor pool of `flowers.scoring.Scorer`s scores them (one model load per actor), and either the
driver streams the rows into one Parquet file (small local jobs) or the workers write part files
(`Dataset.write_parquet`) that `flowers.scoring.commit_dataset` commits with a manifest.
See docs/scoring.md.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from flowers import storage
from flowers.registry import uris as registry
from flowers.config import ConfigError, ScoreConfig
from flowers.registry.uris import TrackingTarget
from flowers.scoring.batch import Scorer
from flowers.scoring.plan import ScorePlan, check_cluster_paths, plan_scoring
from flowers.scoring.reader import read_objects
from flowers.scoring.sinks import commit_dataset, prepare_dataset, write_scores
from flowers.scoring.sources import by_filesystem
from flowers.scoring.summary import ScoreSummary, log_summary, write_summary
from jobs import entry
from jobs.options import add_score_arguments, score_settings
from jobs.parts import PartNames
from raylink import connect as cluster

log = logging.getLogger(__name__)

# read and write tasks move bytes; each takes this sliver of a CPU, and every actor leaves it free
# out of its share, so they always find room next to a full actor pool (with whole CPUs they
# could not start at all once the actors hold every CPU)
IO_CPUS = 0.05


@dataclass
class Resources:
    """The actor pool: how many actors, and each one's CPU share (= torch threads) and GPUs."""

    workers: int
    cpus: float
    gpus: float = 0.0
    note: str | None = None  # why the request was changed (no GPUs in the cluster)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"


def plan_resources(n_images: int, settings: ScoreConfig, cluster_resources: dict[str, float],
                   node_cpus: Sequence[float]) -> Resources:
    """Actors for the connected cluster: on CPU one per cluster CPU; with `--gpus-per-worker G`,
    one per G GPUs. At most one per batch. No GPUs in the cluster: CPU, with a note saying so."""
    batches = max(1, math.ceil(n_images / settings.batch_size))
    gpus, note = float(settings.gpus_per_worker or 0.0), None
    total_gpus = float(cluster_resources.get("GPU", 0.0))
    if gpus > 0 and total_gpus <= 0:
        note = (f"--gpus-per-worker {gpus:g}: the cluster has no GPUs (ray.cluster_resources() lists none); "
                "scoring on CPU")
        gpus = 0.0
    if gpus > 0:
        if gpus > total_gpus:
            raise ConfigError(f"--gpus-per-worker {gpus:g} is more than the {total_gpus:g} GPUs the cluster has")
        w = settings.workers or max(1, min(int(total_gpus // gpus), batches))
        return Resources(w, float(settings.cpus_per_worker or 1.0), gpus, note)
    total = max(1, int(cluster_resources.get("CPU", 1)))
    node_max = max([int(c) for c in node_cpus if c > 0] or [total])
    w = settings.workers or max(1, min(total, batches))
    c = settings.cpus_per_worker or max(1, min(node_max, total // w))
    return Resources(w, float(c), 0.0, note)


class ImageObjects(Datasource):
    """The inputs on one filesystem as `{path, bytes, read_error}` rows, read on the workers in
    batch-sized read tasks (`flowers.scoring.read_objects`). Unlike `read_binary_files`, an object
    that cannot be read becomes an error row rather than a failed read task (and a failed job)."""

    def __init__(self, uris: list[str], per_task: int) -> None:
        super().__init__()
        self.uris, self.per_task = uris, per_task
        self.fs, _ = storage.filesystem(uris[0])  # S3: the endpoint override and bounded retries

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # one task per batch whatever `parallelism` says: the actor pool sees batch-sized work at once
        fs, n = self.fs, self.per_task
        return [ReadTask(lambda chunk=self.uris[i:i + n]: [read_objects(fs, chunk)],
                         BlockMetadata(num_rows=len(self.uris[i:i + n]), size_bytes=None, input_files=None,
                                       exec_stats=None))
                for i in range(0, len(self.uris), n)]


def task_env() -> dict:
    """Every read, score and write task gets the driver's allocator, MLflow and object-storage
    settings, also on a Ray that was started without them (`ray job submit`, a notebook's Ray)."""
    return {"env_vars": cluster.worker_env()}


def build_dataset(plan: ScorePlan, res: Resources, batch_size: int) -> ray.data.Dataset:
    """Read every input on the workers, one reader per filesystem, then score in the actor pool."""
    readers = [ray.data.read_datasource(ImageObjects(uris, batch_size), num_cpus=IO_CPUS, runtime_env=task_env())
               for uris in by_filesystem(plan.todo).values()]
    ds = readers[0].union(*readers[1:]) if len(readers) > 1 else readers[0]
    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs={"model_uri": plan.model_uri, "top_k": plan.top_k,
                               "threads": max(1, round(res.cpus)), "device": res.device},
        compute=ray.data.ActorPoolStrategy(size=res.workers),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=max(res.cpus - IO_CPUS, IO_CPUS),
        num_gpus=res.gpus or None,
        runtime_env=task_env(),
    )


def score_folders(inputs: Sequence[str | os.PathLike], model_uri: str, out: str | os.PathLike,
                  settings: ScoreConfig = ScoreConfig(), address: str | None = None,
                  tracking: TrackingTarget | None = None) -> ScoreSummary:
    """Score every input (folders, object-store prefixes, listing files) with `model_uri` into `out`.

    Connects to Ray (`address`, else $RAY_ADDRESS, else a local Ray) unless already connected.
    With `tracking`, the summary is also logged as a run of the `flowers-scoring` experiment.
    """
    t0 = time.perf_counter()
    plan = plan_scoring(inputs, model_uri, out, settings)
    if tracking is not None:
        from jobs.preflight import check_tracking

        check_tracking(tracking)
    rewrites = plan.broken or any(p.errors for p in plan.parts)
    if not plan.todo and not rewrites and (plan.layout == "file" or plan.committed):
        log.info("all %d inputs are already in %s; nothing to do", plan.listed, plan.out)
        return ScoreSummary(plan.out, plan.listed, 0, 0, plan.skipped, plan.kept_rows, time.perf_counter() - t0,
                            output_uncertain=plan.kept_uncertain, layout=plan.layout)

    res = Resources(0, 0.0)
    if plan.todo:
        cluster.connect(address, log_to_driver=False)
        check_cluster_paths(plan, model_uri, cluster.spans_nodes(), settings.shared_fs)
        res = plan_resources(len(plan.todo), settings, ray.cluster_resources(),
                             [n["Resources"].get("CPU", 0) for n in cluster.alive_nodes()])
        if res.note:
            log.warning(res.note)
        log.info("scoring %d inputs with %s (v%s) on %d worker(s) x %g CPU%s, batch %d, into %s %s%s",
                 len(plan.todo), plan.model_name, plan.model_version, res.workers, res.cpus,
                 f" + {res.gpus:g} GPU" if res.gpus else "", settings.batch_size,
                 "the dataset folder" if plan.layout == "dataset" else "the file", plan.out,
                 f", {plan.skipped} already in the output" if plan.skipped else "")
    ctx = ray.data.DataContext.get_current()  # datasets copy it when built: change it first
    bars_before = ctx.enable_progress_bars
    try:
        if plan.layout == "file":
            ctx.enable_progress_bars = False  # ours counts errors too
            ds = build_dataset(plan, res, settings.batch_size)
            summary = write_scores(plan, ds.iter_batches(batch_size=None, batch_format="pyarrow"), settings.progress)
        else:
            ctx.enable_progress_bars = settings.progress and sys.stderr.isatty()
            t1 = time.perf_counter()
            dest = prepare_dataset(plan)
            if plan.todo:
                ds = build_dataset(plan, res, settings.batch_size)
                try:
                    ds.write_parquet(dest.path, filesystem=dest.fs, filename_provider=PartNames(),
                                     min_rows_per_file=settings.part_rows,
                                     ray_remote_args={"num_cpus": IO_CPUS, "runtime_env": task_env()},
                                     compression="zstd")
                except BaseException:
                    log.error("scoring stopped before the commit; the parts written so far stay in %s: run the "
                              "same command with --resume to score only the rest", plan.out)
                    raise
            summary = commit_dataset(plan, dest, time.perf_counter() - t1)
    finally:
        ctx.enable_progress_bars = bars_before
    summary.workers, summary.batch_size = res.workers, settings.batch_size
    summary.extra.update(cpus_per_worker=res.cpus, gpus_per_worker=res.gpus, device=res.device,
                         total_s=time.perf_counter() - t0)
    summary.extra["summary_file"] = write_summary(plan, summary)
    if tracking is not None:
        try:
            summary.extra["mlflow_run_id"] = log_summary(summary, tracking, {
                "cpus_per_worker": res.cpus, "gpus_per_worker": res.gpus, "device": res.device})
        except Exception as e:  # the output is committed; a lost log line must not fail the job
            log.warning("could not log the scoring summary to MLflow at %s (%s); it is in %s",
                        tracking.tracking_uri, str(e).splitlines()[0] if str(e) else type(e).__name__,
                        summary.extra["summary_file"])
    log.info(summary.line())
    return summary


def run(args: argparse.Namespace) -> int:
    """Score the inputs and print the one-line summary."""
    # a tracking URI the user set (flag or environment) gets the summary run; the embedded
    # store that resolves a models:/ URI by default does not
    explicit = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    registry.export_store([args.model], args.tracking_uri)  # actors resolve models:/ against the driver's store
    tracking = registry.resolve_target(explicit) if explicit else None
    summary = score_folders(args.dirs, args.model, args.out, score_settings(args), address=args.address,
                            tracking=tracking)
    print(summary.line())
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main("python -m jobs.score", __doc__, add_score_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
