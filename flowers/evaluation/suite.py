"""The shift suite: a model's top-1 and flagged share on a split under every named shift.

Each test image is decoded once; every shift is applied to the decoded image (seeded by the
suite seed, the shift's place and the image's index, so a rerun gives the same pixels) and the
result goes through each model's own eval preprocessing and `predict_proba`: the one inference
path. An ensemble is scored through its members, so one pass gives every level and the soft
vote. `summarize` turns probabilities into the table (per shift, mean over shifts, worst shift);
`write_tables` and `plot_suite` write what the study and `flowers evaluate --shifts` log.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flowers.inference import uncertainty as U
from flowers.data import open_image
from flowers.evaluation.shifts import Shift, apply_shift
from flowers.runtime import progress_bar

log = logging.getLogger(__name__)

CLEAN = "clean"


@dataclass
class SuiteModel:
    """One model of the suite: how it predicts, and its stored flag rule (threshold, temperature)."""

    name: str
    model: Any  # flowers.inference.predict.LoadedModel
    threshold: float
    temperature: float = 1.0


@dataclass
class SuiteResult:
    """Probabilities per model and shift (CLEAN first), the labels and the summary rows."""

    labels: np.ndarray
    probs: dict[str, dict[str, np.ndarray]]
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0


def stratified_subset(labels: np.ndarray, per_class: int | None, seed: int = 0) -> np.ndarray:
    """Indices of at most `per_class` images of each class (seeded), sorted; all when `per_class` is None."""
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def score_suite(models: Sequence[SuiteModel], paths: Sequence[Path], labels: np.ndarray, shifts: Sequence[Shift],
                ensembles: dict[str, tuple[list[str], list[float]]] | None = None, seed: int = 0,
                batch_size: int = 32, progress: bool = False) -> SuiteResult:
    """Probabilities of every model on the clean images and under every shift.

    `ensembles` maps a name to (member model names, weights): its probabilities are the soft vote of
    those members' (as `flowers.training.ensemble` computes it), at no extra forward pass.
    """
    from flowers.inference.predict import collate

    t0 = time.perf_counter()
    draft = max(m.model.draft_size for m in models)
    transforms = {m.name: m.model.transform() for m in models}
    names = [CLEAN] + [s.label for s in shifts]
    chunks: dict[str, dict[str, list[np.ndarray]]] = {m.name: {n: [] for n in names} for m in models}
    starts = range(0, len(paths), batch_size)
    for start in progress_bar(starts, progress, total=len(starts), desc="shift suite"):
        images = [open_image(p, draft_size=draft) for p in paths[start:start + batch_size]]
        for j, name in enumerate(names):
            shifted = images if name == CLEAN else [
                apply_shift(img, shifts[j - 1], seed=(seed, j, start + i)) for i, img in enumerate(images)]
            for m in models:
                x = collate([transforms[m.name](img) for img in shifted])
                chunks[m.name][name].append(np.asarray(m.model.predict_proba(x), dtype=np.float32))
    probs = {m: {n: np.concatenate(v) for n, v in per.items()} for m, per in chunks.items()}
    from flowers.inference.ensemble_model import soft_vote

    for ens, (members, weights) in (ensembles or {}).items():
        probs[ens] = {n: soft_vote([probs[k][n] for k in members], weights) for n in names}
    return SuiteResult(np.asarray(labels), probs, seconds=time.perf_counter() - t0)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarize(probs: dict[str, np.ndarray], labels: np.ndarray, threshold: float,
              temperature: float = 1.0) -> list[dict[str, Any]]:
    """One row per shift (CLEAN first): top-1, drop from clean, flagged share, selective accuracy; then
    `mean` (over the shifts) and `worst` (the shift with the lowest top-1)."""
    rows = []
    clean_top1 = None
    for name, p in probs.items():
        _, flagged = U.flags(p, threshold, temperature)
        correct = p.argmax(1) == labels
        top1 = float(correct.mean())
        clean_top1 = top1 if clean_top1 is None else clean_top1
        rows.append({"shift": name, "top1": top1, "drop": clean_top1 - top1, "flagged": float(flagged.mean()),
                     "accepted_top1": float(correct[~flagged].mean()) if (~flagged).any() else float("nan"),
                     "n": int(len(labels))})
    shifted = [r for r in rows if r["shift"] != CLEAN]
    if shifted:
        mean = {k: _nanmean([r[k] for r in shifted]) for k in ("top1", "drop", "flagged", "accepted_top1")}
        rows.append({"shift": "mean", **mean, "n": int(len(labels))})
        worst = min(shifted, key=lambda r: r["top1"])
        rows.append({**worst, "shift": f"worst ({worst['shift']})"})
    return rows


def headline(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Flat metrics for tracking: clean, mean and worst top-1, their gaps, mean flagged share, per-shift top-1."""
    by = {r["shift"]: r for r in rows}
    worst = next(r for r in rows if r["shift"].startswith("worst"))
    out = {"shift_clean_top1": by[CLEAN]["top1"], "shift_mean_top1": by["mean"]["top1"],
           "shift_worst_top1": worst["top1"], "shift_mean_drop": by["mean"]["drop"],
           "shift_worst_drop": worst["drop"], "shift_mean_flagged": by["mean"]["flagged"],
           "shift_clean_flagged": by[CLEAN]["flagged"]}
    for r in rows:
        if r["shift"] not in (CLEAN, "mean") and not r["shift"].startswith("worst"):
            out[f"shift_{r['shift'].replace('=', '_')}_top1"] = r["top1"]
    return out


