"""What the MLflow UI shows about a study: run names, generated descriptions, one metric vocabulary.

Every text here is generated from the config a run actually used (a flat `section.key` dict,
as logged in the run's params), never hand-written per level: a field the config lacks reads
"unknown". `mlflow_metrics` maps the names the training code uses (`val_acc`, `test_top1`, ...)
onto one namespaced vocabulary (`val/acc`, `test/acc`, ...) shared by every level, so the UI
groups them and a column or chart compares L1..L5 directly.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

UNKNOWN = "unknown"
NOTE_TAG = "mlflow.note.content"  # the run's (and the experiment's) description in the UI
LEVEL_TAG = "flowers.level"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # land on the runs table
LEVEL_NAMES = {"l1": "L1 baseline", "l2": "L2 regularized", "l3": "L3 attention", "l4": "L4 ensemble",
               "l5": "L5 student"}
LEVEL_ADDS = {
    "l1": "the transfer baseline: a pretrained backbone fine-tuned on Flowers-102",
    "l2": "regularization over L1: the augmentation, label smoothing, weight decay and schedule listed here",
    "l3": "attention pooling over L1: a 1x1-conv spatial attention map weights the pooled features",
}
FAMILIES = {
    "flowers-l1": "L1 transfer baseline (a pretrained backbone fine-tuned on Flowers-102)",
    "flowers-l2": "L2 regularized recipe (L1 + strong augmentation, label smoothing, weight decay, cosine schedule)",
    "flowers-l3": "L3 attention pooling (L1's backbone with spatial attention-weighted pooling)",
    "flowers-ensemble": "L4 soft-voting ensemble of the registered L1-L3 champions",
    "flowers-student": "L5 distilled student, exported to static INT8 ONNX (the deployed model)",
}


def _get(flat: Mapping[str, Any], key: str) -> str:
    v = flat.get(key)
    return UNKNOWN if v is None or v in ("", "None", "null") else str(v)


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def _classes(flat: Mapping[str, Any]) -> str:
    n = _int(flat.get("data.classes"))
    return f" (first {n} classes only)" if n else ""


def _data_root(flat: Mapping[str, Any]) -> str:
    if "data.root" in flat and flat["data.root"] in (None, "None", "null"):
        return "$FLOWERS_DATA (else the download cache)"  # what an unset root means, not a missing field
    return _get(flat, "data.root")


def _pretrained(flat: Mapping[str, Any]) -> str:
    v = _get(flat, "model.pretrained")
    return {"False": "none (random init)", "false": "none (random init)",
            "packaged": "ImageNet (offline package)"}.get(v, v)


def level_of(roles: Sequence[str]) -> str:
    """The `flowers.level` tag of a trial: its level role, else `grid` for an ablation-only point."""
    return next((r for r in roles if r in LEVEL_NAMES), "grid" if "ablation" in roles else UNKNOWN)


def run_name(key: str, roles: Sequence[str] = (), axes: Mapping[str, str] | None = None) -> str:
    """Short, unique and readable in the runs table: `L1 baseline`, `grid strong/ls_wd/cosine`, ...

    Level names start with `L<n>` so sorting by name lists the levels in order, grid points after.
    """
    level = level_of(roles) if roles else key
    if level in LEVEL_NAMES:
        return LEVEL_NAMES[level]
    if axes:
        return "grid " + "/".join(str(v) for v in axes.values())
    return key


def _setup_lines(flat: Mapping[str, Any]) -> list[str]:
    arch = _get(flat, "model.arch")
    if _get(flat, "model.attention") == "True":
        arch += " + attention pooling"
    frozen = ""
    if _get(flat, "data.feature_cache") == "True":
        frozen = (f" (frozen trunk on cached features; the top {_get(flat, 'model.trainable_units')} backbone units "
                  "and the head train)")
    return [
        f"- Architecture: {arch}{frozen}",
        f"- Pretrained weights: {_pretrained(flat)}",
        f"- Data: {_data_root(flat)}{_classes(flat)}, split {_get(flat, 'data.split')} (seed {_get(flat, 'data.seed')}), "
        f"image size {_get(flat, 'data.image_size')} px",
        f"- Training: {_get(flat, 'train.epochs')} epochs, AdamW lr {_get(flat, 'optim.lr')} "
        f"(backbone x{_get(flat, 'optim.backbone_lr_mult')}), weight decay {_get(flat, 'optim.weight_decay')}, "
        f"label smoothing {_get(flat, 'optim.label_smoothing')}, {_get(flat, 'optim.schedule')} schedule "
        f"(warmup {_get(flat, 'optim.warmup_epochs')} epochs), batch {_get(flat, 'data.batch_size')}",
        f"- Augmentation: {_get(flat, 'data.augment')}" + (
            f" (cutout {_get(flat, 'data.cutout_frac')})" if _get(flat, "data.augment") == "strong" else "") + (
            f", plus {flat['data.shift_views']} shift-matched cached views" if _int(flat.get("data.shift_views")) else ""),
    ]


def _summary(flat: Mapping[str, Any]) -> str:
    """The one line the runs table's Description column shows: network, weights, size, budget, recipe."""
    arch = _get(flat, "model.arch") + (" + attention" if _get(flat, "model.attention") == "True" else "")
    return (f"{arch}, pretrained {_pretrained(flat)}, {_get(flat, 'data.image_size')} px, "
            f"{_get(flat, 'train.epochs')} epochs, AdamW lr {_get(flat, 'optim.lr')}, "
            f"{_get(flat, 'data.augment')} augmentation")


