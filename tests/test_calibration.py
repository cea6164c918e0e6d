"""Batching calibration (flowers/inference/calibration.py): a fake model whose cost per pass is
set by the test and a fake clock that the model advances, so every decision is deterministic; and
one real run on the smoke checkpoint (table complete and consistent, no timing assertions)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from flowers.data.transforms import Preprocessing
from flowers.inference.calibration import (BatchingChoice, CalibrationError, batch_sizes, calibrate_batching,
                                           choose_batching)
from flowers.inference.loaded import LoadedModel


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def fake_model(clock: FakeClock, cost, calls: list[int] | None = None) -> LoadedModel:
    """A model whose pass over n images takes `cost(n)` seconds of the fake clock."""
    def proba(x):
        n = len(x)
        if calls is not None:
            calls.append(n)
        clock.t += cost(n)
        return np.full((n, 3), 1 / 3, np.float32)

    return LoadedModel(proba, Preprocessing(8, 10), ["a", "b", "c"], "fake")


def calibrate(cost, calls=None, **kw) -> BatchingChoice:
    clock = FakeClock()
    return calibrate_batching(fake_model(clock, cost, calls), clock=clock, **kw)


def test_batch_sizes():
    assert batch_sizes(16) == [1, 2, 4, 8, 16]
    assert batch_sizes(12) == [1, 2, 4, 8, 12]
    assert batch_sizes(1) == [1]
    with pytest.raises(ValueError):
        batch_sizes(0)


def test_turns_batching_on_where_it_pays():
    # a fixed 10 ms per pass shared by the batch, 2 ms per image: batch 16 is 4.6x batch 1
    c = calibrate(lambda n: 0.010 + 0.002 * n)
    assert c.max_batch_size == 16 and c.batching and c.source == "calibrated"
    assert c.speedup == pytest.approx(12 / (42 / 16), rel=1e-3)
    # wait: half of batch 1's 12 ms (less than the 9.4 ms an image saves at batch 16)
    assert c.batch_wait_timeout_s == pytest.approx(0.006)
    assert [t.size for t in c.table] == [1, 2, 4, 8, 16]
    assert all(t.reps == 15 and t.pairs == 14 for t in c.table[1:])  # 1 warm-up + 14 rounds beside batch 1
    assert [t.gain for t in c.table] == pytest.approx([12 * n / (10 + 2 * n) for n in (1, 2, 4, 8, 16)], rel=1e-3)
    assert c.reason.startswith("on: batch 16")


def test_wait_never_exceeds_what_an_image_saves():
    # batch 2 saves 1 ms per image, batch 4 slower per image than 2 but not than 1: best is 2
    c = calibrate(lambda n: {1: 0.010, 2: 0.018, 4: 0.038, 8: 0.079, 16: 0.159}[n])
    assert c.max_batch_size == 2
    assert c.batch_wait_timeout_s == pytest.approx(0.001)


def test_turns_batching_off_where_batched_passes_cost_more_per_image():
    # the Xeon/AMX case of issue 29: 61.5 ms at batch 1, ever more per image in bigger batches
    c = calibrate(lambda n: 0.0615 * n * (1 + 0.08 * (n - 1)), budget_s=30)
    assert c.max_batch_size == 1 and not c.batching
    assert c.batch_wait_timeout_s == 0.0 and c.speedup == 1.0
    assert c.reason.startswith("off: batch 2 is slower per image than batch 1")


def test_gain_under_the_margin_stays_off():
    c = calibrate(lambda n: 0.010 if n == 1 else 0.010 * n / 1.05)
    assert c.max_batch_size == 1 and "under the 1.10x needed" in c.reason
    # with a smaller margin it is on; sizes that tie go to the smallest (shortest wait for a full batch)
    assert calibrate(lambda n: 0.010 if n == 1 else 0.010 * n / 1.05, margin=0.02).max_batch_size == 2


def test_stops_before_a_size_slower_than_batch_1():
    # 2 pays, 4 costs more per image than batch 1, 8 and 16 pay most: the cap stays at 2, since
    # with a cap of 16 batches of 4 would form too
    ms = {1: 10, 2: 16, 4: 48, 8: 40, 16: 64}
    c = calibrate(lambda n: ms[n] / 1e3)
    assert c.max_batch_size == 2 and c.speedup == pytest.approx(1.25)
    assert "stopped at batch 4" in c.reason


def test_respects_max_batch():
    calls: list[int] = []
    c = calibrate(lambda n: 0.010 + 0.002 * n, calls, max_batch=4)
    assert set(calls) == {1, 2, 4} and c.max_batch_size == 4
    c = calibrate(lambda n: 0.010 + 0.002 * n, max_batch=12)
    assert [t.size for t in c.table] == [1, 2, 4, 8, 12] and c.max_batch_size == 12
    c = calibrate(lambda n: 0.010, max_batch=1)
    assert c.max_batch_size == 1 and [t.size for t in c.table] == [1]


def test_respects_the_budget():
    # 100 ms per image, 2 s: batch 4 is left out, since its first pass and two rounds up to it
    # (2.2 s) would not fit; 1 and 2 get a first pass each, then rounds of 1, 2, 1 while they fit
    calls: list[int] = []
    c = calibrate(lambda n: 0.1 * n, calls, budget_s=2.0)
    assert c.elapsed_s <= 2.0
    assert c.skipped == (4, 8, 16) and [t.size for t in c.table] == [1, 2]
    assert [t.pairs for t in c.table] == [0, 4] and calls[:14] == [1, 2] + [1, 2, 1] * 4
    assert set(calls[14:]) <= {1}  # at most a last batch-1 pass that fit (float rounding decides)
    assert "not measured in the 2 s budget: batch 4, 8, 16" in c.reason


def test_rounds_are_interleaved_and_judged_by_the_fastest_pass():
    calls: list[int] = []
    c = calibrate(lambda n: 0.001 * n, calls, reps=4)
    # one pass per size (it warms the shape up), then rounds with each size between two batch-1 passes
    assert calls == [1, 2, 4, 8, 16] + [1, 2, 1, 4, 1, 8, 1, 16, 1] * 3
    # a pass slowed by a neighbour (every second one of each size here takes 5x) does not move the figure
    seen: dict[int, int] = {}

    def noisy(n: int) -> float:
        seen[n] = seen.get(n, 0) + 1
        return 0.001 * n * (5 if seen[n] % 2 == 0 else 1)

    c2 = calibrate(noisy, reps=4)
    assert [t.ms_per_batch for t in c2.table] == [t.ms_per_batch for t in c.table]
    assert any(t.ms_median > t.ms_per_batch for t in c2.table)


def test_cannot_run_falls_back_to_the_config(caplog):
    clock = FakeClock()
    slow = fake_model(clock, lambda n: 0.2 * n)
    with pytest.raises(CalibrationError, match="allowed no batch beside batch 1"):
        calibrate_batching(slow, budget_s=0.3, clock=clock)
    with pytest.raises(CalibrationError, match="no time budget"):
        calibrate_batching(slow, budget_s=0, clock=clock)

    def broken(x):
        raise RuntimeError("warm-up failed\nsecond line")

    bad = LoadedModel(broken, Preprocessing(8, 10), ["a"], "bad")
    with caplog.at_level(logging.WARNING, logger="flowers.inference.calibration"):
        c = choose_batching(bad, 16, 0.03, label="ensemble")
    assert (c.max_batch_size, c.batch_wait_timeout_s, c.source) == (16, 0.03, "config")
    assert "RuntimeError: warm-up failed" in c.reason and "second line" not in c.reason
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "ensemble: batching calibration could not run" in lines[0]
    off = choose_batching(bad, 8, 0.0, calibrate=False)
    assert (off.max_batch_size, off.source, off.reason) == (8, "config", "calibration off in the config")


def test_choice_is_reported(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="flowers.inference.calibration"):
        c = choose_batching(fake_model(clock, lambda n: 0.010 + 0.002 * n), 16, 0.0, label="student", clock=clock)
    d = json.loads(json.dumps(c.as_dict()))
    assert d["max_batch_size"] == 16 and d["source"] == "calibrated" and len(d["table"]) == 5
    assert set(d["table"][0]) == {"size", "ms_per_batch", "ms_per_image", "images_per_s", "ms_median", "reps", "gain",
                                 "pairs"}
    assert d["cpu"] and d["threads"] >= 1 and d["torch_threads"] >= 1
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("student: batching on, max 16 (wait 6.0 ms, calibrated)") and "ms/image" in line


def test_real_model_table_is_complete_and_consistent(trained_checkpoint):
    from flowers.inference.predict import load_model

    c = calibrate_batching(load_model(trained_checkpoint), max_batch=4, budget_s=5)
    assert [t.size for t in c.table] + list(c.skipped) == [1, 2, 4]
    assert c.table and c.table[0].size == 1
    for t in c.table:
        assert t.reps >= 1 and t.ms_per_batch > 0
        assert t.ms_per_image == pytest.approx(t.ms_per_batch / t.size, rel=1e-3, abs=1e-3)
        assert t.images_per_s == pytest.approx(1e3 / t.ms_per_image, rel=1e-2)
    assert c.max_batch_size in [t.size for t in c.table]
    assert c.batch_wait_timeout_s == 0.0 if c.max_batch_size == 1 else c.batch_wait_timeout_s >= 0.0
    assert c.elapsed_s <= 5 + 5  # the budget, plus at most one misestimated pass


def test_a_lucky_pass_alone_does_not_turn_batching_on():
    # batch 2 costs 12 ms per image, but one pass in four is fast (5 ms per image): its fastest
    # pass says 2x, the median of its paired gains 0.83x
    passes: dict[int, int] = {}

    def cost(n: int) -> float:
        passes[n] = passes.get(n, 0) + 1
        return 0.010 if n == 1 else (0.005 if passes[n] % 4 == 0 else 0.012) * n

    c = calibrate(cost, max_batch=2, reps=8)
    assert c.max_batch_size == 1 and "slower per image than batch 1 (paired gain 0.83x" in c.reason


def test_a_lower_cap_is_chosen_again_from_the_table():
    c = calibrate(lambda n: 0.010 + 0.002 * n)
    assert c.capped(16) is c and c.capped(32) is None
    four = c.capped(4)
    assert four.max_batch_size == 4 and [t.size for t in four.table] == [1, 2, 4] and four.cap == 4
    assert "cap lowered to 4" in four.reason
    assert c.capped(1).max_batch_size == 1
    assert choose_batching(None, 8, 0.01, calibrate=False).capped(4) is None  # config values: nothing measured


def test_one_pair_is_not_enough_to_turn_batching_on():
    # batching pays (4.6x at 16) but the budget fits a single round beside batch 1
    c = calibrate(lambda n: 0.010 + 0.002 * n, reps=2)
    assert c.max_batch_size == 1 and "over 1 pair(s), 2 needed" in c.reason
    assert calibrate(lambda n: 0.010 + 0.002 * n, reps=2, min_pairs=1).max_batch_size == 16
