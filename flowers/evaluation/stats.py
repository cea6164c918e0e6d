"""Paired comparisons of two classifiers on the same test images.

Inputs are boolean correctness vectors, one entry per image, aligned (entry i of `a` and of
`b` is the same image). Only the discordant images (one right, the other wrong) carry
information about the difference; the functions below make that explicit:

- `paired_bootstrap(a, b)`: accuracy(a) - accuracy(b) with a percentile bootstrap interval,
  resampling images (pairs), not the two models independently.
- `mcnemar_exact(a, b)`: the exact (binomial) McNemar test on the discordant counts.
- `accuracy_interval(c)`: one model's accuracy with its bootstrap interval.
- `mean_interval(v)`: the mean of any per-image score (e.g. a gain in {-1, 0, +1} averaged
  over several pairs of models) with its bootstrap interval over images.

Used by the registry gate (`flowers.registry.governance`) and the study report.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb

import numpy as np

DEFAULT_RESAMPLES = 10_000


def _as_bool(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D correctness vector, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name}: a correctness vector holds booleans (or 0/1)")
        arr = arr.astype(bool)
    return arr


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_bool(a, "a"), _as_bool(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired vectors differ in length ({len(a)} vs {len(b)}): not the same images")
    if not len(a):
        raise ValueError("no images to compare")
    return a, b


@dataclass(frozen=True)
class Interval:
    """An estimate with its (lower, upper) interval at `confidence`."""

    estimate: float
    low: float
    high: float
    confidence: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def accuracy_interval(correct, resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                      seed: int = 0) -> Interval:
    """Accuracy of one correctness vector with a percentile bootstrap interval over images."""
    c = _as_bool(correct, "correct")
    if not len(c):
        raise ValueError("no images")
    n, k = len(c), int(c.sum())
    # resampling n images with replacement: the number right is Binomial(n, k/n)
    hits = np.random.default_rng(seed).binomial(n, k / n, size=resamples)
    lo, hi = _percentiles(hits / n, confidence)
    return Interval(k / n, lo, hi, confidence)


def paired_bootstrap(a, b, resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                     seed: int = 0) -> Interval:
    """accuracy(a) - accuracy(b) over the same images, with a paired percentile bootstrap interval.

    Each resample draws n images with replacement and keeps both models' results for each
    image. Per image the difference is +1 (only a right), -1 (only b right) or 0, so a
    resample is fully described by how many +1 and -1 images it drew: a multinomial draw
    with the observed proportions. That gives exactly the image bootstrap's distribution
    at O(resamples) cost instead of O(n x resamples).
    """
    a, b = _pair(a, b)
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    counts = np.random.default_rng(seed).multinomial(n, [only_a / n, only_b / n, (n - only_a - only_b) / n],
                                                     size=resamples)
    diffs = (counts[:, 0] - counts[:, 1]) / n
    lo, hi = _percentiles(diffs, confidence)
    return Interval((only_a - only_b) / n, lo, hi, confidence)


def mean_interval(values, resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Mean of a per-image score with a percentile bootstrap interval over images.

    Same idea as `paired_bootstrap`: a resample is described by how many images of each
    distinct score it drew (a multinomial with the observed proportions), exact for the image
    bootstrap at O(resamples x distinct values).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or not len(v):
        raise ValueError(f"expected a non-empty 1-D vector of per-image scores, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("per-image scores must be finite")
    n = len(v)
    uniq, counts = np.unique(v, return_counts=True)
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=resamples)
    lo, hi = _percentiles(draws @ uniq / n, confidence)
    return Interval(float(v.mean()), lo, hi, confidence)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: `only_a` / `only_b` images right for one model only; two-sided p-value."""

    only_a: int
    only_b: int
    p_value: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (doubled smaller tail, capped at 1)."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    # integer arithmetic: exact for any test-set size (floats underflow past ~1000 flips)
    tail = sum(comb(n, i) for i in range(m + 1))
    return min(1.0, 2 * tail / 2 ** n)


def mcnemar_exact(a, b) -> McNemar:
    """Exact McNemar test of equal accuracy for paired correctness vectors `a`, `b`.

    Under the null each discordant image is equally likely to favour either model, so the
    count favouring `a` is Binomial(discordant, 1/2).
    """
    a, b = _pair(a, b)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return McNemar(only_a, only_b, binomial_two_sided(only_a, only_a + only_b))