def describe_trial(flat: Mapping[str, Any], roles: Sequence[str] = (), axes: Mapping[str, str] | None = None) -> str:
    """The description of a trained model's run (L1, L2, L3, a grid point), from its config."""
    level = level_of(roles)
    head = LEVEL_NAMES.get(level) or ("grid " + "/".join(map(str, axes.values())) if axes else "L2 ablation grid point")
    adds = LEVEL_ADDS.get(level)
    lines = [f"{head}: {_summary(flat)}.", ""]
    if adds:
        lines += [f"This level: {adds}.", ""]
    if axes:
        lines += ["- Grid point (L2 ablation): " + ", ".join(f"{k}={v}" for k, v in axes.items()) +
                  (" (also this level's trial)" if level in LEVEL_NAMES else "")]
    lines += _setup_lines(flat)
    lines += ["", "Metrics: `val/acc` per epoch, `test/acc` of the best-val checkpoint. Model: this run's `model`."]
    return "\n".join(lines)


def describe_ensemble(members: Mapping[str, str], versions: Mapping[str, str] | None = None,
                      data_source: str | None = None) -> str:
    """The L4 run's description: which registered members it averages."""
    versions = versions or {}
    parts = [f"{k} ({v} v{versions[k]})" if versions.get(k) else f"{k} ({v})" for k, v in members.items()]
    return "\n".join([
        f"L4 ensemble: soft voting over {', '.join(parts) or UNKNOWN}; nothing trained.", "",
        "The ensemble averages its members' probabilities (equal weights).", "",
        f"- Members: {', '.join(parts) or UNKNOWN}",
        f"- Data: {data_source or UNKNOWN} (the members' own split)",
        "", "Metrics: `val/acc`, `test/acc`; each member's under `members/<level>/`; diversity under `diversity/`."])


def describe_student(flat: Mapping[str, Any], recipe: str | None = None) -> str:
    """The L5 run's description: teacher, distillation settings, student config and the INT8 export."""
    lines = [f"L5 student: {_summary(flat)}, distilled from {_get(flat, 'distill.teacher')}, exported to static "
             f"INT8 ONNX.", "",
             "Knowledge distillation into a small network; the INT8 export is the deployed model.", "",
             f"- Teacher: {_get(flat, 'distill.teacher')} (temperature {_get(flat, 'distill.temperature')}, "
             f"KD weight alpha {_get(flat, 'distill.alpha')}, cached teacher {_get(flat, 'distill.cache_teacher')})"]
    lines += _setup_lines(flat)
    lines += [f"- INT8 recipe: {recipe or _get(flat, 'distill.int8_recipe')}", "",
              "Metrics: `test/acc` is the deployed INT8 model (also `test/acc_int8`); `test/acc_fp32` is the "
              "float student before export; `teacher/test_acc` the teacher on the same images."]
    return "\n".join(lines)


