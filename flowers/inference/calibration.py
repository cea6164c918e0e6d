"""Batching chosen per machine: time a loaded model at a few batch sizes, keep batching only where it pays.

Whether one forward pass over n images beats n passes over one depends on the CPU, the
runtime's kernels and the threads the process has: the same ensemble served 1.01x faster with
batching on a 2-core Xeon with AMX (its batched pass cost more per image than batch 1) and 1.66x
faster on an AMD EPYC with AVX-512 VNNI. So a replica measures instead of trusting a fixed config:
`calibrate_batching` runs `predict_proba` on `example_batch(n)` for n = 1, 2, 4, 8, 16 (up to
`max_batch`), a few times each within a small time budget, and picks the batch size with the best
throughput only if it beats batch 1 by `margin` (10 %); otherwise batching is off (max_batch_size 1).

Threads. The figures hold for the threads the measuring process has, so a Serve replica calls it
after loading its model, in the replica itself: Ray sets OMP_NUM_THREADS from the replica's
num_cpus, `flowers.runtime.configure_torch_threads` gives torch that many and ONNX Runtime sessions
take it as their intra-op threads (`onnx_models.onnx_session`). Calibrating in another process,
or with other threads, measures another machine.

Noise. Other processes (a neighbour replica calibrating at the same time, other jobs on a shared
machine) slow passes at random and the machine's speed drifts. So each size is timed between two
batch-1 passes, in rounds (1, 2, 1, 4, 1, 8, 1, 16, 1), as many as the budget allows, and its gain
is the median over rounds of batch 1's time per image (the passes beside it) over its own; and
its fastest pass is compared with batch 1's fastest (other processes only ever add time).
Batching is turned on only where both show the margin, over at least `MIN_PAIRS` rounds (a slow
model needs a longer budget for that: the ensemble's replicas get one). A size is a candidate
only if it and every smaller size are no slower per image than batch 1 (within `NOISE`) by either
figure: batches smaller than the cap form too, and none of them may be slower than batching off.

Wait. While a pass runs, requests gather for the next one; how long a replica may wait for more
is derived from batch 1's latency: at most `wait_fraction` of it, and never more than one image
saves by riding in a batch (batch 1's per-image cost times 1 - 1/gain), so waiting costs
less than batching gains. Batching off waits 0.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch

from flowers.inference.loaded import LoadedModel
from flowers.inference.onnx_models import cpu_flags, describe_cpu
from flowers.runtime import cpu_share

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16  # the cap Serve's deployments and serve/config.yaml use
DEFAULT_BUDGET_S = 3.0  # wall-clock time a replica start may spend calibrating
DEFAULT_MARGIN = 0.10  # batching must beat batch 1's throughput by this much to be turned on
DEFAULT_WAIT_FRACTION = 0.5  # at most this fraction of batch 1's latency spent waiting for company
DEFAULT_REPS = 15  # passes per size at most: 1 warm-up + 14 paired rounds; the budget usually ends it first
NOISE = 0.05  # a size this much slower per image than batch 1 still counts as "not slower"
MIN_PAIRS = 2  # rounds beside batch 1 a size needs before it may turn batching on


class CalibrationError(RuntimeError):
    """Calibration could not measure enough to decide (no time budget, the model failed)."""


@dataclass(frozen=True)
class BatchTiming:
    """One batch size: its fastest pass (ms), per image, images per second; the median pass; passes;
    the median of its paired gains over batch 1 (`measure_sizes`) and how many pairs."""

    size: int
    ms_per_batch: float
    ms_per_image: float
    images_per_s: float
    ms_median: float
    reps: int
    gain: float = 1.0
    pairs: int = 0


@dataclass(frozen=True)
class BatchingChoice:
    """What a replica batches with, and why. `max_batch_size` 1 means batching off.

    `source` is "calibrated" (measured here) or "config" (the config's values: calibration off,
    failed or out of time; `reason` says which). `speedup` is the chosen size's paired gain over
    batch 1 (`measure_sizes`; 1.0 when off or not measured).
    """

    max_batch_size: int
    batch_wait_timeout_s: float
    speedup: float
    reason: str
    source: str = "calibrated"
    table: tuple[BatchTiming, ...] = ()
    skipped: tuple[int, ...] = ()  # sizes the budget left unmeasured
    cpu: str = ""
    cpu_flags: tuple[str, ...] = ()
    threads: int = 0  # this process's CPU share: ONNX Runtime intra-op threads (sessions made here)
    torch_threads: int = 0
    budget_s: float = 0.0
    elapsed_s: float = 0.0
    cap: int = 0  # the max_batch it was calibrated under
    margin: float = DEFAULT_MARGIN
    wait_fraction: float = DEFAULT_WAIT_FRACTION
    min_pairs: int = MIN_PAIRS

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    def capped(self, max_batch: int) -> "BatchingChoice | None":
        """The choice under a new cap without measuring again: chosen again from the table's sizes
        up to `max_batch` when that is below the cap it was calibrated under; itself when the cap
        is the same; None when the new cap is higher (sizes above the old cap were never measured)."""
        if self.source != "calibrated" or max_batch > self.cap:
            return None
        if max_batch == self.cap:
            return self
        table = tuple(t for t in self.table if t.size <= max_batch)
        size, wait, speedup, reason = choose(table, self.margin, self.wait_fraction, self.min_pairs)
        return replace(self, max_batch_size=size, batch_wait_timeout_s=wait, speedup=speedup, table=table,
                       skipped=tuple(n for n in self.skipped if n <= max_batch), cap=max_batch,
                       reason=f"{reason} (cap lowered to {max_batch}, not measured again)")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (GET /v1/models): every field, the table as a list of rows."""
        d = asdict(self)
        d["table"] = [asdict(t) for t in self.table]
        d["skipped"] = list(self.skipped)
        d["cpu_flags"] = list(self.cpu_flags)
        return d

    def log_line(self) -> str:
        """One line for the replica's log: the choice, the reason, the per-image costs, the CPU."""
        head = (f"batching {'on, max ' + str(self.max_batch_size) if self.batching else 'off'} "
                f"(wait {self.batch_wait_timeout_s * 1e3:.1f} ms, {self.source}): {self.reason}")
        if not self.table:
            return head
        costs = ", ".join(f"{t.size}: {t.ms_per_image:.2f}" + (f" ({t.gain:.2f}x)" if t.size > 1 else "")
                          for t in self.table)
        return (f"{head}; ms/image (paired gain) by batch size {{{costs}}}; {self.threads} thread(s); {self.cpu}; "
                f"{self.elapsed_s:.2f} s")


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to `max_batch`, and `max_batch` itself when it is not a power of two."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [1]
    while sizes[-1] * 2 <= max_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


