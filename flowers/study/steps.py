"""The study's steps after Tune, Ray-free: champions, the L4/L5 stages, the hardware line.

`trial_records` reads the finished trials back from MLflow, `register_levels` registers
each level's best one as a challenger of `flowers-lN` and runs the champion gate
(`flowers.registry.governance`), and `run_ensemble` / `run_distill` run the L4 and L5 stages
(`flowers.training.ensemble`, `flowers.training.distill`) as child runs of the study and register their models
the same way. `jobs/study.py` calls them in order after the Tune step.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from flowers import config as C
from flowers.registry import governance
from flowers.registry import uris as registry
from flowers.registry import run_notes as N
from flowers.registry import tracking as T
from flowers.study.plan import StudyPlan

log = logging.getLogger(__name__)

ENSEMBLE_KEY = "l4-ensemble"
DISTILL_KEY = "l5-distill"
BEST_VAL, TEST_ACC = "val/best_acc", "test/acc"  # MLflow names (flowers.registry.run_notes vocabulary)


_CACHE_KEYS = ("data.root", "data.format", "data.split", "data.seed", "data.classes", "data.image_size",
               "data.resize_size", "data.augment", "data.cutout_frac", "data.cache_views", "data.shift_views", "data.cache_dir",
               "model.arch", "model.pretrained", "model.trainable_units", "train.seed")


def warm_feature_caches(cfgs: list[C.Config]) -> float:
    """Build the feature-cache entries the trials will open, each once, with all of this process's cores
    (before 1-CPU trials start; `flowers.training.feature_cache`). Returns the seconds spent."""
    from flowers.training.loop import warm_feature_cache

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
    done = [r for r in records if r["status"] == "FINISHED" and BEST_VAL in r["metrics"]]
    chosen = {}
    for level in study.levels:
        if level == "l2" and study.l2_select == "best_grid":
            cands = [r for r in done if "ablation" in r["roles"] and r["axes"].get("augment") == "strong"]
        else:
            cands = [r for r in done if level in r["roles"]]
        if cands:
            chosen[level] = max(cands, key=lambda r: r["metrics"][BEST_VAL])
    return chosen


def _version_of_run(client, name: str, run_id: str):
    """The version of `name` already registered from `run_id` (a resumed study registers it once)."""
    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except Exception:  # no such model yet
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def gate(study: C.StudyConfig, tracker: T.StudyTracker, name: str, version: str):
    """The champion/challenger gate for a version the study just registered (`flowers.registry.governance`).

    A version the gate cannot compare (tested on another split, no per-image results) stays
    a challenger, with the reason in its `gate.*` tags; the champion does not move.
    """
    try:
        decision = governance.decide(name, version, tracker.target.tracking_uri, study.gate_margin,
                                     client=tracker.client)
    except governance.GateError as e:
        log.warning("%s version %s stays a challenger: %s", name, version, e)
        decision = governance.Decision(name, str(version), "refused", False, str(e), margin=study.gate_margin)
        for k, v in decision.tags().items():
            tracker.client.set_model_version_tag(name, str(version), k, v)
    card = tracker.client.get_model_version(name, str(version)).description or ""
    if "## Gate decision" not in card:  # the version's description: its model card with the gate's decision
        tracker.client.update_model_version(name, str(version), description=registry.fit_description(
            N.card_with_gate(card, decision)))
    return decision


def register_levels(study: C.StudyConfig, tracker: T.StudyTracker, records: list[dict[str, Any]]) -> dict[str, str]:
    """Register each level's best trial as a challenger of `flowers-lN` and run the gate; level → champion URI.

    A version's description is the model card its logged model carries; its run gets Grad-CAM grids.
    """
    out = {}
    for level, rec in select_champions(study, records).items():
        name = registry.REGISTERED[level]
        mv = _version_of_run(tracker.client, name, rec["run_id"])
        if mv is None:
            version = registry.register(
                tracker.client, name, rec["run_id"], "model", registry.CHALLENGER,
                {T.STUDY_TAG: study.name, "trial": rec["key"], "val_acc": f"{rec['metrics'][BEST_VAL]:.4f}",
                 "test_acc": f"{rec['metrics'].get(TEST_ACC, float('nan')):.4f}",
                 **T.version_tags(tracker.client, rec["run_id"])},
                _card(tracker, rec["run_id"], name), model_tags={T.STUDY_TAG: study.name})
        else:
            version = str(mv.version)
        if mv is None or governance.GATE_PREFIX + "decision" not in (mv.tags or {}):
            gate(study, tracker, name, version)
        explain_level(tracker, rec["run_id"], f"models:/{name}/{version}")
        out[level] = champion_uri(level)
    return out


def _card(tracker: T.StudyTracker, run_id: str, name: str) -> str | None:
    """The model card of a run's logged model, titled with the registered name (None when it has none)."""
    import tempfile

    from mlflow.artifacts import download_artifacts

    from flowers.registry.flavor import CARD

    with tempfile.TemporaryDirectory() as tmp:
        try:
            text = Path(download_artifacts(artifact_uri=f"runs:/{run_id}/model/{CARD}", dst_path=tmp,
                                           tracking_uri=tracker.client.tracking_uri)).read_text()
        except Exception as e:  # MLflow raises many types for a missing artifact
            log.warning("run %s: no model card (%s)", run_id, str(e).splitlines()[0])
            return None
    first, _, rest = text.partition("\n")  # the trial logged it under its own name, before registration
    return f"# Model card: {name}\n{rest}" if first.startswith("# Model card") else text


