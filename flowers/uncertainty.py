"""Entropy-based uncertainty: normalized softmax entropy and the flag threshold."""
from __future__ import annotations

import numpy as np


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """Softmax entropy divided by log(K): 0 = one-hot, 1 = uniform. Shape (N, K) → (N,)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    k = p.shape[-1]
    return (-(p * np.log(p)).sum(-1) / np.log(k)).astype(np.float32)
