"""The study as a Ray job: Tune trials → registry → L4 ensemble → L5 student → report.

    python -m jobs.study --config configs/study.yaml --profile study-cpu
    ray job submit --working-dir . -- python -m jobs.study --config configs/study.yaml
    flowers submit study -- --profile study-cpu        # same, with the runtime env filled in
    flowers study --profile study-cpu                  # same, in this process

Inside a Ray job RAY_ADDRESS is set, so the study joins that cluster. The plan
(`flowers.study.plan`) and the steps after Tune (`flowers.study.steps`) are the library's.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowers import config as C
from flowers.registry import uris as registry
from flowers.study import report as R
from flowers.registry import run_notes as N
from flowers.study import steps as S
from flowers.registry import tracking as T
from flowers.study.plan import StudyPlan, load_study, plan_study
from flowers.registry.uris import TrackingTarget
from jobs import entry, preflight
from jobs.options import add_study_arguments
from jobs.tune import run_tune
from raylink import connect as cluster

log = logging.getLogger(__name__)


@dataclass
class StudyOutcome:
    """Where a study's results are: MLflow ids, registered model URIs, skipped stages, the report."""

    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    registered: dict[str, str] = field(default_factory=dict)  # stage/level → models:/ URI
    skipped: dict[str, str] = field(default_factory=dict)  # stage → reason
    report: Path | None = None
    failed_trials: list[str] = field(default_factory=list)


def _stage(fn_name: str, plan: StudyPlan, target: TrackingTarget, arg: Any,
           out_dir: str | None) -> str | None:
    """One L4/L5 stage inside a Ray task: its own tracker (same study runs, found by tag), its outputs
    in `out_dir` or, when the cluster spans nodes, in a scratch folder that goes once MLflow has them."""
    study = plan.study
    T.configure(target)
    tracker = T.StudyTracker(study.name, target, {"study": study.name})
    scratch = None if out_dir else tempfile.mkdtemp(prefix=f"flowers-{fn_name}-")
    try:
        return getattr(S, fn_name)(plan, tracker, arg, Path(out_dir or scratch))
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _run_stage(fn_name: str, plan: StudyPlan, target: TrackingTarget, arg: Any,
               out_dir: Path) -> str | None:
    """Run a stage as scheduled Ray work with declared resources and retries (on a worker of a cluster)."""
    import ray

    study = plan.study
    res = study.resources
    cpus = res.stage_cpus or cluster.largest_node_cpus()
    gpus = res.stage_gpus if res.stage_gpus is not None else (1.0 if cluster.cluster_gpus() >= 1 else 0.0)
    multi = cluster.spans_nodes()
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=study.max_failures,
                      retry_exceptions=False)(_stage)
    log.info("stage %s as a Ray task (%g CPU, %g GPU, %d retries)", fn_name, cpus, gpus, study.max_failures)
    return ray.get(task.remote(fn_name, plan, target, arg, None if multi else str(out_dir)))


def _run_stages(plan: StudyPlan, target: TrackingTarget, tracker: T.StudyTracker,
                outcome: StudyOutcome, resume: bool) -> None:
    """L4 then L5, each a Ray task; a resumed study skips a stage whose run finished."""
    study = plan.study
    out_root = Path(study.home).expanduser().resolve() / "stages" / study.name
    if "ensemble" in study.stages:
        if resume and S.stage_done(tracker, S.ENSEMBLE_KEY):
            outcome.registered["ensemble"] = S.champion_uri("ensemble")
        elif uri := _run_stage("run_ensemble", plan, target, dict(outcome.registered),
                               out_root / "ensemble"):
            outcome.registered["ensemble"] = uri
        else:
            outcome.skipped["ensemble"] = "fewer than two registered levels"
    if "distill" in study.stages:
        teacher = outcome.registered.get("ensemble") or next(iter(outcome.registered.values()), None)
        if resume and S.stage_done(tracker, S.DISTILL_KEY):
            outcome.registered["distill"] = S.champion_uri("distill")
        elif teacher is None:
            log.warning("distill stage skipped: no registered teacher")
            outcome.skipped["distill"] = "no teacher"
        elif uri := _run_stage("run_distill", plan, target, teacher, out_root / "distill"):
            outcome.registered["distill"] = uri
        else:
            outcome.skipped["distill"] = "no student config"
    if "robustness" in study.stages and not (resume and S.stage_done(tracker, "robustness")):
        _run_stage("run_robustness", plan, target, dict(outcome.registered), out_root / "robustness")


