"""The study's steps after Tune, Ray-free: champions, the L4/L5 stages, the hardware line.

`trial_records` reads the finished trials back from MLflow, `register_levels` registers
each level's best one as a challenger of `flowers-lN` and runs the champion gate
(`flowers.governance`), and `run_ensemble` / `run_distill` run the L4 and L5 stages
(`flowers.ensemble`, `flowers.distill`) as child runs of the study and register their models
the same way. `jobs/study.py` calls them in order after the Tune step.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from flowers import config as C
from flowers import governance
from flowers import registry
from flowers import tracking as T
from flowers.study import study_path, trial_config

log = logging.getLogger(__name__)

ENSEMBLE_KEY = "l4-ensemble"
DISTILL_KEY = "l5-distill"


_CACHE_KEYS = ("data.root", "data.format", "data.split", "data.seed", "data.classes", "data.image_size",
               "data.resize_size", "data.augment", "data.cutout_frac", "data.cache_views", "data.shift_views", "data.cache_dir",
               "model.arch", "model.pretrained", "model.trainable_units", "train.seed")


def warm_feature_caches(cfgs: list[C.Config]) -> float:
    """Build the feature-cache entries the trials will open, each once, with all of this process's cores
    (before 1-CPU trials start; `flowers.feature_cache`). Returns the seconds spent."""
    from flowers.train import warm_feature_cache

    t0, seen = time.perf_counter(), set()
    for cfg in cfgs:
        flat = C.to_flat_dict(cfg)
        key = tuple(repr(flat.get(k)) for k in _CACHE_KEYS)
        if cfg.data.feature_cache and key not in seen:
            seen.add(key)
            log.info("feature cache: preparing %s views of %s (%s)", cfg.data.cache_views, cfg.data.augment,
                     cfg.model.arch)
            warm_feature_cache(cfg)
    return time.perf_counter() - t0


def student_config(study: C.StudyConfig, config_dir: Path) -> C.Config | None:
    """The L5 student's config as the study trains it, or None without one."""
    if not study.distill_config or not study_path(config_dir, study.distill_config).is_file():
        return None
    return trial_config(study, config_dir, study.distill_config)


def champion_uri(stage: str) -> str:
    """`models:/<registered name>@champion` for a level or stage key (l1, ensemble, distill, ...)."""
    return f"models:/{registry.REGISTERED[stage]}@{registry.CHAMPION}"


def trial_records(tracker: T.StudyTracker) -> list[dict[str, Any]]:
    """Finished trial runs of this study with their roles, axes and metrics (from MLflow)."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_id}' and tags.`{T.ROLE_TAG}` = 'trial'",
        max_results=1000)
    out = []
    for r in runs:
        tags = r.data.tags
        out.append({
            "key": tags.get(T.KEY_TAG), "run_id": r.info.run_id, "status": r.info.status,
            "roles": [x for x in tags.get("flowers.roles", "").split(",") if x],
            "axes": {k[5:]: v for k, v in tags.items() if k.startswith("axis.")},
            "metrics": dict(r.data.metrics), "params": dict(r.data.params),
        })
    return out


def select_champions(study: C.StudyConfig, records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each level's best finished trial by best validation accuracy (see `l2_select`)."""
    done = [r for r in records if r["status"] == "FINISHED" and "best_val_acc" in r["metrics"]]
    chosen = {}
    for level in study.levels:
        if level == "l2" and study.l2_select == "best_grid":
            cands = [r for r in done if "ablation" in r["roles"] and r["axes"].get("augment") == "strong"]
        else:
            cands = [r for r in done if level in r["roles"]]
        if cands:
            chosen[level] = max(cands, key=lambda r: r["metrics"]["best_val_acc"])
    return chosen


def _version_of_run(client, name: str, run_id: str):
    """The version of `name` already registered from `run_id` (a resumed study registers it once)."""
    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except Exception:  # no such model yet
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def gate(study: C.StudyConfig, tracker: T.StudyTracker, name: str, version: str):
    """The champion/challenger gate for a version the study just registered (`flowers.governance`).

    A version the gate cannot compare (tested on another split, no per-image results) stays
    a challenger, with the reason in its `gate.*` tags; the champion does not move.
    """
    try:
        return governance.decide(name, version, tracker.target.tracking_uri, study.gate_margin, client=tracker.client)
    except governance.GateError as e:
        log.warning("%s version %s stays a challenger: %s", name, version, e)
        refused = governance.Decision(name, str(version), "refused", False, str(e), margin=study.gate_margin)
        for k, v in refused.tags().items():
            tracker.client.set_model_version_tag(name, str(version), k, v)
        return refused


