"""Entropy-based uncertainty: normalized entropy, the flag threshold, risk–coverage, AUROC, OOD check.

Every prediction carries its softmax entropy divided by log(K) (0 = certain, 1 = uniform).
A threshold is chosen on the validation set by a policy and stored with the model; at
serving time predictions with entropy above it are flagged `uncertain`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

POLICIES = ("coverage", "accuracy")


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """Softmax entropy divided by log(K): 0 = one-hot, 1 = uniform. Shape (N, K) → (N,)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    k = p.shape[-1]
    return (-(p * np.log(p)).sum(-1) / np.log(k)).astype(np.float32)


SCORES = ("entropy", "msp", "energy")
FLAG_RATE = 0.05  # the share of in-distribution validation images a stored threshold may flag


def temperature_scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax probabilities at temperature T, from probabilities: softmax(log p / T) (log p is the
    logits up to a per-row constant, so this is exact for one network and the usual recipe for a vote)."""
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float32)
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) / temperature
    z -= z.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def fit_temperature(probs: np.ndarray, labels: np.ndarray, grid: np.ndarray | None = None) -> float:
    """The temperature that minimizes validation NLL (a 1-D search over a log grid; no gradients needed)."""
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 121)) if grid is None else grid
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 1.0
    rows = np.arange(len(labels))

    def nll(t: float) -> float:
        return float(-np.log(np.clip(temperature_scale(probs, t)[rows, labels], 1e-12, 1.0)).mean())

    return float(min(grid, key=nll))


def uncertainty_score(probs: np.ndarray, kind: str = "entropy", logits: np.ndarray | None = None) -> np.ndarray:
    """Higher = less sure. `entropy`: normalized entropy; `msp`: 1 - max softmax probability;
    `energy`: -logsumexp(logits) (needs logits: a network's, not a vote's or a probability graph's)."""
    if kind == "entropy":
        return normalized_entropy(probs).astype(np.float64)
    if kind == "msp":
        return 1.0 - np.asarray(probs, dtype=np.float64).max(-1)
    if kind == "energy":
        if logits is None:
            raise ValueError("the energy score needs logits")
        z = np.asarray(logits, dtype=np.float64)
        m = z.max(-1)
        return -(m + np.log(np.exp(z - m[:, None]).sum(-1)))
    raise ValueError(f"uncertainty score must be one of {', '.join(SCORES)}, got {kind!r}")


def threshold_at_flag_rate(scores: np.ndarray, rate: float = FLAG_RATE) -> float:
    """The smallest threshold that flags (score > threshold) at most `rate` of `scores`."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) == 0:
        return float("inf")
    n_keep = int(np.ceil((1.0 - rate) * len(s)))
    return float(s[max(n_keep, 1) - 1])


def flags(probs: np.ndarray, threshold: float, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(normalized entropy, flagged) of probabilities under a model's stored rule: the one place that
    decides `uncertain` (the predictor, Serve, scoring and the shift suite call it)."""
    ent = normalized_entropy(temperature_scale(probs, temperature) if temperature != 1.0 else probs)
    return ent, ent > threshold


def choose_threshold(probs: np.ndarray, labels: np.ndarray, policy: str = "coverage", target: float = 0.9) -> float:
    """Entropy threshold from validation predictions.

    - `coverage`: the largest threshold that keeps (accepts) about `target` of the images.
    - `accuracy`: the largest threshold whose accepted images reach selective accuracy >= `target`
      (if no threshold reaches it, the one with the best selective accuracy).
    Accepted means entropy <= threshold; the rest are flagged uncertain.
    """
    if policy not in POLICIES:
        raise ValueError(f"uncertainty policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"uncertainty target must be in (0, 1], got {target}")
    ent = normalized_entropy(probs).astype(np.float64)
    if len(ent) == 0:
        return 1.0
    order = np.argsort(ent, kind="stable")
    sorted_ent = ent[order]
    if policy == "coverage":
        n_keep = max(1, int(np.ceil(target * len(ent))))
        return float(sorted_ent[n_keep - 1])
    correct = (np.asarray(probs).argmax(1) == np.asarray(labels))[order]
    sel_acc = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    # only thresholds between distinct entropies are realisable; take the last index of each tie run
    last_of_tie = np.r_[sorted_ent[1:] != sorted_ent[:-1], True]
    ok = np.where((sel_acc >= target) & last_of_tie)[0]
    i = ok[-1] if len(ok) else int(np.argmax(np.where(last_of_tie, sel_acc, -1)))
    return float(sorted_ent[i])


def calibrate(val_p: np.ndarray, val_y: np.ndarray, test_p: np.ndarray, test_y: np.ndarray,
              policy: str = "coverage", target: float = 1.0 - FLAG_RATE) -> tuple[float, float, dict[str, float]]:
    """Temperature scaling fitted on validation (kept only when it lowers validation NLL), then the flag
    threshold chosen by `policy`/`target` on the scaled validation probabilities (coverage 0.95: at most
    5 % of validation images flagged). Returns (temperature, threshold, metrics with ECE before/after)."""
    from flowers.evaluation.metrics import expected_calibration_error as ece

    def nll(p: np.ndarray, y: np.ndarray) -> float:
        return float(-np.log(np.clip(p[np.arange(len(y)), np.asarray(y)], 1e-12, 1.0)).mean()) if len(y) else 0.0

    t = fit_temperature(val_p, val_y)
    if not nll(temperature_scale(val_p, t), val_y) < nll(val_p, val_y):
        t = 1.0
    val_t, test_t = temperature_scale(val_p, t), temperature_scale(test_p, t)
    thr = choose_threshold(val_t, val_y, policy, target)
    metrics = {"uncertainty_temperature": t, "uncertainty_threshold": thr,
               "val_ece_before_temperature": ece(val_p, val_y), "val_ece_after_temperature": ece(val_t, val_y),
               "test_ece_before_temperature": ece(test_p, test_y), "test_ece_after_temperature": ece(test_t, test_y),
               "val_flagged_at_threshold": float((normalized_entropy(val_t) > thr).mean())}
    return t, thr, metrics


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and selective risk (error rate of accepted images) as the entropy threshold rises."""
    ent = normalized_entropy(probs)
    order = np.argsort(ent, kind="stable")
    wrong = (np.asarray(probs).argmax(1) != np.asarray(labels))[order]
    n = np.arange(1, len(wrong) + 1)
    return n / len(wrong), np.cumsum(wrong) / n


def aurc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Area under the risk–coverage curve (lower is better)."""
    _, risk = risk_coverage(probs, labels)
    return float(risk.mean()) if len(risk) else float("nan")


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """AUROC of `scores` for separating positives from negatives (Mann–Whitney U, ties count half)."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def entropy_auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """How well entropy ranks misclassified images above correct ones (0.5 = chance)."""
    return auroc(normalized_entropy(probs), np.asarray(probs).argmax(1) != np.asarray(labels))


def selective_summary(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Coverage, selective accuracy and AUROC/AURC at a threshold (flat floats for tracking)."""
    ent = normalized_entropy(probs)
    keep = ent <= threshold
    correct = np.asarray(probs).argmax(1) == np.asarray(labels)
    return {
        "coverage_at_threshold": float(keep.mean()) if len(keep) else float("nan"),
        "selective_acc_at_threshold": float(correct[keep].mean()) if keep.any() else float("nan"),
        "entropy_auroc": entropy_auroc(probs, labels),
        "aurc": aurc(probs, labels),
        "mean_entropy": float(ent.mean()) if len(ent) else float("nan"),
    }


def plot_risk_coverage(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path,
                       threshold_coverage: float | None = None) -> Path:
    """One risk–coverage line per model; a vertical mark at the chosen threshold's coverage."""
    from flowers.evaluation.metrics import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (cov, risk) in curves.items():
        ax.plot(cov, risk, label=name)
    if threshold_coverage is not None:
        ax.axvline(threshold_coverage, color="grey", ls="--", lw=1, label=f"threshold (coverage {threshold_coverage:.2f})")
    ax.set_xlabel("coverage (fraction accepted, lowest entropy first)")
    ax.set_ylabel("selective risk (error rate of accepted)")
    ax.set_title("Risk–coverage")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- out-of-distribution


def ood_images(n: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Non-flower uint8 NCHW batches: uniform noise, smooth noise blobs, stripes, checkerboards."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    low = torch.rand(n, 3, max(2, size // 16), max(2, size // 16), generator=g)
    blobs = (torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
             .clamp(0, 1) * 255).to(torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    textures = []
    for i in range(n):
        period = int(torch.randint(4, max(5, size // 4), (1,), generator=g))
        angle = float(torch.rand(1, generator=g)) * np.pi
        color = torch.randint(0, 256, (3, 1, 1), generator=g).float()
        if i % 2:
            pat = (((xx // period) + (yy // period)) % 2).float()  # checkerboard
        else:
            pat = 0.5 + 0.5 * torch.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)  # stripes
        textures.append((pat[None] * color).to(torch.uint8))
    return {"noise": noise, "blobs": blobs, "textures": torch.stack(textures)}


def ood_report(predict_proba: Callable[[torch.Tensor], np.ndarray], in_dist_probs: np.ndarray,
               image_size: int, n: int = 32, seed: int = 0, threshold: float | None = None) -> dict[str, float]:
    """Entropy on generated non-flower inputs vs in-distribution test images, plus the AUROC
    of entropy for telling them apart and the fraction flagged at `threshold`."""
    in_ent = normalized_entropy(in_dist_probs)
    out: dict[str, float] = {"ood_in_dist_mean_entropy": float(in_ent.mean())}
    all_ood = []
    for kind, batch in ood_images(n, image_size, seed).items():
        ent = normalized_entropy(predict_proba(batch))
        all_ood.append(ent)
        out[f"ood_{kind}_mean_entropy"] = float(ent.mean())
        if threshold is not None:
            out[f"ood_{kind}_flagged"] = float((ent > threshold).mean())
    ood = np.concatenate(all_ood)
    scores = np.concatenate([in_ent, ood])
    out["ood_entropy_auroc"] = auroc(scores, np.r_[np.zeros(len(in_ent), bool), np.ones(len(ood), bool)])
    if threshold is not None:
        out["ood_flagged"] = float((ood > threshold).mean())
        out["in_dist_flagged"] = float((in_ent > threshold).mean())
    return out
