"""Out-of-distribution check on real non-flower photos: AUROC per uncertainty score, share flagged.

For each model: its probabilities (and, for torch networks, logits) on the in-distribution
validation images and on a folder of non-flower photographs (`flowers.evaluation.ood_sources`
builds one from a Debian package). Scores: normalized entropy, 1 - max softmax probability and
the energy -logsumexp(logits) (an ensemble's energy is its members' mean; a model that outputs
probabilities only, such as the exported INT8 student, has none). For each score: the AUROC of
telling photos from validation images, the threshold that flags at most 5 % of the validation
images, and the share of photos flagged at it; also what the model's *stored* rule flags.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from flowers import config as C
from flowers.inference import uncertainty as U
from flowers.data import DataError, list_images
from flowers.data.folder import LabeledImages

log = logging.getLogger(__name__)


def ood_paths(folder: str | Path, minimum: int = 1) -> list[Path]:
    """The photos of an OOD folder; DataError (one line, exit 2) when missing, empty or unreadable."""
    folder = Path(folder).expanduser()
    paths = list_images([folder])  # DataError for a missing folder
    if len(paths) < minimum:
        raise DataError(f"OOD folder {folder} holds {len(paths)} images, need at least {minimum}; build it with "
                        "`python -m flowers.evaluation.ood_sources --out DIR`")
    return paths


@dataclass
class Outputs:
    """A model's probabilities (and logits when it has them) on one set of images."""

    probs: np.ndarray
    logits: np.ndarray | None = None


def run_model(model: Any, paths: Sequence[Path], batch_size: int = 32) -> Outputs:
    """`model` (a LoadedModel) over images in its own eval preprocessing; logits when it is one torch network."""
    from flowers.inference.predict import predict_dataset

    ds = LabeledImages(list(paths), None, model.transform(), model.draft_size)
    module = model.module if model.meta.get("kind") == "checkpoint" else None
    if module is None:
        probs, _ = predict_dataset(model.predict_proba, ds, batch_size=batch_size)
        return Outputs(probs)
    chunks: list[np.ndarray] = []

    def logits_then_probs(x: torch.Tensor) -> np.ndarray:
        z = module(x.contiguous(memory_format=torch.channels_last)).float()
        chunks.append(z.numpy())
        return torch.softmax(z, 1).numpy()  # what predict_proba computes for this kind, from the same pass

    probs, _ = predict_dataset(logits_then_probs, ds, batch_size=batch_size)
    return Outputs(probs, np.concatenate(chunks))


def score_table(in_dist: Outputs, ood: Outputs, threshold: float, temperature: float = 1.0,
                rate: float = U.FLAG_RATE) -> dict[str, float]:
    """Per score: AUROC (OOD positive), the threshold flagging <= `rate` of in-distribution images and the
    OOD share flagged at it; then the stored rule's flagged shares (`stored_*`)."""
    out: dict[str, float] = {}
    labels = np.r_[np.zeros(len(in_dist.probs), bool), np.ones(len(ood.probs), bool)]
    for kind in U.SCORES:
        if kind == "energy" and (in_dist.logits is None or ood.logits is None):
            continue
        s_in = U.uncertainty_score(in_dist.probs, kind, in_dist.logits)
        s_ood = U.uncertainty_score(ood.probs, kind, ood.logits)
        thr = U.threshold_at_flag_rate(s_in, rate)
        out[f"{kind}_auroc"] = U.auroc(np.r_[s_in, s_ood], labels)
        out[f"{kind}_in_flagged"] = float((s_in > thr).mean())
        out[f"{kind}_ood_flagged"] = float((s_ood > thr).mean())
    _, f_in = U.flags(in_dist.probs, threshold, temperature)
    _, f_ood = U.flags(ood.probs, threshold, temperature)
    out.update({"stored_threshold": threshold, "stored_temperature": temperature,
                "stored_in_flagged": float(f_in.mean()), "stored_ood_flagged": float(f_ood.mean())})
    return out