@dataclass
class Samples:
    """Raw timings: seconds per pass by size, and paired gains (batch 1's time per image, from the
    batch-1 passes just before and after, over this size's time per image) by size."""

    passes: dict[int, list[float]]
    gains: dict[int, list[float]]
    skipped: list[int]


def measure_sizes(model: LoadedModel, sizes: list[int], budget_s: float, reps: int = DEFAULT_REPS,
                  clock: Callable[[], float] = time.perf_counter, reserve_rounds: int = MIN_PAIRS) -> Samples:
    """Time `model.predict_proba` at each size, within `budget_s` (up to one pass's misestimate).

    First one pass per size, ascending, while the next size's pass and `reserve_rounds` rounds
    over the sizes so far (estimated from the last size's per-image cost) fit in the budget; that
    first pass at a new shape also warms it up (allocations, oneDNN kernels). Then up to `reps` - 1 rounds of 1, 2, 1, 4, 1, 8, ..., 1: each
    size between two batch-1 passes, so its gain over batch 1 compares passes a moment apart and
    a machine whose speed drifts (other jobs, a neighbour replica) moves both alike. A step runs
    only if it fits in what is left of the budget: a cheap model gets many rounds, a slow one
    few. Raises CalibrationError when batch 1 cannot be measured.
    """
    deadline = clock() + budget_s
    passes: dict[int, list[float]] = {}
    gains: dict[int, list[float]] = {}
    inputs: dict[int, Any] = {}

    def timed(n: int) -> float:
        t0 = clock()
        model.predict_proba(inputs[n])
        passes[n].append(clock() - t0)
        return passes[n][-1]

    per_image = 0.0
    for n in sizes:
        # images in this size's first pass and in `reserve_rounds` rounds of 1, 2, 1, ..., n, 1 after it
        images = n + reserve_rounds * (sum(m for m in passes if m > 1) + n + len(passes) + 1)
        if passes and clock() + images * per_image > deadline:
            break
        inputs[n], passes[n] = model.example_batch(n), []
        per_image = timed(n) / n
    if 1 not in passes:
        raise CalibrationError("batch 1 was not measured")
    larger = [n for n in passes if n > 1]
    for _ in range(reps - 1):
        if not larger or clock() + min(passes[1]) > deadline:
            break
        before = timed(1)
        for n in larger:
            if clock() + min(passes[n]) + min(passes[1]) > deadline:
                return Samples(passes, gains, [n for n in sizes if n not in passes])
            t = timed(n)
            after = timed(1)
            gains.setdefault(n, []).append((before + after) / 2 * n / t if t > 0 else float("inf"))
            before = after
    return Samples(passes, gains, [n for n in sizes if n not in passes])


