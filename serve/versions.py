"""A model replica's loaded versions: the one that answers, a canary, a shadow, and a target warming up.

The Follower (serve/follower.py) says what a replica should hold; `Versions.apply` loads what is
missing in a worker thread (the event loop keeps answering with what is loaded), passes each new
version a warm-up prediction before it may answer, switches, and drops what is no longer wanted.
A request holds its `Slot` (the predictor itself) for its whole trip through the batcher, so a
dropped version finishes the batches it already has: the old version drains, nothing fails.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowers.inference.predict import Predictor
from flowers.registry.uris import ModelRef

log = logging.getLogger(__name__)

SHADOW_MAX_PENDING = 4  # shadow copies in flight per replica; beyond this a copy is skipped (counted)


@dataclass(frozen=True)
class Slot:
    """One loaded, warmed-up version."""

    ref: ModelRef
    predictor: Predictor

    @property
    def key(self) -> str:
        return self.ref.pinned

    @property
    def version(self) -> str | None:
        return self.ref.version or self.predictor.model.version

    @property
    def name(self) -> str:
        return self.ref.name or self.predictor.model.name


def load_slot(ref: ModelRef, device: str, threshold: float | None) -> Slot:
    """Load `ref` and run one warm-up prediction: a version that cannot predict never answers."""
    p = Predictor.from_ref(ref, device=device, threshold=threshold)
    probs = p.predict_proba(p.model.example_batch(1))  # lazy init off the request path, and a real check
    if not np.all(np.isfinite(probs)) or abs(float(np.sum(probs)) - 1.0) > 1e-3:
        raise ValueError(f"warm-up prediction is not a probability vector (sum {float(np.sum(probs)):.4g})")
    return Slot(ref, p)


class ShadowStats:
    """Per (primary version, shadow version): copies compared, top-1 agreements, |Δp| and each side's time."""

    def __init__(self) -> None:
        self.pairs: dict[str, dict[str, float]] = {}

    def record(self, pair: str, agree: bool, abs_diff: float, primary_ms: float, shadow_ms: float) -> None:
        s = self.pairs.setdefault(pair, {"n": 0, "agree": 0, "abs_diff": 0.0, "primary_ms": 0.0, "shadow_ms": 0.0,
                                         "skipped": 0})
        s["n"] += 1
        s["agree"] += int(agree)
        s["abs_diff"] += abs_diff
        s["primary_ms"] += primary_ms
        s["shadow_ms"] += shadow_ms

    def skip(self, pair: str) -> None:
        self.pairs.setdefault(pair, {"n": 0, "agree": 0, "abs_diff": 0.0, "primary_ms": 0.0, "shadow_ms": 0.0,
                                     "skipped": 0})["skipped"] += 1


class Versions:
    """What one replica holds and answers with."""

    def __init__(self, role: str, first: ModelRef, device: str, threshold: float | None) -> None:
        self.role, self.device, self.threshold = role, device, threshold
        self.serving = load_slot(first, device, threshold)
        self.slots: dict[str, Slot] = {self.serving.key: self.serving}
        self.canary: Slot | None = None
        self.canary_percent = 0.0
        self.dealt = 0  # requests picked since the canary split last changed
        self.shadow: Slot | None = None
        self.failed: dict[str, str] = {}  # pinned → why it could not load or warm up
        self.generation = -1
        self.shadow_stats = ShadowStats()
        self.shadow_pending = 0

    def pick(self) -> tuple[Slot, str | None]:
        """The version that answers this request, and the alias it answers under.

        The canary share is dealt, not drawn: request n goes to the canary when floor(n·P/100) steps up,
        so every window of requests on a replica is within one request of P % (a coin per request
        would miss ±5 points over 400 requests about 3 % of the time at P = 30)."""
        if self.canary is None:
            return self.serving, self.serving.ref.alias
        self.dealt += 1
        p = self.canary_percent / 100.0
        if int(self.dealt * p) > int((self.dealt - 1) * p):
            return self.canary, self.canary.ref.alias
        return self.serving, self.serving.ref.alias

    def set_threshold(self, threshold: float) -> None:
        self.threshold = threshold
        for s in self.slots.values():
            s.predictor.threshold = threshold

    async def apply(self, desired: dict[str, Any]) -> None:
        """Load what the Follower wants and is not here yet (one at a time, off the event loop), then switch."""
        wanted = [desired.get(k) for k in ("serving", "target", "canary", "shadow")]
        for ref in wanted:
            if ref is None or ref.pinned in self.slots or ref.pinned in self.failed:
                continue
            t0 = time.perf_counter()
            try:
                slot = await asyncio.to_thread(load_slot, ref, self.device, self.threshold)
            except Exception as e:  # any load or warm-up failure: this version never answers here
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                self.failed[ref.pinned] = reason
                log.error("%s: %s failed to load/warm up, not rolled out: %s", self.role, ref.label, reason)
                continue
            self.slots[ref.pinned] = slot
            log.info("%s: loaded and warmed up %s in %.1f s", self.role, ref.label, time.perf_counter() - t0)
        serving, target = desired["serving"], desired.get("target")
        if target is not None and target.pinned == self.serving.key:
            # already answering with the target (a restarted Follower starts from the app's first version):
            # do not step back; the Follower commits it on this replica's next report
            serving = target
        if serving.pinned in self.slots and serving.pinned != self.serving.key:
            log.info("%s: now answering with %s (was %s)", self.role, serving.label, self.serving.ref.label)
        if serving.pinned in self.slots:  # the alias it answers under may change without the version changing
            self.serving = _with_ref(self.slots[serving.pinned], serving)
        canary = self._slot(desired.get("canary"))
        percent = float(desired.get("canary_percent") or 0.0) if canary else 0.0
        if (canary and canary.key, percent) != (self.canary and self.canary.key, self.canary_percent):
            self.dealt = 0  # a new split starts its count afresh
        self.canary, self.canary_percent = canary, percent
        self.shadow = self._slot(desired.get("shadow"))
        keep = {self.serving.key} | {r.pinned for r in wanted if r is not None}
        for key in [k for k in self.slots if k not in keep]:  # in-flight requests still hold their Slot
            log.info("%s: dropped %s", self.role, self.slots.pop(key).ref.label)
        self.generation = desired.get("generation", self.generation)

    def _slot(self, ref: ModelRef | None) -> Slot | None:
        return _with_ref(self.slots[ref.pinned], ref) if ref is not None and ref.pinned in self.slots else None

    def report(self) -> tuple[list[str], dict[str, str], str | None, dict[str, Any]]:
        """(loaded pinned URIs, failed ones with why, the version answering, shadow counters) for the Follower."""
        return list(self.slots), dict(self.failed), self.serving.version, \
            {k: dict(v) for k, v in self.shadow_stats.pairs.items()}


def _with_ref(slot: Slot, ref: ModelRef) -> Slot:
    return slot if slot.ref == ref else Slot(ref, slot.predictor)


def compare(primary: np.ndarray, shadow: np.ndarray) -> tuple[bool, float]:
    """Top-1 agreement and the mean absolute probability difference over the classes."""
    if primary.shape != shadow.shape:
        return False, float("nan")
    return int(np.argmax(primary)) == int(np.argmax(shadow)), float(np.mean(np.abs(primary - shadow)))
