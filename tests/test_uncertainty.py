"""Uncertainty: entropy bounds, threshold policies, risk–coverage, AUROC, OOD inputs."""
from __future__ import annotations

import numpy as np
import pytest

from flowers.inference import uncertainty as U


def test_entropy_bounds_one_hot_and_uniform():
    k = 7
    probs = np.vstack([np.eye(k)[0], np.full(k, 1 / k), np.random.default_rng(0).dirichlet(np.ones(k), 50)])
    h = U.normalized_entropy(probs)
    assert h.shape == (52,)
    assert h[0] == pytest.approx(0.0, abs=1e-6)
    assert h[1] == pytest.approx(1.0, abs=1e-6)
    assert ((h >= 0) & (h <= 1 + 1e-6)).all()


def _val_set():
    rng = np.random.default_rng(1)
    k, n = 5, 200
    labels = rng.integers(0, k, n)
    sharp = rng.random(n) < 0.6  # confident and right, or flat and often wrong
    logits = rng.normal(0, 0.3, (n, k))
    logits[np.arange(n), labels] += np.where(sharp, 6.0, 0.2)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True), labels


def test_threshold_coverage_policy_keeps_target_fraction():
    probs, labels = _val_set()
    for target in (0.5, 0.8, 1.0):
        thr = U.choose_threshold(probs, labels, "coverage", target)
        kept = (U.normalized_entropy(probs) <= thr).mean()
        assert kept == pytest.approx(target, abs=0.01)


def test_threshold_accuracy_policy_reaches_target_and_ranks_errors():
    probs, labels = _val_set()
    thr = U.choose_threshold(probs, labels, "accuracy", 0.95)
    s = U.selective_summary(probs, labels, thr)
    assert s["selective_acc_at_threshold"] >= 0.95
    assert 0.3 < s["coverage_at_threshold"] < 1.0
    assert s["entropy_auroc"] > 0.8  # entropy finds the mistakes
    cov, risk = U.risk_coverage(probs, labels)
    assert cov[-1] == 1.0 and risk[-1] == pytest.approx(1 - (probs.argmax(1) == labels).mean())
    with pytest.raises(ValueError, match="policy"):
        U.choose_threshold(probs, labels, "magic", 0.9)


def test_auroc_known_values():
    assert U.auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1], bool)) == 1.0
    assert U.auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1], bool)) == 0.0
    assert U.auroc(np.ones(4), np.array([0, 1, 0, 1], bool)) == 0.5


def test_ood_report_separates_confident_model_from_noise(tmp_path):
    imgs = U.ood_images(4, 32)
    assert set(imgs) == {"noise", "blobs", "textures"}
    assert all(t.shape == (4, 3, 32, 32) and t.dtype.is_floating_point is False for t in imgs.values())
    in_dist = np.tile(np.eye(5)[0] * 0.96 + 0.01, (10, 1))
    rep = U.ood_report(lambda x: np.full((len(x), 5), 0.2), in_dist, 32, n=4, threshold=0.5)
    assert rep["ood_entropy_auroc"] == 1.0 and rep["ood_flagged"] == 1.0 and rep["in_dist_flagged"] == 0.0
    path = U.plot_risk_coverage({"m": U.risk_coverage(in_dist, np.zeros(10, int))}, tmp_path / "rc.png", 0.9)
    assert path.stat().st_size > 0


def test_temperature_scaling_fits_an_overconfident_model_and_lowers_ece():
    from flowers.evaluation.metrics import expected_calibration_error

    rng = np.random.default_rng(3)
    n, k = 2000, 10
    logits = rng.normal(0, 2, (n, k))
    true_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=row) for row in true_p])  # labels drawn from the true probabilities
    over = U.temperature_scale(true_p, 1 / 3)  # 3x sharper than the truth: overconfident
    assert np.allclose(U.temperature_scale(true_p, 1.0), true_p, atol=1e-6)
    t = U.fit_temperature(over, labels)
    assert 2.4 < t < 3.6
    assert expected_calibration_error(U.temperature_scale(over, t), labels) < 0.5 * expected_calibration_error(over, labels)


def test_scores_and_the_flag_rate_threshold():
    p = np.array([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [1 / 3, 1 / 3, 1 / 3]])
    assert np.allclose(U.uncertainty_score(p, "msp"), [0.1, 0.6, 2 / 3])
    assert np.argsort(U.uncertainty_score(p, "entropy")).tolist() == [0, 1, 2]
    z = np.array([[5.0, 0, 0], [1.0, 0, 0]])
    assert U.uncertainty_score(None, "energy", logits=z)[0] < U.uncertainty_score(None, "energy", logits=z)[1]
    with pytest.raises(ValueError, match="logits"):
        U.uncertainty_score(p, "energy")
    scores = np.arange(100, dtype=float)
    thr = U.threshold_at_flag_rate(scores, 0.05)
    assert (scores > thr).mean() == pytest.approx(0.05)
    ent, flagged = U.flags(p, threshold=0.5)
    assert flagged.tolist() == [False, True, True]
    _, hot = U.flags(p, threshold=0.5, temperature=0.1)  # sharper: the 0.4 row is now sure enough
    assert hot.tolist() == [False, False, True]