def mean_outputs(parts: Sequence[Outputs], weights: Sequence[float]) -> Outputs:
    """A soft vote's outputs: weighted mean probabilities, and for the energy score the members' mean
    energy (carried as one logit per row whose logsumexp is that energy)."""
    from flowers.inference.ensemble_model import soft_vote

    probs = soft_vote([p.probs for p in parts], list(weights))
    if any(p.logits is None for p in parts):
        return Outputs(probs)
    # mean member energy, expressed as logits whose logsumexp equals it (so uncertainty_score works unchanged)
    energies = np.mean([U.uncertainty_score(p.probs, "energy", p.logits) for p in parts], axis=0)
    logits = np.full_like(probs, -np.inf)
    logits[:, 0] = -energies
    return Outputs(probs, logits)


@dataclass
class OodReport:
    """Per model: the score table; the photos' count and the files written."""

    tables: dict[str, dict[str, float]] = field(default_factory=dict)
    photos: int = 0
    files: list[Path] = field(default_factory=list)
    markdown: str = ""


def markdown(tables: dict[str, dict[str, float]], photos: int, val: int) -> str:
    """Models as rows: AUROC per score, flagged photos at <= 5 % validation flagged, the stored rule."""
    lines = [f"{photos} non-flower photos vs {val} validation images; 'flagged' at the threshold that flags "
             f"<= {100 * U.FLAG_RATE:.0f} % of the validation images", "",
             "| model | AUROC entropy | AUROC max-softmax | AUROC energy | flagged (entropy) | flagged (max-softmax) "
             "| flagged (energy) | stored threshold | stored rule: photos flagged | stored rule: val flagged |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def pct(t: dict, k: str) -> str:
        return f"{100 * t[k]:.1f}" if k in t else "n/a"

    for name, t in tables.items():
        au = [f"{t[k + '_auroc']:.3f}" if k + "_auroc" in t else "n/a" for k in U.SCORES]
        fl = [pct(t, k + "_ood_flagged") for k in U.SCORES]
        lines.append(f"| {name} | " + " | ".join(au + fl) + f" | {t['stored_threshold']:.3f}"
                     + (f" (T={t['stored_temperature']:.2f})" if t["stored_temperature"] != 1.0 else "")
                     + f" | {pct(t, 'stored_ood_flagged')} | {pct(t, 'stored_in_flagged')} |")
    return "\n".join(lines)


def run_ood(uris: dict[str, str], data_cfg: C.DataConfig, ood_dir: str | Path, out_dir: Path,
            batch_size: int = 32) -> OodReport:
    """The OOD table for every model of `uris` (ensembles with their members)."""
    from flowers.data.bundle import build_data
    from flowers.evaluation.robustness import suite_models

    photos = ood_paths(ood_dir)
    report = OodReport(photos=len(photos))
    data = None
    for name, uri in uris.items():
        models, ensembles, rules = suite_models(name, uri)
        data = data or build_data(data_cfg, models[0].model.preprocessing, seed=data_cfg.seed)
        val_paths = data.val.paths
        outs = {m.name: (run_model(m.model, val_paths, batch_size), run_model(m.model, photos, batch_size))
                for m in models}
        for ens, (members, weights) in ensembles.items():
            outs[ens] = (mean_outputs([outs[k][0] for k in members], weights),
                         mean_outputs([outs[k][1] for k in members], weights))
        for key, (val_out, ood_out) in outs.items():
            report.tables[key] = score_table(val_out, ood_out, *rules[key])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.markdown = markdown(report.tables, len(photos), len(data.val) if data else 0)
    (out_dir / "ood.md").write_text(report.markdown + "\n")
    (out_dir / "ood.json").write_text(json.dumps(report.tables, indent=2))
    report.files = [out_dir / "ood.md", out_dir / "ood.json"]
    return report
