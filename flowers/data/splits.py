"""Train/val/test splits: the official VGG one, or a seeded stratified random one."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .decode import DataError

log = logging.getLogger(__name__)

SPLIT_KINDS = ("official", "random")
PARTS = ("train", "val", "test")


def _apportion(counts: np.ndarray, frac: float) -> np.ndarray:
    """Per-class sizes for one part: at least 1 per class, summing to round(total * frac).

    Largest-remainder apportionment: plain per-class rounding drifts from the global target
    (on Flowers-102 round() gives 818 instead of 819), which would make the split sizes depend on
    the rounding rule rather than on the fractions asked for.
    """
    quota = counts * frac
    base = np.maximum(1, np.floor(quota)).astype(np.int64)
    target = max(int(np.floor(counts.sum() * frac + 0.5)), len(counts))  # every class needs one
    short = target - int(base.sum())
    rem = quota - np.floor(quota)
    # stable sort on -remainder: ties go to the lower class index, so the result is deterministic
    order = np.argsort(-rem, kind="stable")
    if short > 0:
        eligible = order[base[order] == np.floor(quota[order])]  # classes not already bumped to 1
        base[eligible[:short]] += 1
    elif short < 0:
        eligible = order[::-1][base[order[::-1]] > 1]  # take back from the smallest remainders
        base[eligible[:-short]] -= 1
    return base


def make_split(
    labels: np.ndarray,
    kind: str,
    seed: int = 0,
    setid: Mapping[str, np.ndarray] | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> dict[str, np.ndarray]:
    """Split image indices into 'train'/'val'/'test' (sorted int64 arrays).

    ``official`` returns ``setid``; ``random`` is stratified and seeded: each class is shuffled
    with one ``np.random.default_rng(seed)`` and cut so every class appears in every part.
    On Flowers-102 with the default fractions this gives 6551/819/819.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if kind == "official":
        if setid is None:
            raise ValueError("split kind 'official' needs the dataset's setid (load_vgg(...).setid)")
        return {p: np.sort(np.asarray(setid[p], dtype=np.int64)) for p in PARTS}
    if kind != "random":
        raise ValueError(f"unknown split kind {kind!r}; allowed: {', '.join(SPLIT_KINDS)}")
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers (train, val, test) summing to 1, got {fractions}")

    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    counts = np.array([len(m) for m in members])
    if counts.min() < 3:
        c = classes[int(np.argmin(counts))]
        raise ValueError(f"class {c} has {counts.min()} image(s); a stratified split needs at least 3 per class")
    n_val = _apportion(counts, fractions[1])
    n_test = _apportion(counts, fractions[2])
    # a class so small that val+test eat it: give its train image back from the larger part
    for i in np.flatnonzero(counts - n_val - n_test < 1):
        while counts[i] - n_val[i] - n_test[i] < 1:
            if n_val[i] >= n_test[i]:
                n_val[i] -= 1
            else:
                n_test[i] -= 1

    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {p: [] for p in PARTS}
    for idx, v, t in zip(members, n_val, n_test):
        perm = rng.permutation(idx)
        out["val"].append(perm[:v])
        out["test"].append(perm[v : v + t])
        out["train"].append(perm[v + t :])
    return {p: np.sort(np.concatenate(out[p])).astype(np.int64) for p in PARTS}


def save_split(split: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write ``{part: [indices]}`` as JSON, atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: [int(i) for i in v] for k, v in split.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_split(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a split written by :func:`save_split`; DataError naming the file if malformed."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"split file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read split file {path}: {e}") from e
    if not isinstance(raw, dict) or not all(
        isinstance(v, list) and all(isinstance(i, int) and i >= 0 for i in v) for v in raw.values()
    ):
        raise DataError(f"{path} must hold {{part: [non-negative indices]}}; it was not written by save_split")
    return {str(k): np.asarray(v, dtype=np.int64) for k, v in raw.items()}


def subset_classes(
    labels: np.ndarray, split: Mapping[str, np.ndarray], classes: int | None
) -> tuple[dict[str, np.ndarray], int]:
    """Keep only images of the first ``classes`` labels (0..classes-1) in every part.

    For quick real-data runs. Labels need no remapping because the kept classes are already
    0..classes-1. Returns ``(split, num_classes)``; ``classes=None`` keeps everything.
    """
    labels = np.asarray(labels, dtype=np.int64)
    total = int(labels.max()) + 1
    if classes is None or classes >= total:
        return {k: np.asarray(v, dtype=np.int64) for k, v in split.items()}, total
    if classes < 2:
        raise ValueError(f"classes must be at least 2 (or None for all {total}), got {classes}")
    out = {k: np.asarray(v, dtype=np.int64)[labels[np.asarray(v, dtype=np.int64)] < classes] for k, v in split.items()}
    return out, classes
