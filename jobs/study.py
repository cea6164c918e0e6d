"""The study as a Ray job: Tune trials → registry → L4 ensemble → L5 student → report.

    python -m jobs.study --config configs/study.yaml --profile study-cpu
    ray job submit --working-dir . -- python -m jobs.study --config configs/study.yaml
    flowers submit study -- --profile study-cpu        # same, with the runtime env filled in
    flowers study --profile study-cpu                  # same, in this process

Inside a Ray job RAY_ADDRESS is set, so the study joins that cluster. The plan
(`flowers.study`) and the steps after Tune (`flowers.study_steps`) are the library's.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flowers import config as C
from flowers import registry
from flowers import report as R
from flowers import study_steps as S
from flowers import tracking as T
from flowers.study import build_trials, load_study
from jobs import cluster, entry
from jobs.options import add_study_arguments
from jobs.tune import run_tune

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


def _run_stages(study: C.StudyConfig, config_dir: Path, tracker: T.StudyTracker, outcome: StudyOutcome,
                resume: bool) -> None:
    """L4 then L5; a resumed study skips a stage whose run finished."""
    out_root = Path(study.home).expanduser().resolve() / "stages" / study.name
    if "ensemble" in study.stages:
        if resume and S.stage_done(tracker, S.ENSEMBLE_KEY):
            outcome.registered["ensemble"] = S.champion_uri("ensemble")
        elif uri := S.run_ensemble(study, config_dir, tracker, dict(outcome.registered), out_root / "ensemble"):
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
        elif uri := S.run_distill(study, config_dir, tracker, teacher, out_root / "distill"):
            outcome.registered["distill"] = uri
        else:
            outcome.skipped["distill"] = "no student config"


def run_study(study: C.StudyConfig, config_dir: Path, resume: bool = False, address: str | None = None) -> StudyOutcome:
    """Tune trials → registry → L4 → L5 → report. Safe to call again with `resume=True`."""
    target = T.configure(registry.resolve_target(study.tracking_uri, study.home))
    tracker = T.StudyTracker(study.name, target, {"study": study.name})
    tracker.set_tags(tracker.parent_id, {"hardware": S.hardware()})
    outcome = StudyOutcome(study.name, target.tracking_uri, tracker.experiment_id, tracker.parent_id)
    specs = build_trials(study, config_dir)
    tracker.log_params(tracker.parent_id, {
        "trials": ",".join(s.key for s in specs), "stages": ",".join(study.stages),
        "profile": study.profile, "overrides": " ".join(study.overrides), "l2_select": study.l2_select,
        "cpus_per_trial": study.resources.cpus_per_trial, "max_concurrent": study.resources.max_concurrent})
    t0 = time.perf_counter()
    status = "FAILED"
    try:
        if "tune" in study.stages:
            cluster.connect(address, study.resources.num_cpus)
            outcome.failed_trials = run_tune(study, specs, target, resume)
        outcome.registered.update(S.register_levels(study, tracker, S.trial_records(tracker)))
        _run_stages(study, config_dir, tracker, outcome, resume)
        tracker.log_metrics(tracker.parent_id, {"study_wall_seconds": time.perf_counter() - t0})
        report_dir = Path(study.report_dir or Path(study.home) / "reports" / study.name)
        outcome.report = R.write_report(study.name, report_dir, tracker=tracker)
        tracker.log_artifacts(tracker.parent_id, [outcome.report, *sorted(report_dir.glob("*.png"))], "report")
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
