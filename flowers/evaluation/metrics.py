"""Metrics and plots: top-1/5, per-class accuracy, confusion matrix, NLL, ECE, curves."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    topk = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return float((topk == labels[:, None]).any(1).mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    support = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def compute_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1, top-5, NLL and ECE of softmax probabilities against integer labels."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return {"top1": float("nan"), "top5": float("nan"), "nll": float("nan"), "ece": float("nan"), "n": 0}
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return {
        "top1": float((probs.argmax(1) == labels).mean()),
        "top5": topk_accuracy(probs, labels, 5),
        "nll": float(-np.log(p_true).mean()),
        "ece": expected_calibration_error(probs, labels),
        "n": int(len(labels)),
    }


def most_confused(cm: np.ndarray, class_names: Sequence[str], k: int = 10) -> list[dict[str, Any]]:
    """The k largest off-diagonal cells, by name."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None)[:k]
    out = []
    for f in flat:
        t, p = np.unravel_index(f, off.shape)
        if off[t, p] == 0:
            break
        out.append({"true": class_names[t], "predicted": class_names[p], "count": int(off[t, p]),
                    "true_label": int(t), "predicted_label": int(p)})
    return out


# ----------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: workers and CI have no display
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: Path, title: str = "Confusion matrix") -> Path:
    """Row-normalized heatmap; labels shown when there are few classes."""
    plt = pyplot()
    n = len(class_names)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = min(24, max(6, n * 0.18))
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Loss and accuracy per epoch, train vs val."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ep = [h["epoch"] for h in history]
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val")
    a.set_title("loss")
    b.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    b.plot(ep, [h["val_acc"] for h in history], "o-", label="val")
    b.set_title("accuracy")
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- artifacts


def write_eval_artifacts(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], out_dir: Path,
                         prefix: str = "test") -> tuple[dict[str, Any], dict[str, Path]]:
    """Metrics plus confusion CSV/PNG, per-class CSV, most-confused pairs and raw predictions."""
    out_dir = Path(out_dir)
    k = len(class_names)
    preds = probs.argmax(1)
    metrics: dict[str, Any] = compute_metrics(probs, labels)
    cm = confusion_matrix(labels, preds, k)
    acc = per_class_accuracy(cm)
    files = {
        "confusion_csv": out_dir / f"{prefix}_confusion.csv",
        "confusion_png": out_dir / f"{prefix}_confusion.png",
        "per_class_csv": out_dir / f"{prefix}_per_class.csv",
        "confused_json": out_dir / f"{prefix}_most_confused.json",
        "predictions": out_dir / f"{prefix}_predictions.npz",
    }
    with open(files["confusion_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true\\pred", *class_names])
        for name, row in zip(class_names, cm):
            w.writerow([name, *row.tolist()])
    with open(files["per_class_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "name", "support", "correct", "accuracy"])
        for i, name in enumerate(class_names):
            w.writerow([i, name, int(cm[i].sum()), int(cm[i, i]), "" if np.isnan(acc[i]) else f"{acc[i]:.4f}"])
    confused = most_confused(cm, class_names)
    files["confused_json"].write_text(json.dumps(confused, indent=2))
    np.savez_compressed(files["predictions"], probs=probs.astype(np.float32), labels=labels)
    plot_confusion(cm, class_names, files["confusion_png"], f"{prefix} confusion (top-1 {metrics['top1']:.3f})")
    metrics["mean_per_class_acc"] = float(np.nanmean(acc))
    metrics["per_class_acc"] = acc.tolist()
    metrics["most_confused"] = confused
    return metrics, files