def study_note(study: str, trials: Sequence[str], stages: Sequence[str]) -> str:
    """The parent run's description."""
    return "\n".join([
        f"Study {study}: {len(trials)} trials, then {', '.join(s for s in stages if s != 'tune') or 'no stages'}; "
        "the report is report/report.html.", "",
        "Every level of the project on one split, as nested runs.", "",
        f"- Trials: {', '.join(trials) or UNKNOWN}", f"- Stages after the trials: {', '.join(s for s in stages if s != 'tune') or 'none'}",
        "- The report (with its figures) is this run's artifact `report/report.html`.",
    ])


# MLflow 3.17's UI picks its landing page from the sidebar's GenAI / Model training switch (remembered by the
# browser, GenAI by default), not from `mlflow.experimentKind`: a link with workflowType=machine_learning
# lands on the runs table; sorting by run name lists L1..L5 first
RUNS_VIEW = "runs?workflowType=machine_learning&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"


def runs_url(base: str, experiment_id: str) -> str:
    """The study's runs table in the MLflow UI at `base` (e.g. http://127.0.0.1:5000), levels first."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/{RUNS_VIEW}"


def experiment_note(study: str, experiment_id: str | None = None) -> str:
    """The experiment's description: what it is, where the report is, how to compare levels."""
    link = f" ([open it]({runs_url('', experiment_id)[1:]}))" if experiment_id else ""
    return "\n".join([
        f"{study}: the flowers training study (Oxford Flowers-102 classification, levels L1 to L5).", "",
        f"- The runs table, sorted by Run Name, lists L1..L5 first{link}.",
        "- Levels: L1 transfer baseline, L2 regularized recipe, L3 attention pooling, L4 soft-voting ensemble, "
        "L5 distilled INT8 student; `grid ...` runs are the L2 ablation grid.",
        f"- The parent run `{study}` holds the study report: Artifacts → `report/report.html`.",
        "- Compare levels: sort the runs by *Run Name* (L1..L5 come first), show the columns `test/acc` and "
        "`val/best_acc`, and use the chart view for `val/acc` per epoch.",
        "- Registered models (Models tab): flowers-l1, -l2, -l3, -ensemble, -student; `@champion` is what serving "
        "and scoring follow, `@challenger` the newest version.",
    ])


def model_description(name: str) -> str:
    """A registered model's description: the family and what its aliases mean."""
    what = FAMILIES.get(name, "a flowers model")
    return (f"{what}.\n\nAliases: `champion` is what serving and scoring load (moved only by the champion/"
            "challenger gate, `flowers models promote`); `challenger` is the newest version the study registered. "
            "Each version's description is its model card.")


# ----------------------------------------------------------------------------- metric vocabulary

_COMMON = {
    "train_loss": "train/loss", "train_acc": "train/acc", "lr": "train/lr", "val_loss": "val/loss",
    "val_acc": "val/acc", "val_top5": "val/top5", "best_val_acc": "val/best_acc", "best_epoch": "val/best_epoch",
    "epoch_seconds": "perf/epoch_seconds", "images_per_s": "perf/images_per_s",
    "test_top1": "test/acc", "test_top5": "test/top5", "test_nll": "test/nll", "test_ece": "test/ece",
    "test_mean_per_class_acc": "test/mean_per_class_acc",
    "feature_cache_seconds": "perf/feature_cache_seconds", "study_wall_seconds": "perf/study_wall_seconds",
}
# per run kind: what differs from the common names (None: not logged, it is already a per-epoch series)
_BY_KIND: dict[str, dict[str, str | None]] = {
    "trial": {},
    "ensemble": {"val_top1": "val/acc", "oracle_top1": "diversity/oracle_acc",
                 "gain_over_best_member": "test/gain_over_best_member"},
    "student": {"val_top1": None, "test_top1": "test/acc_fp32", "test_top5": "test/top5_fp32",
                "test_nll": "test/nll_fp32", "test_ece": "test/ece_fp32", "int8_test_top1": "test/acc_int8",
                "int8_test_top5": "test/top5_int8", "int8_test_nll": "test/nll_int8",
                "onnx_fp32_test_top1": "test/acc_onnx_fp32", "dynamic_int8_test_top1": "test/acc_dynamic_int8",
                "teacher_test_top1": "teacher/test_acc", "int8_agreement": "test/int8_fp32_agreement",
                "student_teacher_agreement": "test/student_teacher_agreement",
                "int8_drop_points": "test/int8_drop_points", "student_gap_to_teacher_points": "test/gap_to_teacher_points",
                "teacher_setup_seconds": "perf/teacher_setup_seconds",
                "speedup_int8_vs_teacher": "latency/speedup_int8_vs_teacher"},
}
_UNCERTAINTY = ("uncertainty_threshold", "coverage_at_threshold", "selective_acc_at_threshold", "entropy_auroc",
                "aurc", "mean_entropy")


