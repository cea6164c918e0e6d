"""Scoring in this process, without Ray: the engine for small local jobs.

Starting Ray, its workers and a model per actor costs seconds before the first image (measured in
docs/scoring.md); a job of a few thousand local images is done in less. Here the per-batch work is
the same `Scorer` the Ray Data actors run, on `lanes` threads that each take a whole batch through
`Scorer.decode` and `Scorer.predict`, a few batches ahead of the writer, in order. The model is
loaded once and shared, with one thread of its own per call, like one 1-CPU Ray actor per CPU:
a model that splits each call over N threads waits at every layer for the slowest of them, and
on a shared CPU one of them is often descheduled (measured: 2-3x slower under load, docs/scoring.md).
PIL, torch and ONNX Runtime release the GIL for their heavy parts, so the lanes overlap on the
CPUs. The model loads on a thread of its own while the lanes decode their first batches.
The rows and the output are those of the Ray engine: the same sinks write them.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from flowers import storage
from flowers.scoring.batch import Scorer
from flowers.scoring.plan import ScorePlan

log = logging.getLogger(__name__)


@dataclass
class LocalStats:
    """Where an in-process run's time went (seconds; decode and predict are summed over the lanes)."""

    model_load_s: float = 0.0   # the model's load, on its own thread (overlaps the first decodes)
    model_wait_s: float = 0.0   # lanes idle, waiting for the load
    decode_s: float = 0.0       # read + decode + preprocess
    predict_s: float = 0.0      # model + output rows
    write_wait_s: float = 0.0   # the writer idle, waiting for the next batch in order
    batches: int = 0

    def phases(self) -> dict[str, float]:
        """The timings, for `ScoreSummary.extra["phases"]` (batches left out: a count)."""
        return {k: round(v, 3) for k, v in self.__dict__.items() if k != "batches"}


def usable(plan: ScorePlan) -> bool:
    """Whether this engine can run the plan: a single-file output and inputs on the local disk
    (object-store inputs want the Ray reader's parallel reads; a dataset folder, its part writers)."""
    return plan.layout == "file" and not any(storage.is_remote(p) for p in plan.todo)


def _one(scorer: Scorer, paths: list[str]) -> tuple[pa.Table, float, float]:
    """A lane's work on one batch: (rows, decode seconds, predict seconds)."""
    decoded = scorer.decode({"path": paths})
    t = time.perf_counter()
    return scorer.predict(decoded), decoded.decode_s, time.perf_counter() - t


def score_local(plan: ScorePlan, batch_size: int, lanes: int, device: str = "cpu",
                stats: LocalStats | None = None) -> Iterator[pa.Table]:
    """Result tables for `plan.todo`, batch by batch and in order, scored in this process on
    `lanes` threads (one per CPU to use). Closing the iterator early stops the lanes."""
    import torch

    stats = stats if stats is not None else LocalStats()
    torch_threads = torch.get_num_threads()
    scorer = Scorer(plan.model, plan.top_k, threads=1, device=device, views=plan.views)
    chunks = [plan.todo[i:i + batch_size] for i in range(0, len(plan.todo), batch_size)]
    pool = ThreadPoolExecutor(max(1, lanes), thread_name_prefix="score-lane")
    pending: deque[Any] = deque()
    nxt = 0
    try:
        while chunks[nxt:] or pending:
            while nxt < len(chunks) and len(pending) < 2 * lanes:  # every lane busy, one batch queued each
                pending.append(pool.submit(_one, scorer, chunks[nxt]))
                nxt += 1
            t0 = time.perf_counter()
            table, dec, pred = pending.popleft().result()
            stats.write_wait_s += time.perf_counter() - t0
            stats.decode_s, stats.predict_s, stats.batches = stats.decode_s + dec, stats.predict_s + pred, stats.batches + 1
            yield table
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch_threads)  # the scorer set 1 for its lanes: this process's setting back
        stats.model_load_s, stats.model_wait_s = scorer.load_s or 0.0, scorer.wait_s
        stats.predict_s -= scorer.wait_s  # the first predicts waited for the model: counted there
