"""Paired statistics for two classifiers on the same images: exact McNemar, paired bootstrap, accuracy interval."""
from __future__ import annotations

import math

import numpy as np
import pytest

from flowers.evaluation import stats

# 10 images: both right on 4, only a on 4, only b on 1, both wrong on 1
A = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], bool)
B = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0], bool)


def test_mcnemar_matches_a_hand_computation():
    m = stats.mcnemar_exact(A, B)
    assert (m.only_a, m.only_b) == (4, 1)
    # P(X <= 1 | X ~ Bin(5, 1/2)) = (1 + 5) / 32, doubled
    assert m.p_value == pytest.approx(2 * 6 / 32)
    assert stats.mcnemar_exact(B, A).p_value == m.p_value  # symmetric
    assert stats.mcnemar_exact(A, A).p_value == 1.0  # no discordant image: no evidence
    assert stats.binomial_two_sided(0, 8) == pytest.approx(2 / 256)
    assert stats.binomial_two_sided(5, 10) == 1.0  # capped


def test_mcnemar_exact_for_large_test_sets():
    """Integer arithmetic stays exact where floats underflow (thousands of discordant images)."""
    from scipy import stats as scipy_stats
    for k, n in ((1400, 3000), (10, 5000), (2500, 5000)):
        assert stats.binomial_two_sided(k, n) == pytest.approx(scipy_stats.binomtest(k, n, 0.5).pvalue, rel=1e-9)


def test_paired_bootstrap_estimate_interval_and_determinism():
    d = stats.paired_bootstrap(A, B, resamples=20_000, seed=1)
    assert d.estimate == pytest.approx((4 - 1) / 10)
    assert d.low <= d.estimate <= d.high and d.confidence == 0.95
    assert stats.paired_bootstrap(A, B, resamples=20_000, seed=1) == d  # seeded: reproducible
    same = stats.paired_bootstrap(A, A)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_equals_the_image_bootstrap():
    """The multinomial shortcut has the image bootstrap's distribution: compare with the slow way."""
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.8
    b = np.where(rng.random(400) < 0.85, a, ~a)  # 15% discordant
    fast = stats.paired_bootstrap(a, b, resamples=20_000, seed=2)
    idx = rng.integers(0, len(a), size=(20_000, len(a)))
    slow = np.percentile(a[idx].mean(1) - b[idx].mean(1), [2.5, 97.5])
    assert fast.low == pytest.approx(slow[0], abs=0.006) and fast.high == pytest.approx(slow[1], abs=0.006)
    # and with the normal approximation of the paired difference
    d = (a.astype(float) - b.astype(float))
    half = 1.96 * d.std() / math.sqrt(len(d))
    assert fast.low == pytest.approx(d.mean() - half, abs=0.01)


def test_accuracy_interval():
    c = np.r_[np.ones(80, bool), np.zeros(20, bool)]
    ci = stats.accuracy_interval(c, resamples=20_000)
    assert ci.estimate == 0.8
    se = math.sqrt(0.8 * 0.2 / 100)
    assert ci.low == pytest.approx(0.8 - 1.96 * se, abs=0.015) and ci.high == pytest.approx(0.8 + 1.96 * se, abs=0.015)
    assert stats.accuracy_interval(np.ones(5, bool)).low == 1.0


@pytest.mark.parametrize("a, b, msg", [([1, 0], [1], "differ in length"), ([], [], "no images"),
                                       ([1, 2], [1, 0], "booleans"), ([[1]], [[1]], "1-D")])
def test_bad_input_is_refused(a, b, msg):
    with pytest.raises(ValueError, match=msg):
        stats.paired_bootstrap(a, b)


def test_mean_interval_of_per_image_scores():
    # constant scores: no spread
    c = stats.mean_interval(np.full(50, 0.5))
    assert (c.estimate, c.low, c.high) == (0.5, 0.5, 0.5)
    # 0/1 scores: the same distribution as the accuracy interval (bootstrap noise apart)
    right = np.r_[np.ones(700, bool), np.zeros(300, bool)]
    m, a = stats.mean_interval(right.astype(float)), stats.accuracy_interval(right)
    assert m.estimate == a.estimate == 0.7
    assert m.low == pytest.approx(a.low, abs=0.006) and m.high == pytest.approx(a.high, abs=0.006)
    # gains in {-1, 0, 1} averaged over two pairs: half-integers too; the interval has the normal width
    g = np.r_[np.full(100, 1.0), np.full(60, 0.5), np.full(40, -0.5), np.zeros(800)]
    ci = stats.mean_interval(g)
    se = g.std() / np.sqrt(len(g))
    assert ci.estimate == pytest.approx(g.mean())
    assert ci.low == pytest.approx(g.mean() - 1.96 * se, abs=0.004) and ci.high == pytest.approx(g.mean() + 1.96 * se, abs=0.004)
    with pytest.raises(ValueError):
        stats.mean_interval([])
    with pytest.raises(ValueError):
        stats.mean_interval([0.0, float("nan")])