def run_study(study: C.StudyConfig, config_dir: Path, resume: bool = False, address: str | None = None) -> StudyOutcome:
    """Preflight → Tune trials → registry → L4 → L5 → report. Safe to call again with `resume=True`."""
    target = registry.resolve_target(study.tracking_uri, study.home)
    plan = plan_study(study, config_dir)  # every config the study uses, read once
    specs = plan.trials
    cluster.connect(address, study.resources.num_cpus)
    preflight.check_study(study, specs, target, cluster.spans_nodes())  # before anything is written
    T.configure(target)
    tracker = T.StudyTracker(study.name, target, {"study": study.name})
    tracker.set_tags(tracker.parent_id, {"hardware": S.hardware(),
                                         N.NOTE_TAG: N.study_note(study.name, [s.key for s in specs], study.stages)})
    outcome = StudyOutcome(study.name, target.tracking_uri, tracker.experiment_id, tracker.parent_id)
    tracker.log_params(tracker.parent_id, {
        "trials": ",".join(s.key for s in specs), "stages": ",".join(study.stages),
        "profile": study.profile, "overrides": " ".join(study.overrides), "l2_select": study.l2_select,
        "cpus_per_trial": study.resources.cpus_per_trial, "max_concurrent": study.resources.max_concurrent})
    t0 = time.perf_counter()
    status = "FAILED"
    try:
        if "tune" in study.stages and not cluster.spans_nodes():
            # one node: build the cached trunk features once with every core, before 1-CPU trials start
            # (on a cluster each node's first trial builds its own, node-local copy)
            student = plan.student if "distill" in study.stages else None
            seconds = S.warm_feature_caches([s.cfg for s in specs] + ([student] if student else []))
            tracker.log_metrics(tracker.parent_id, {"feature_cache_seconds": seconds}, kind="trial")
        if "tune" in study.stages:
            finished = {r["key"] for r in S.trial_records(tracker) if r["status"] == "FINISHED"} if resume else set()
            outcome.failed_trials = run_tune(study, specs, target, resume, finished)
        outcome.registered.update(S.register_levels(study, tracker, S.trial_records(tracker)))
        _run_stages(plan, target, tracker, outcome, resume)
        tracker.log_metrics(tracker.parent_id, {"study_wall_seconds": time.perf_counter() - t0}, kind="trial")
        report_dir = Path(study.report_dir or Path(study.home) / "reports" / study.name)
        outcome.report = R.write_report(study.name, report_dir, tracker=tracker)
        tracker.log_artifacts(tracker.parent_id, [outcome.report, outcome.report.with_suffix(".html"),
                                                  *sorted(report_dir.glob("*.png"))], "report")
        status = "FINISHED"
    finally:
        tracker.finish_study(status)
    return outcome


def summary_text(outcome: StudyOutcome) -> str:
    """What to print at the end: the report, the UI command and the model URIs."""
    ui = "" if outcome.tracking_uri.startswith("sqlite:") else " --tracking-uri " + outcome.tracking_uri
    lines = [f"study '{outcome.name}' done", f"report: {outcome.report}",
             f"MLflow: {outcome.tracking_uri} (experiment '{outcome.name}')", f"UI:     flowers ui{ui}"]
    lines += [f"model {k}: {uri}" for k, uri in outcome.registered.items()]
    lines += [f"stage {k}: skipped ({why})" for k, why in outcome.skipped.items()]
    if outcome.failed_trials:
        lines.append(f"failed trials: {', '.join(outcome.failed_trials)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Load, run, print the report and where to look; 1 when a trial failed for good."""
    study, config_dir = load_study(args.config, args.profile, args.overrides)
    if args.tracking_uri:
        study = dataclasses.replace(study, tracking_uri=args.tracking_uri)
    outcome = run_study(study, config_dir, resume=args.resume, address=args.address)
    if outcome.report and Path(outcome.report).is_file():
        print(Path(outcome.report).read_text())
    print(summary_text(outcome))
    return 0 if not outcome.failed_trials else 1


def main(argv: list[str] | None = None) -> int:
    return entry.main("python -m jobs.study", __doc__, add_study_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