def explain_level(tracker: T.StudyTracker, run_id: str, uri: str, images: int = 8) -> None:
    """Grad-CAM grids of a registered level model on its test images, as the run's images (once).

    The choice of images needs only the predictions, which the model folder's per-image test
    results carry: nothing is predicted again. Never fails the study (a warning instead).
    """
    import tempfile

    import numpy as np

    if any(a.path.startswith("images/gradcam") for a in tracker.client.list_artifacts(run_id, "images")):
        return
    try:
        from flowers.models.checkpoint import image_id, read_per_image
        from flowers.data.bundle import build_data
        from flowers.inference.explain import explain_dataset
        from flowers.registry.flavor import FOLDER_PATH
        from flowers.inference.predict import load_model

        where = registry.fetch(registry.resolve_ref(uri, tracker.target))
        model, record = load_model(where), read_per_image(where / FOLDER_PATH)
        dc = C.build(C.DataConfig, model.meta["config"]["data"])
        test = build_data(dc, model.preprocessing).eval_part("test", model.transform(), model.draft_size)
        if [image_id(p) for p in test.paths] != list(record["ids"]):
            raise ValueError("the test images here differ from the ones the model was tested on")
        preds = np.asarray(record["preds"])
        onehot = np.eye(len(model.class_names), dtype=np.float32)[preds]  # explain_dataset reads only argmax
        with tempfile.TemporaryDirectory() as tmp:
            files = explain_dataset(model, test, onehot, np.asarray(record["labels"]), Path(tmp), n=images,
                                    pairs=min(3, images))
            tracker.log_images(run_id, {f"gradcam/{p.stem.removesuffix('_explain')}": p for p in files})
    except Exception as e:  # pictures must not cost the study its models
        log.warning("Grad-CAM for %s skipped: %s", uri, str(e).splitlines()[0] if str(e) else type(e).__name__)


def stage_done(tracker: T.StudyTracker, key: str) -> bool:
    """Whether the stage's child run finished (a resumed study skips it)."""
    rid = tracker.find(key, "stage")
    return bool(rid) and tracker.client.get_run(rid).info.status == "FINISHED"


def _log_stage(study: C.StudyConfig, tracker: T.StudyTracker, run_id: str, result, stage: str) -> str:
    """Log a stage's results, register its model as a challenger and run the gate; the champion URI."""
    kind = "ensemble" if stage == "ensemble" else "student"
    tracker.log_params(run_id, result.params)
    tracker.log_metrics(run_id, result.metrics, kind=kind)
    tracker.set_tags(run_id, result.tags)
    tracker.log_artifacts(run_id, result.artifacts, "artifacts")
    log_stage_views(tracker, run_id, result.artifacts)
    name = registry.REGISTERED[stage]
    version = tracker.log_model_dir(run_id, result.model_dir, "model", name, registry.CHALLENGER,
                                    {T.STUDY_TAG: tracker.study})
    for key in ("uncertainty_threshold", "uncertainty_temperature"):  # the stored flag rule, on the version too
        if result.metrics.get(key) is not None:
            tracker.client.set_model_version_tag(name, str(version), f"flowers.{key}", f"{result.metrics[key]:.6g}")
    gate(study, tracker, name, version)
    tracker.finish(run_id)
    return champion_uri(stage)


