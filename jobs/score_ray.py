"""Batch scoring's Ray Data engine: workers read the inputs, an actor pool of `Scorer`s scores them.

`jobs.score` (the driver) picks this engine for cluster jobs, object-store inputs, dataset-folder
outputs and large jobs, and `flowers.scoring.local` (in-process) for small local ones. Each actor
gets the `ModelRef` the driver resolved, loads the model once (on a thread, while its first batch
decodes) and never asks the registry again.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from flowers import storage
from flowers.config import ConfigError, ScoreConfig
from flowers.scoring.batch import Scorer
from flowers.scoring.plan import ScorePlan, check_cluster_paths
from flowers.scoring.reader import read_objects
from flowers.scoring.sinks import commit_dataset, prepare_dataset, write_scores
from flowers.scoring.sources import by_filesystem
from flowers.scoring.summary import ScoreSummary
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
        # the driver's ModelRef and preprocessing: no registry call in the actors, and each one
        # decodes its first batch while its model loads
        fn_constructor_kwargs={"model": plan.model, "top_k": plan.top_k, "views": plan.views,
                               "threads": max(1, round(res.cpus)), "device": res.device},
        compute=ray.data.ActorPoolStrategy(size=res.workers),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=max(res.cpus - IO_CPUS, IO_CPUS),
        num_gpus=res.gpus or None,
        runtime_env=task_env(),
    )


def connect_and_plan(plan: ScorePlan, settings: ScoreConfig, address: str | None) -> Resources:
    """Join (or start) Ray, check the plan against the cluster, and size the actor pool."""
    cluster.connect(address, log_to_driver=False)
    check_cluster_paths(plan, plan.model.uri, cluster.spans_nodes(), settings.shared_fs)
    res = plan_resources(len(plan.todo), settings, ray.cluster_resources(),
                         [n["Resources"].get("CPU", 0) for n in cluster.alive_nodes()])
    if res.note:
        log.warning(res.note)
    return res


def run_ray(plan: ScorePlan, settings: ScoreConfig, res: Resources, phases: dict[str, float]) -> ScoreSummary:
    """Score `plan.todo` with Ray Data into the plan's output (one file, or a dataset folder)."""
    ctx = ray.data.DataContext.get_current()  # datasets copy it when built: change it first
    bars_before = ctx.enable_progress_bars
    t1 = time.perf_counter()
    try:
        if plan.layout == "file":
            ctx.enable_progress_bars = False  # ours counts errors too
            ds = build_dataset(plan, res, settings.batch_size)
            summary = write_scores(plan, ds.iter_batches(batch_size=None, batch_format="pyarrow"), settings.progress)
            phases["scoring_s"] = time.perf_counter() - t1
            return summary
        ctx.enable_progress_bars = settings.progress and sys.stderr.isatty()
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
        t2 = time.perf_counter()
        phases["scoring_s"] = t2 - t1
        summary = commit_dataset(plan, dest, t2 - t1)
        phases["commit_s"] = time.perf_counter() - t2
        return summary
    finally:
        ctx.enable_progress_bars = bars_before