def metric_name(key: str, kind: str = "trial") -> str | None:
    """The MLflow name of a metric the code calls `key`, for a run of `kind` (trial, ensemble, student)."""
    table = _BY_KIND.get(kind, {})
    if key in table:
        return table[key]
    if key in _COMMON:
        return _COMMON[key]
    if "/" in key:
        return key  # already in the vocabulary
    if m := re.fullmatch(r"member_(.+)_(test|val)_(top1|nll)", key):
        return f"members/{m[1]}/{m[2]}_{'acc' if m[3] == 'top1' else m[3]}"
    if key in _UNCERTAINTY or key.startswith(("ood_", "in_dist_")):
        return f"uncertainty/{key}"
    if key.startswith("latency_"):
        return f"latency/{key[len('latency_'):]}"
    if key.startswith("test_"):
        return f"test/{key[len('test_'):]}"
    if kind == "ensemble":
        return f"diversity/{key}"
    return f"{kind}/{key}" if kind != "trial" else key


def mlflow_metrics(metrics: Mapping[str, Any], kind: str = "trial") -> dict[str, Any]:
    """`metrics` renamed into the vocabulary; `epoch` (the step) and per-epoch duplicates dropped.

    The student's deployed model is INT8: its `test/acc` is the INT8 figure, so the `test/acc`
    column compares what each level would serve; `test/acc_fp32` and `test/acc_int8` name both.
    """
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if k in ("epoch", "threads"):
            continue
        name = metric_name(k, kind)
        if name:
            out[name] = v
    if kind == "student" and "test/acc_int8" in out:
        out["test/acc"] = out["test/acc_int8"]
    return out


def card_with_gate(card: str, decision: Any) -> str:
    """A model card plus the gate's decision for its version (`flowers.registry.governance.Decision`): the
    registered version's description."""
    champ = f" against version {decision.champion_version}" if decision.champion_version else ""
    return (f"{card.rstrip()}\n\n## Gate decision\n\n**{decision.decision}**{champ}"
            f"{' (now champion)' if decision.promoted else ''}: {decision.reason}\n")


def dataset_record(data: Any, name: str = "flowers") -> dict[str, Any]:
    """What a run trained and was tested on (a `flowers.data.bundle.DataBundle`), for MLflow's dataset
    inputs: the dataset checksum and, per split part, its image count and hash (the test part's hash
    is the lineage's `split_hash`)."""
    from flowers.models.checkpoint import dataset_checksum, image_id, split_hash

    parts = {"train": data.train, "val": data.val, "test": data.test}
    return {"name": name, "source": data.source,
            "data_checksum": dataset_checksum([p for d in parts.values() for p in d.paths],
                                              [int(y) for d in parts.values() for y in d.labels]),
            "splits": {k: {"images": len(d.paths), "hash": split_hash([image_id(p) for p in d.paths])}
                       for k, d in parts.items()}}


def describe_robustness(shifts: list[str], images: int, models: dict[str, str], ood_photos: int) -> str:
    """The robustness step's description: what it scored, under what, and where the tables are."""
    return "\n".join([
        "Robustness step: the champions on the test split under named, seeded shifts, and on non-flower photos.", "",
        f"- Models: {', '.join(f'{k} ({v})' for k, v in models.items()) or UNKNOWN}",
        f"- Test images: {images or UNKNOWN} (a seeded subset per class); shifts: {', '.join(shifts) or UNKNOWN}",
        f"- Non-flower photos: {ood_photos or 'none'}",
        "- Metrics: `<model>.<shift>.top1` and `.flagged`, the mean and the worst shift per model; tables and plots "
        "under `robustness/` (docs/robustness.md).",
    ])