def timing_table(samples: Samples) -> tuple[BatchTiming, ...]:
    """Per size: the fastest pass as ms per pass, ms per image and images per second, the median
    pass, the passes, and the median paired gain over batch 1 (0 when no pair was measured).
    Fastest, not median: other processes only ever add time to a pass."""
    rows = []
    for n in sorted(samples.passes):
        ts = samples.passes[n]
        s = min(ts)
        pairs = samples.gains.get(n, [])
        gain = 1.0 if n == 1 else (round(statistics.median(pairs), 4) if pairs else 0.0)
        rows.append(BatchTiming(n, round(s * 1e3, 4), round(s * 1e3 / n, 4), round(n / s, 2) if s > 0 else float("inf"),
                                round(statistics.median(ts) * 1e3, 4), len(ts), gain, len(pairs)))
    return tuple(rows)


def _gain(t: BatchTiming, base: BatchTiming) -> float:
    """Throughput of `t` over batch 1's by fastest passes."""
    return t.images_per_s / base.images_per_s


def _slower(t: BatchTiming, base: BatchTiming) -> bool:
    """Slower per image than batch 1 (beyond `NOISE`) by fastest passes or by paired gain."""
    return _gain(t, base) < 1 - NOISE or (t.pairs > 0 and t.gain < 1 - NOISE)


def _why_off(table: tuple[BatchTiming, ...], candidates: list[BatchTiming], margin: float, min_pairs: int) -> str:
    base = table[0]
    if not candidates:
        t = table[1]
        return (f"batch {t.size} is slower per image than batch 1 (paired gain {t.gain:.2f}x over {t.pairs} pairs; "
                f"fastest passes {t.ms_per_image:.2f} vs {base.ms_per_image:.2f} ms per image)")
    if not any(t.pairs for t in candidates):
        return "no size was measured beside batch 1 within the budget (one pass each): not enough to turn batching on"
    top = max((t for t in candidates if t.pairs), key=lambda t: t.gain)
    if top.pairs < min_pairs and min(top.gain, _gain(top, base)) >= 1 + margin:
        return (f"batch {top.size} beats batch 1 by {top.gain:.2f}x (paired) but over {top.pairs} pair(s), "
                f"{min_pairs} needed: a longer calibration budget measures more")
    return (f"best batch {top.size} beats batch 1 by {top.gain:.2f}x (paired, {top.pairs} pairs) and "
            f"{_gain(top, base):.2f}x (fastest passes), under the {1 + margin:.2f}x needed")


def choose(table: tuple[BatchTiming, ...], margin: float = DEFAULT_MARGIN, wait_fraction: float = DEFAULT_WAIT_FRACTION,
           min_pairs: int = MIN_PAIRS) -> tuple[int, float, float, str]:
    """(max_batch_size, batch_wait_timeout_s, speedup, reason) from a timing table (batch 1 first).

    On: the size with the best paired gain among those that beat batch 1 by `margin` both by
    paired gain and by fastest passes (two estimators agreeing: a lucky pass alone does not turn
    batching on), over at least `min_pairs` rounds, with no smaller size slower per image than
    batch 1. Ties go to the smaller size.
    `speedup` is the chosen size's paired gain."""
    base = table[0]
    if base.size != 1:
        raise ValueError("the timing table must start at batch 1")
    if len(table) == 1:
        return 1, 0.0, 1.0, "only batch 1 was measured"
    # every size up to a candidate must be at least as fast per image as batch 1: smaller batches form too
    candidates = []
    for t in table[1:]:
        if _slower(t, base):
            break
        candidates.append(t)
    barrier = table[len(candidates) + 1].size if len(candidates) + 1 < len(table) else None
    paying = [t for t in candidates if t.pairs >= max(1, min_pairs) and min(t.gain, _gain(t, base)) >= 1 + margin]
    if not paying:
        return 1, 0.0, 1.0, f"off: {_why_off(table, candidates, margin, min_pairs)}"
    best = max(paying, key=lambda t: t.gain)
    saved_s = base.ms_per_image * (1 - 1 / best.gain) / 1e3  # what one image saves by riding in the batch
    wait = round(max(0.0, min(wait_fraction * base.ms_per_batch / 1e3, saved_s)), 5)
    why = (f"on: batch {best.size} is {best.gain:.2f}x batch 1's throughput (paired, {best.pairs} pairs; "
           f"{best.images_per_s:.1f} vs {base.images_per_s:.1f} img/s by fastest passes)")
    if barrier is not None:
        why += f"; stopped at batch {barrier}: slower per image than batch 1"
    return best.size, wait, round(best.gain, 3), why


