"""Batch scoring: `python -m jobs.score INPUT... --model URI --out PATH` (also `flowers score`).

    python -m jobs.score ~/photos --model models:/flowers-student@champion --out photos.parquet
    python -m jobs.score s3://bucket/photos/ more.txt --model models:/flowers-student@champion \\
        --out s3://bucket/scores/photos --gpus-per-worker 1
    ray job submit --working-dir . -- python -m jobs.score INPUT ... --model URI --out PATH
    flowers score ...                                    # the same

Inputs, output rules and the model are checked before anything starts (`flowers.scoring.plan_scoring`,
which resolves the model once into a `ModelRef` that every scorer gets). Then one of two engines
runs the same per-batch code (`flowers.scoring.Scorer`):
- in this process (`flowers.scoring.local`): small jobs of local images into one file, no Ray;
- Ray Data (`jobs.score_ray`): workers read the images, an actor pool of Scorers scores them, and
  either the driver streams the rows into one Parquet file or the workers write part files that
  `flowers.scoring.commit_dataset` commits with a manifest.
See docs/scoring.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any, Sequence

from flowers.config import ConfigError, ScoreConfig
from flowers.registry import uris as registry
from flowers.registry.uris import TrackingTarget
from flowers.runtime import cpu_share
from flowers.scoring import local
from flowers.scoring.plan import ScorePlan, plan_scoring
from flowers.scoring.sinks import write_scores
from flowers.scoring.summary import ScoreSummary, log_summary, write_summary
from jobs import entry
from jobs.options import add_score_arguments, score_settings

log = logging.getLogger(__name__)


def choose_engine(plan: ScorePlan, settings: ScoreConfig, address: str | None) -> tuple[str, str]:
    """("local" | "ray", why): in-process for a small job of local images into one file on this
    machine; Ray Data for a cluster, object storage, a dataset folder, GPUs or a large job."""
    fits = local.usable(plan)
    if settings.engine == "local":
        if not fits:
            raise ConfigError("--engine local scores local images into one Parquet file; this job has object-store "
                              "inputs or a dataset-folder output: use --engine ray (or auto)")
        return "local", "--engine local"
    if settings.engine == "ray":
        return "ray", "--engine ray"
    if settings.engine != "auto":
        raise ConfigError(f"--engine must be auto, local or ray, got {settings.engine!r}")
    ray_mod = sys.modules.get("ray")
    reasons = [
        (not fits, "object-store inputs or a dataset-folder output"),
        (bool(address or os.environ.get("RAY_ADDRESS")), "a Ray cluster was named (--address / RAY_ADDRESS)"),
        (bool(settings.gpus_per_worker), "--gpus-per-worker"),
        (len(plan.todo) > settings.local_max, f"more than --local-max {settings.local_max} images"),
        (ray_mod is not None and ray_mod.is_initialized() and _spans_nodes(), "the connected Ray spans nodes"),
    ]
    why = next((w for hit, w in reasons if hit), None)
    return ("ray", why) if why else ("local", f"{len(plan.todo)} local images into one file")


def _spans_nodes() -> bool:
    from raylink import connect as cluster

    return cluster.spans_nodes()


def _threads(settings: ScoreConfig) -> int:
    """Lanes (1-thread scorers) of the in-process engine: --workers x --cpus-per-worker when given,
    else one per CPU of this process's share."""
    if settings.workers or settings.cpus_per_worker:
        return max(1, round((settings.workers or 1) * (settings.cpus_per_worker or 1)))
    return cpu_share()


def phase_line(phases: dict[str, float]) -> str:
    """`plan 0.21 s, model load 0.80 s, ...`: where a run's seconds went."""
    return ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f} s" for k, v in phases.items()
                     if isinstance(v, (int, float)))