def log_stage_views(tracker: T.StudyTracker, run_id: str, artifacts: list[Path]) -> None:
    """A stage's files as the UI's views: dataset inputs, per-class/most-confused tables, confusion and
    Grad-CAM images (`explain/...png`)."""
    images = {}
    for p in map(Path, artifacts):
        if p.name == "datasets.json" and p.is_file():
            tracker.log_datasets(run_id, json.loads(p.read_text()))
        elif p.name.endswith("_per_class.csv"):
            tracker.log_eval_tables(run_id, p.parent, p.name.removesuffix("_per_class.csv"))
        elif p.name.endswith("_confusion.png"):
            images["test/confusion"] = p
        elif p.suffix == ".png" and "explain" in p.parts:
            rel = p.parts[p.parts.index("explain") + 1:]
            images["gradcam/" + "/".join([*rel[:-1], p.stem.removesuffix("_explain")])] = p
    tracker.log_images(run_id, images)


def run_ensemble(plan: StudyPlan, tracker: T.StudyTracker, members: dict[str, str], out_dir: Path) -> str | None:
    """L4: soft voting over the registered levels, as a child run; registers flowers-ensemble.

    Returns its URI, or None (with a warning) when fewer than two members are registered.
    """
    from flowers.training.ensemble import run_ensemble_stage

    study = plan.study
    members = {k: v for k, v in members.items() if k in study.ensemble_members}
    if len(members) < 2:
        log.warning("ensemble stage skipped: needs at least two registered levels, have %s", sorted(members))
        return None
    result = run_ensemble_stage(members, plan.data, out_dir, target=tracker.target)
    run_id = tracker.child(ENSEMBLE_KEY, "stage", {"flowers.stage": ENSEMBLE_KEY, N.LEVEL_TAG: "l4",
                                                    "mlflow.runName": N.LEVEL_NAMES["l4"]})
    versions = {k: result.tags.get(f"member_{k}_version") for k in members}
    ds = next((Path(p) for p in result.artifacts if Path(p).name == "datasets.json"), None)
    source = json.loads(ds.read_text()).get("source") if ds and ds.is_file() else None
    tracker.describe(run_id, N.describe_ensemble(members, versions, source))
    return _log_stage(study, tracker, run_id, result, "ensemble")


def run_distill(plan: StudyPlan, tracker: T.StudyTracker, teacher: str, out_dir: Path) -> str | None:
    """L5: distil `teacher` into the student, as a child run with per-epoch metrics; registers flowers-student.

    Returns its URI, or None (with a warning) when the study names no student config.
    """
    from flowers.training.distill import run_distill_stage

    if plan.student is None:
        log.warning("distill stage skipped: no student config (distill_config=%r)", plan.study.distill_config)
        return None
    cfg = C.replace(plan.student, {"distill.teacher": teacher})
    run_id = tracker.child(DISTILL_KEY, "stage", {"flowers.stage": DISTILL_KEY, N.LEVEL_TAG: "l5",
                                                   "mlflow.runName": N.LEVEL_NAMES["l5"]})
    flat = C.to_flat_dict(cfg)
    tracker.log_params(run_id, flat)
    tracker.describe(run_id, N.describe_student(flat))

    def callback(metrics: dict[str, float], run_dir: Path) -> None:
        tracker.log_metrics(run_id, metrics, step=int(metrics.get("epoch", 0)), kind="student")

    result = run_distill_stage(cfg, out_dir, callback=callback, teacher=registry.resolve_ref(teacher, tracker.target))
    return _log_stage(plan.study, tracker, run_id, result, "distill")


def run_robustness(plan: StudyPlan, tracker: T.StudyTracker, registered: dict[str, str], out_dir: Path) -> str | None:
    """After L5: the shift suite and the OOD photos for the champions (flowers.study.robustness_step)."""
    from flowers.study.robustness_step import run_robustness as run

    study = plan.study
    return run(plan.data, tracker, registered, out_dir, study.shift_suite, study.shift_per_class, study.ood_dir)


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