def calibrate_batching(model: LoadedModel, max_batch: int = DEFAULT_MAX_BATCH, budget_s: float = DEFAULT_BUDGET_S,
                       *, margin: float = DEFAULT_MARGIN, wait_fraction: float = DEFAULT_WAIT_FRACTION,
                       reps: int = DEFAULT_REPS, min_pairs: int = MIN_PAIRS,
                       clock: Callable[[], float] = time.perf_counter) -> BatchingChoice:
    """Measure `model` here, with this process's threads, and choose its batching (module docstring).

    `clock` is the time source for both the passes and the budget (tests inject a fake one).
    Raises CalibrationError when there is no budget, the model fails, or the budget allowed no
    batch to be timed beside batch 1 (nothing to compare); `choose_batching` turns that into the
    config's values.
    """
    if budget_s <= 0:
        raise CalibrationError(f"no time budget ({budget_s} s)")
    t0 = clock()
    try:
        samples = measure_sizes(model, batch_sizes(max_batch), budget_s, reps, clock, min_pairs)
    except CalibrationError:
        raise
    except Exception as e:  # a model that fails its warm-up cannot be calibrated
        raise CalibrationError(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e
    if max_batch > 1 and not samples.gains:  # nothing measured beside batch 1: nothing to compare
        ms = min(samples.passes[1]) * 1e3
        raise CalibrationError(f"the {budget_s:g} s budget allowed no batch beside batch 1 ({ms:.1f} ms a pass)")
    table = timing_table(samples)
    size, wait, speedup, reason = choose(table, margin, wait_fraction, min_pairs)
    if samples.skipped:
        reason += f"; not measured in the {budget_s:g} s budget: batch {', '.join(map(str, samples.skipped))}"
    info = cpu_flags()
    return BatchingChoice(size, wait, speedup, reason, "calibrated", table, tuple(samples.skipped), describe_cpu(info),
                          tuple(info.get("flags") or ()), cpu_share(), torch.get_num_threads(), budget_s,
                          round(clock() - t0, 3), max_batch, margin, wait_fraction, min_pairs)


def config_choice(max_batch_size: int, batch_wait_timeout_s: float, reason: str) -> BatchingChoice:
    """The config's values as a BatchingChoice (source "config")."""
    return BatchingChoice(max(1, int(max_batch_size)), max(0.0, float(batch_wait_timeout_s)), 1.0, reason, "config",
                          cpu=describe_cpu(), threads=cpu_share(), torch_threads=torch.get_num_threads())


def choose_batching(model: LoadedModel, max_batch_size: int = DEFAULT_MAX_BATCH, batch_wait_timeout_s: float = 0.0,
                    *, calibrate: bool = True, budget_s: float = DEFAULT_BUDGET_S, label: str = "model",
                    **kw: Any) -> BatchingChoice:
    """A replica's batching: calibrated with `max_batch_size` as the cap, or the config's values
    (`max_batch_size`, `batch_wait_timeout_s`) when `calibrate` is off or calibration cannot run,
    which logs one line saying so. `kw` goes to `calibrate_batching` (margin, wait_fraction, reps, min_pairs, clock)."""
    if not calibrate:
        return config_choice(max_batch_size, batch_wait_timeout_s, "calibration off in the config")
    try:
        choice = calibrate_batching(model, max(1, int(max_batch_size)), budget_s, **kw)
    except CalibrationError as e:
        log.warning("%s: batching calibration could not run (%s); using the config's max_batch_size %s, "
                    "batch_wait_timeout_s %s", label, e, max_batch_size, batch_wait_timeout_s)
        return config_choice(max_batch_size, batch_wait_timeout_s, f"calibration could not run: {e}")
    log.info("%s: %s", label, choice.log_line())
    return choice
