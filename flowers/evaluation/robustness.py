"""The shift suite for model URIs: load, score, summarize, write tables and plots (no tracking here).

`flowers evaluate --shifts` and the study's robustness step call `run_shift_suite`; the caller
logs what it returns (metrics and files) in one go once everything has run, so a bad input
(unknown shift, value out of range, a model or dataset that does not load) stops it before
anything is logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from flowers import config as C
from flowers.evaluation.shifts import Shift
from flowers.evaluation.suite import (SuiteModel, headline, markdown_table, plot_suite, score_suite,
                                      stratified_subset, summarize, write_tables)

if TYPE_CHECKING:
    from flowers.registry.uris import ModelRef

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5  # flowers.inference.predict's default for a model stored without one


@dataclass
class SuiteReport:
    """What a shift-suite run produced: a table per model, flat metrics per model, files to log."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    markdown: str = ""
    images: int = 0
    seconds: float = 0.0


def _rule(meta: dict[str, Any]) -> tuple[float, float]:
    thr = meta.get("uncertainty_threshold")
    return (float(thr) if thr is not None else DEFAULT_THRESHOLD), float(meta.get("uncertainty_temperature") or 1.0)


Ensembles = dict[str, tuple[list[str], list[float]]]


def suite_models(name: str, uri: "str | ModelRef") -> tuple[list[SuiteModel], Ensembles, dict[str, tuple[float, float]]]:
    """The models to run for `uri`: itself, or an ensemble's members (named `<name>/<member>`) plus the
    soft vote under `name`, so the levels come for free. Also each name's (threshold, temperature)."""
    from flowers.registry import uris as registry
    from flowers.models.checkpoint import locate_model
    from flowers.inference.ensemble_model import load_members
    from flowers.inference.predict import load_model

    ref = registry.resolve_ref(uri)  # a ModelRef from the caller passes through unchanged
    model = load_model(ref)  # verifies the registered manifest's checksum
    thr, temp = _rule(model.meta)
    if model.meta.get("kind") != "ensemble" and not model.meta.get("members"):
        return [SuiteModel(name, model, thr, temp)], {}, {name: (thr, temp)}
    _, folder, manifest = locate_model(registry.fetch(ref), manifest=ref.manifest or None)
    members = load_members(folder, manifest)
    out = [SuiteModel(f"{name}/{m}", loaded, *_rule(loaded.meta)) for m, loaded in members]
    weights = [float(w) for w in (manifest.get("weights") or [1.0] * len(members))]
    # the vote has its own stored rule, applied to the voted probabilities in `summarize`
    rules = {name: (thr, temp), **{s.name: (s.threshold, s.temperature) for s in out}}
    return out, {name: ([s.name for s in out], weights)}, rules


def run_shift_suite(uris: dict[str, str], shifts: Sequence[Shift], data_cfg: C.DataConfig, out_dir: Path,
                    per_class: int | None = None, seed: int = 0, batch_size: int = 32,
                    progress: bool = False) -> SuiteReport:
    """Score every model of `uris` (name → URI) on the test split of `data_cfg` under `shifts`."""
    from flowers.data.bundle import build_data

    models: list[SuiteModel] = []
    ensembles: Ensembles = {}
    rules: dict[str, tuple[float, float]] = {}
    for name, uri in uris.items():
        ms, ens, rule = suite_models(name, uri)
        rules.update(rule)
        models += ms
        ensembles.update(ens)
    data = build_data(data_cfg, models[0].model.preprocessing, seed=data_cfg.seed)
    for m in models:
        if list(m.model.class_names) != list(data.class_names):
            raise C.ConfigError(f"model '{m.name}' has {len(m.model.class_names)} classes but the data "
                                f"({data.source}) has {len(data.class_names)}; evaluate on the model's own dataset")
    idx = stratified_subset(data.test.labels, per_class, seed)
    paths = [data.test.paths[i] for i in idx]
    labels = np.asarray(data.test.labels)[idx]
    log.info("shift suite: %d models, %d test images, %d shifts", len(models), len(paths), len(shifts))
    result = score_suite(models, paths, labels, shifts, ensembles, seed=seed, batch_size=batch_size,
                         progress=progress)
    report = SuiteReport(images=len(paths), seconds=result.seconds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, per_shift in result.probs.items():
        rows = summarize(per_shift, labels, *rules[name])
        safe = name.replace("/", "_")
        report.tables[name] = rows
        report.metrics[name] = headline(rows)
        report.files += write_tables(safe, rows, out_dir) + [plot_suite(name, rows, out_dir / f"shifts_{safe}.png")]
    report.markdown = markdown_table(report.tables)
    (out_dir / "shifts.md").write_text(report.markdown + "\n")
    report.files.append(out_dir / "shifts.md")
    return report
