"""Scoring in this process, without Ray: the engine for small local jobs.

Starting Ray, its workers and a model per actor costs seconds before the first image (measured in
docs/scoring.md); a job of a few thousand local images is done in less. Here the per-batch work is
the same `Scorer` the Ray Data actors run, split in its two stages: `Scorer.decode` (read, decode,
preprocess) on a few threads, a few batches ahead, while `Scorer.predict` runs the model on the
batch before in this thread. PIL and the model release the GIL for their heavy parts, so the
threads overlap on the CPUs. The model loads on a thread of its own while the first batches decode.
The rows and the output are those of the Ray engine: the same sinks write them.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from flowers import storage
from flowers.scoring.batch import Scorer
from flowers.scoring.plan import ScorePlan

log = logging.getLogger(__name__)


@dataclass
class LocalStats:
    """Where an in-process run's time went (seconds; decode is summed over its threads)."""

    model_load_s: float = 0.0   # Scorer's model load (overlaps the first decodes)
    model_wait_s: float = 0.0   # the model thread idle, waiting for the load
    decode_wait_s: float = 0.0  # the model thread idle, waiting for a decoded batch
    decode_s: float = 0.0       # read + decode + preprocess, all threads together
    predict_s: float = 0.0      # model + output rows
    batches: int = 0

    def phases(self) -> dict[str, float]:
        """The timings, for `ScoreSummary.extra["phases"]` (batches left out: a count)."""
        return {k: round(v, 3) for k, v in self.__dict__.items() if k != "batches"}


def usable(plan: ScorePlan) -> bool:
    """Whether this engine can run the plan: a single-file output and inputs on the local disk
    (object-store inputs want the Ray reader's parallel reads; a dataset folder, its part writers)."""
    return plan.layout == "file" and not any(storage.is_remote(p) for p in plan.todo)


def score_local(plan: ScorePlan, batch_size: int, threads: int, device: str = "cpu",
                stats: LocalStats | None = None) -> Iterator[pa.Table]:
    """Result tables for `plan.todo`, batch by batch and in order, scored in this process.

    `threads`: the CPUs to use (torch/ONNX threads of the model, and as many decode threads).
    Closing the iterator early stops the decode threads.
    """
    stats = stats if stats is not None else LocalStats()
    scorer = Scorer(plan.model, plan.top_k, threads=threads, device=device, views=plan.views)
    chunks = [plan.todo[i:i + batch_size] for i in range(0, len(plan.todo), batch_size)]
    depth = threads + 1  # decoded batches waiting: enough to cover one predict, little memory
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="score-decode")
    pending: deque = deque()
    nxt = 0
    try:
        while nxt < len(chunks) and len(pending) < depth:
            pending.append(pool.submit(scorer.decode, {"path": chunks[nxt]}))
            nxt += 1
        while pending:
            t0 = time.perf_counter()
            decoded = pending.popleft().result()
            stats.decode_wait_s += time.perf_counter() - t0
            if nxt < len(chunks):
                pending.append(pool.submit(scorer.decode, {"path": chunks[nxt]}))
                nxt += 1
            t1 = time.perf_counter()
            table = scorer.predict(decoded)
            stats.predict_s += time.perf_counter() - t1
            stats.decode_s += decoded.decode_s
            stats.batches += 1
            yield table
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        stats.model_load_s, stats.model_wait_s = scorer.load_s or 0.0, scorer.wait_s
        stats.predict_s -= scorer.wait_s  # the first predict waited for the model: counted there