def score_folders(inputs: Sequence[str | os.PathLike], model: Any, out: str | os.PathLike,
                  settings: ScoreConfig = ScoreConfig(), address: str | None = None,
                  tracking: TrackingTarget | None = None, target: TrackingTarget | None = None) -> ScoreSummary:
    """Score every input (folders, object-store prefixes, listing files) with `model` into `out`.

    `model`: a URI or path (resolved once here, against `target` for `models:/` and `runs:/`), or
    a `ModelRef`. The Ray engine connects to Ray (`address`, else $RAY_ADDRESS, else a local Ray)
    unless already connected. With `tracking`, the summary is also logged as a run of the
    `flowers-scoring` experiment. `summary.extra["phases"]` says where the seconds went.
    """
    t0 = time.perf_counter()
    plan = plan_scoring(inputs, model, out, settings, target)
    if tracking is not None:
        from jobs.preflight import check_tracking

        check_tracking(tracking)
    phases: dict[str, float] = {"plan_s": time.perf_counter() - t0}
    rewrites = plan.broken or any(p.errors for p in plan.parts)
    if not plan.todo and not rewrites and (plan.layout == "file" or plan.committed):
        log.info("all %d inputs are already in %s; nothing to do", plan.listed, plan.out)
        return ScoreSummary(plan.out, plan.listed, 0, 0, plan.skipped, plan.kept_rows, time.perf_counter() - t0,
                            output_uncertain=plan.kept_uncertain, layout=plan.layout)
    engine, why = choose_engine(plan, settings, address)
    if engine == "local":
        # lanes of one thread each: reported as workers x 1 CPU, like the Ray engine's 1-CPU actors
        summary, workers, cpus, device = _run_local(plan, settings, phases, why), _threads(settings), 1.0, "cpu"
    else:
        summary, workers, cpus, device = _run_ray(plan, settings, address, phases, why)
    summary.workers, summary.batch_size = workers, settings.batch_size
    first = summary.extra.get("first_batch_s")
    if first is not None:  # from the job's start, not the sink's
        phases["first_batch_s"] = phases["plan_s"] + phases.get("connect_s", 0.0) + first
    summary.extra.update(engine=engine, engine_reason=why, cpus_per_worker=cpus, device=device)
    # the job's time up to the committed output; writing and logging the summary come after
    phases["total_s"] = summary.extra["total_s"] = time.perf_counter() - t0
    summary.extra["phases"] = {k: round(v, 3) for k, v in phases.items()}
    t2 = time.perf_counter()
    summary.extra["summary_file"] = write_summary(plan, summary)
    if tracking is not None:
        try:
            summary.extra["mlflow_run_id"] = log_summary(summary, tracking, {
                "cpus_per_worker": cpus, "engine": engine, "device": device})
        except Exception as e:  # the output is committed; a lost log line must not fail the job
            log.warning("could not log the scoring summary to MLflow at %s (%s); it is in %s",
                        tracking.tracking_uri, str(e).splitlines()[0] if str(e) else type(e).__name__,
                        summary.extra["summary_file"])
    summary.extra["phases"]["summary_s"] = round(time.perf_counter() - t2, 3)
    log.debug("phases (%s engine): %s", engine, phase_line(summary.extra["phases"]))
    log.info(summary.line())
    return summary


def _announce(plan: ScorePlan, settings: ScoreConfig, how: str, why: str) -> None:
    log.info("scoring %d inputs with %s (v%s) %s, batch %d, into %s %s%s [%s]",
             len(plan.todo), plan.model_name, plan.model_version, how, settings.batch_size,
             "the dataset folder" if plan.layout == "dataset" else "the file", plan.out,
             f", {plan.skipped} already in the output" if plan.skipped else "", why)


def _run_local(plan: ScorePlan, settings: ScoreConfig, phases: dict[str, float], why: str) -> ScoreSummary:
    threads = _threads(settings)
    _announce(plan, settings, f"in this process ({threads} lanes x 1 thread)", why)
    stats = local.LocalStats()
    t1 = time.perf_counter()
    summary = write_scores(plan, local.score_local(plan, settings.batch_size, threads, stats=stats),
                           settings.progress)
    phases["scoring_s"] = time.perf_counter() - t1
    phases.update(stats.phases())
    return summary


def _run_ray(plan: ScorePlan, settings: ScoreConfig, address: str | None, phases: dict[str, float],
             why: str) -> tuple[ScoreSummary, int, float, str]:
    from jobs import score_ray

    res = score_ray.Resources(0, 0.0)
    if plan.todo:
        t1 = time.perf_counter()
        res = score_ray.connect_and_plan(plan, settings, address)
        phases["connect_s"] = time.perf_counter() - t1
        _announce(plan, settings, f"on {res.workers} Ray Data worker(s) x {res.cpus:g} CPU"
                  + (f" + {res.gpus:g} GPU" if res.gpus else ""), why)
    summary = score_ray.run_ray(plan, settings, res, phases)
    return summary, res.workers, res.cpus, res.device


def run(args: argparse.Namespace) -> int:
    """Score the inputs and print the one-line summary."""
    # the store is read once, here: the model resolves against it and every scorer gets the
    # resolved ModelRef (no environment handed down). A tracking URI the user set (flag or
    # environment) also gets the summary run; the embedded store that resolves by default does not
    if getattr(args, "verbose", False):  # `python -m jobs.score -v`: `flowers -v` set the root level already
        log.setLevel(logging.DEBUG)
    explicit = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    target = registry.store_target(explicit) if registry.is_mlflow_uri(args.model) else None
    tracking = registry.resolve_target(explicit) if explicit else None
    summary = score_folders(args.dirs, args.model, args.out, score_settings(args), address=args.address,
                            tracking=tracking, target=target)
    print(summary.line())
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main("python -m jobs.score", __doc__, add_score_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