def register_levels(study: C.StudyConfig, tracker: T.StudyTracker, records: list[dict[str, Any]]) -> dict[str, str]:
    """Register each level's best trial as a challenger of `flowers-lN` and run the gate; level → champion URI."""
    out = {}
    for level, rec in select_champions(study, records).items():
        name = registry.REGISTERED[level]
        mv = _version_of_run(tracker.client, name, rec["run_id"])
        if mv is None:
            version = registry.register(
                tracker.client, name, rec["run_id"], "model", registry.CHALLENGER,
                {T.STUDY_TAG: study.name, "trial": rec["key"], "val_acc": f"{rec['metrics']['best_val_acc']:.4f}",
                 "test_top1": f"{rec['metrics'].get('test_top1', float('nan')):.4f}",
                 **T.version_tags(tracker.client, rec["run_id"])},
                model_tags={T.STUDY_TAG: study.name})
        else:
            version = str(mv.version)
        if mv is None or governance.GATE_PREFIX + "decision" not in (mv.tags or {}):
            gate(study, tracker, name, version)
        out[level] = champion_uri(level)
    return out


def stage_done(tracker: T.StudyTracker, key: str) -> bool:
    """Whether the stage's child run finished (a resumed study skips it)."""
    rid = tracker.find(key, "stage")
    return bool(rid) and tracker.client.get_run(rid).info.status == "FINISHED"


def _log_stage(study: C.StudyConfig, tracker: T.StudyTracker, run_id: str, result, stage: str) -> str:
    """Log a stage's results, register its model as a challenger and run the gate; the champion URI."""
    tracker.log_params(run_id, result.params)
    tracker.log_metrics(run_id, result.metrics)
    tracker.set_tags(run_id, result.tags)
    tracker.log_artifacts(run_id, result.artifacts, "artifacts")
    name = registry.REGISTERED[stage]
    version = tracker.log_model_dir(run_id, result.model_dir, "model", name, registry.CHALLENGER,
                                    {T.STUDY_TAG: tracker.study})
    for key in ("uncertainty_threshold", "uncertainty_temperature"):  # the stored flag rule, on the version too
        if result.metrics.get(key) is not None:
            tracker.client.set_model_version_tag(name, str(version), f"flowers.{key}", f"{result.metrics[key]:.6g}")
    gate(study, tracker, name, version)
    tracker.finish(run_id)
    return champion_uri(stage)


def run_ensemble(study: C.StudyConfig, config_dir: Path, tracker: T.StudyTracker, members: dict[str, str],
                 out_dir: Path) -> str | None:
    """L4: soft voting over the registered levels, as a child run; registers flowers-ensemble.

    Returns its URI, or None (with a warning) when fewer than two members are registered.
    """
    from flowers.ensemble import run_ensemble_stage

    members = {k: v for k, v in members.items() if k in study.ensemble_members}
    if len(members) < 2:
        log.warning("ensemble stage skipped: needs at least two registered levels, have %s", sorted(members))
        return None
    data_cfg = trial_config(study, config_dir, next(iter(study.levels.values()))).data
    result = run_ensemble_stage(members, data_cfg, out_dir)
    run_id = tracker.child(ENSEMBLE_KEY, "stage", {"flowers.stage": ENSEMBLE_KEY})
    return _log_stage(study, tracker, run_id, result, "ensemble")


def run_distill(study: C.StudyConfig, config_dir: Path, tracker: T.StudyTracker, teacher: str,
                out_dir: Path) -> str | None:
    """L5: distil `teacher` into the student, as a child run with per-epoch metrics; registers flowers-student.

    Returns its URI, or None (with a warning) when the study names no student config.
    """
    from flowers.distill import run_distill_stage

    if not study.distill_config or not study_path(config_dir, study.distill_config).is_file():
        log.warning("distill stage skipped: no student config (distill_config=%r)", study.distill_config)
        return None
    cfg = trial_config(study, config_dir, study.distill_config, [f"distill.teacher={teacher}"])
    run_id = tracker.child(DISTILL_KEY, "stage", {"flowers.stage": DISTILL_KEY})
    tracker.log_params(run_id, C.to_flat_dict(cfg))

    def callback(metrics: dict[str, float], run_dir: Path) -> None:
        tracker.log_metrics(run_id, metrics, step=int(metrics.get("epoch", 0)))

    result = run_distill_stage(cfg, out_dir, callback=callback)
    return _log_stage(study, tracker, run_id, result, "distill")


def run_robustness(study: C.StudyConfig, config_dir: Path, tracker: T.StudyTracker, registered: dict[str, str],
                   out_dir: Path) -> str | None:
    """After L5: the shift suite and the OOD photos for the champions (flowers.evaluation.study_step)."""
    from flowers.evaluation.study_step import run_robustness as run

    return run(study, config_dir, tracker, registered, out_dir, study.shift_suite, study.shift_per_class, study.ood_dir)


def hardware() -> str:
    """One line for reports: CPU model and cores, GPU if any."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"
