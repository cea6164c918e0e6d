"""The study's robustness step (after L5): the shift suite and the OOD photos for the champions.

`run_robustness` scores the registered ensemble (with its members: the levels) and the INT8 student
under the shift suite on a seeded, stratified part of the test split, and on real non-flower photos
against the validation images; it logs one child run (`robustness`) with flat metrics
(`<model>.<shift>.top1`, `<model>.<shift>.flagged`, `<model>.ood.<score>_auroc`, ...) and the tables
and plots, after everything has run. `report_lines` turns that run's metrics into the study report's
combined table.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flowers import config as C
from flowers.registry import run_notes as N

log = logging.getLogger(__name__)

ROBUSTNESS_KEY = "robustness"


def default_ood_dir() -> Path:
    """Where the OOD photo set is built once per machine (next to the feature cache)."""
    from flowers.data.remote import cache_root

    return cache_root().parent / "ood-photos"


def ensure_ood_photos(folder: str | None) -> Path | None:
    """The OOD photo folder: the given one, else the default, built from its package when missing.
    None (with a warning) when it cannot be built here: the OOD part of the step is then skipped."""
    from flowers.evaluation import ood_sources

    path = Path(folder).expanduser() if folder else default_ood_dir()
    if (path / "SOURCES.json").is_file() or (folder and path.is_dir()):
        return path
    try:
        ood_sources.build(path)
        return path
    except (RuntimeError, OSError, ValueError) as e:
        log.warning("OOD photos not available (%s); the robustness step runs the shift suite only", e)
        return None


def flat_metrics(suite_metrics: dict[str, list[dict[str, Any]]], ood_tables: dict[str, dict[str, float]],
                 seconds: dict[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    """MLflow metrics and tags of the step: per model and shift top-1/flagged; OOD scores; timings."""
    metrics: dict[str, float] = {f"seconds.{k}": v for k, v in seconds.items()}
    tags: dict[str, str] = {}
    for model, rows in suite_metrics.items():
        key = model.replace("/", "_")
        for r in rows:
            shift = "worst" if r["shift"].startswith("worst") else r["shift"].replace("=", "_")
            metrics[f"{key}.{shift}.top1"] = r["top1"]
            metrics[f"{key}.{shift}.flagged"] = r["flagged"]
            if shift == "worst":
                tags[f"{key}.worst_shift"] = r["shift"][7:-1]
    for model, table in ood_tables.items():
        for k, v in table.items():
            metrics[f"{model.replace('/', '_')}.ood.{k}"] = v
    return metrics, tags


def run_robustness(data_cfg: C.DataConfig, tracker, registered: dict[str, str],
                   out_dir: Path, shifts: str = "all", per_class: int | None = 2,
                   ood_dir: str | None = None) -> str | None:
    """The step as a child run of the study; returns its run id (None when there is nothing to score)."""
    from flowers.evaluation.ood import run_ood
    from flowers.evaluation.robustness import run_shift_suite
    from flowers.evaluation.shifts import parse_shifts
    from flowers.registry.uris import resolve_ref

    uris = {k: v for k, v in (("ensemble", registered.get("ensemble")), ("student", registered.get("distill"))) if v}
    if not uris:
        log.warning("robustness step skipped: no registered ensemble or student")
        return None
    specs = parse_shifts(shifts)
    refs = {k: resolve_ref(v, tracker.target) for k, v in uris.items()}  # resolved once, for both parts
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    suite = run_shift_suite(refs, specs, data_cfg, out_dir, per_class=per_class, seed=data_cfg.seed)
    t1 = time.perf_counter()
    photos = ensure_ood_photos(ood_dir)
    ood = run_ood(refs, data_cfg, photos, out_dir) if photos else None
    seconds = {"shift_suite": t1 - t0, "ood": time.perf_counter() - t1}
    metrics, tags = flat_metrics(suite.tables, ood.tables if ood else {}, seconds)
    # logged once everything has run: a failure above leaves no half-written run behind
    run_id = tracker.child(ROBUSTNESS_KEY, "stage", {"flowers.stage": ROBUSTNESS_KEY, **tags})
    tracker.log_params(run_id, {"shifts": ",".join(s.label for s in specs), "per_class": per_class,
                                "test_images": suite.images, "ood_dir": str(photos) if photos else "",
                                "ood_photos": ood.photos if ood else 0, **{f"uri.{k}": v for k, v in uris.items()}})
    tracker.log_metrics(run_id, metrics)
    tracker.describe(run_id, N.describe_robustness([s.label for s in specs], suite.images, uris,
                                                   ood.photos if ood else 0))
    tracker.log_artifacts(run_id, suite.files + (ood.files if ood else []), "robustness")
    tracker.finish(run_id)
    log.info("robustness: %d test images x %d shifts in %.0f s, OOD in %.0f s", suite.images, len(specs),
             seconds["shift_suite"], seconds["ood"])
    return run_id


def report_lines(stage: dict[str, Any] | None) -> list[str]:
    """The study report's section: shifts as rows, top-1 / flagged per model; then the OOD table."""
    md = ["", "## Robustness: shift suite and non-flower photos", ""]
    if not stage or not stage.get("metrics"):
        return md + ["not run"]
    m, params, tags = stage["metrics"], stage.get("params") or {}, stage.get("tags") or {}
    models = sorted({k.split(".")[0] for k in m if k.endswith(".clean.top1")},
                    key=lambda x: (not x.startswith("ensemble"), x != "ensemble", x))
    shifts = [k.split(".")[1] for k in m if k.startswith(f"{models[0]}.") and k.endswith(".top1")] if models else []
    order = ["clean"] + sorted(s for s in shifts if s not in ("clean", "mean", "worst")) + ["mean", "worst"]
    md += [f"Top-1 % / flagged % on {params.get('test_images', '?')} test images "
           f"({params.get('per_class', '?')} per class, seeded) under each shift:", "",
           "| shift | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for s in order:
        cells = []
        for mod in models:
            top1, flag = m.get(f"{mod}.{s}.top1"), m.get(f"{mod}.{s}.flagged")
            worst = f" ({tags.get(f'{mod}.worst_shift', '?')})" if s == "worst" else ""
            cells.append("–" if top1 is None else f"{100 * top1:.1f} / {100 * flag:.0f}{worst}")
        md.append(f"| {s} | " + " | ".join(cells) + " |")
    ood_models = sorted({k.split(".")[0] for k in m if ".ood." in k})
    if ood_models:
        md += ["", f"Non-flower photos ({params.get('ood_photos', '?')}, {params.get('ood_dir', '')}): AUROC of each "
               "score against the validation images, photos flagged at the threshold that flags 5 % of validation, "
               "and what the stored rule flags:", "",
               "| model | AUROC entropy / max-softmax / energy | photos flagged at 5 % val flagged (entropy) | stored rule: "
               "photos / val flagged |", "|---|---|---:|---:|"]
        for mod in ood_models:
            au = " / ".join("n/a" if m.get(f"{mod}.ood.{k}_auroc") is None else f"{m[f'{mod}.ood.{k}_auroc']:.3f}"
                            for k in ("entropy", "msp", "energy"))
            md.append(f"| {mod} | {au} | {100 * m.get(f'{mod}.ood.entropy_ood_flagged', float('nan')):.1f} | "
                      f"{100 * m.get(f'{mod}.ood.stored_ood_flagged', float('nan')):.1f} / "
                      f"{100 * m.get(f'{mod}.ood.stored_in_flagged', float('nan')):.1f} |")
    secs = sum(v for k, v in m.items() if k.startswith("seconds."))
    md += ["", f"Step time: {secs:.0f} s. Shifts: flowers/evaluation/shifts.py; details: docs/robustness.md."]
    return md