def markdown_table(tables: dict[str, list[dict[str, Any]]]) -> str:
    """Shifts as rows, one top-1 / flagged column pair per model (top-1 in %, flagged in %)."""
    models = list(tables)
    head = "| shift | " + " | ".join(f"{m} top-1 | {m} flagged" for m in models) + " |"
    sep = "|---|" + "---:|---:|" * len(models)
    lines = [head, sep]
    for i, r in enumerate(tables[models[0]]):
        cells = []
        for m in models:
            row = tables[m][i]
            cells += [f"{100 * row['top1']:.1f}", f"{100 * row['flagged']:.1f}"]
        name = r["shift"] if not r["shift"].startswith("worst") else "worst"
        if r["shift"].startswith("worst"):
            cells = []
            for m in models:
                row = tables[m][i]
                cells += [f"{100 * row['top1']:.1f} ({row['shift'][7:-1]})", f"{100 * row['flagged']:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(name: str, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """`shifts_<name>.csv` and `.json` with the rows of one model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"shifts_{name}.csv", out_dir / f"shifts_{name}.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=2))
    return [csv_path, json_path]


def plot_suite(name: str, rows: list[dict[str, Any]], path: Path) -> Path:
    """Top-1 (bars) and flagged share (dots) per shift, clean top-1 as a line, the mean as a dashed one."""
    from flowers.evaluation.metrics import pyplot

    plt = pyplot()
    by = {r["shift"]: r for r in rows}
    shifted = [r for r in rows if r["shift"] not in (CLEAN, "mean") and not r["shift"].startswith("worst")]
    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(shifted) + 2), 4.5))
    x = np.arange(len(shifted))
    ax.bar(x, [100 * r["top1"] for r in shifted], color="#4c72b0", label="top-1")
    ax.plot(x, [100 * r["flagged"] for r in shifted], "o", color="#dd8452", label="flagged")
    ax.axhline(100 * by[CLEAN]["top1"], color="k", lw=1, label=f"clean top-1 {100 * by[CLEAN]['top1']:.1f}")
    ax.axhline(100 * by["mean"]["top1"], color="grey", ls="--", lw=1, label=f"mean top-1 {100 * by['mean']['top1']:.1f}")
    ax.set_xticks(x, [r["shift"] for r in shifted], rotation=45, ha="right")
    ax.set_ylim(0, 115)  # room above 100 for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("% of test images")
    ax.set_title(f"{name}: shift suite ({rows[0]['n']} test images)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
