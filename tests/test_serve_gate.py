"""The admission gate of serve/app.py's batched models, driven without Ray (unit level).

A fake predictor whose forward pass sleeps stands in for the model; `@serve.batch` runs in
plain asyncio. The HTTP-level batching test is in test_serve.py.
"""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

pytest.importorskip("ray.serve")
from serve.app import BatchedModel  # noqa: E402

PASS_S = 0.03


@pytest.fixture(autouse=True)
def _outside_a_replica(monkeypatch):
    """Serve's batch queue reads the replica context for a warning only; there is none here."""
    from ray.serve import batching

    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)


class _FakePredictor:
    model = SimpleNamespace(name="fake", version="1")

    def predict(self, images: list[bytes], top_k: int = 5) -> list[dict]:
        time.sleep(PASS_S)  # a forward pass that takes the same time whatever the batch size
        return [{"label": 0, "top_k": [{"label": 0}], "uncertain": False} for _ in images]


class _NoMetric:
    def observe(self, *a) -> None: ...
    def inc(self, *a) -> None: ...


def _model(max_batch: int, max_wait: float) -> BatchedModel:
    from ray import serve

    class Fresh(BatchedModel):
        # @serve.batch keeps one queue per decorated function, bound to the event loop it first
        # ran on (one replica = one process in Serve); each test's asyncio.run needs its own
        predict_batch = serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)(BatchedModel.predict_batch.__wrapped__)

    m = Fresh.__new__(Fresh)  # no model loading, no Ray metrics
    m._init_gate()
    m.predictor, m.batch_hist, m.uncertain = _FakePredictor(), _NoMetric(), _NoMetric()
    m.reconfigure({"max_batch_size": max_batch, "batch_wait_timeout_s": max_wait})
    return m


async def _closed_loop(m: BatchedModel, clients: int, per_client: int) -> list[int]:
    """Each client sends its next request when the last returns, after a transit delay that
    differs per client (2, 4, 6 ... ms: network and HTTP handling spread the arrivals, as over
    real HTTP); returns the batch size each request rode in."""
    sizes: list[int] = []

    async def client(i: int) -> None:
        for _ in range(per_client):
            await asyncio.sleep(0.002 * (i + 1))
            r = await m.predict(b"img", 1)
            sizes.append(r["batch_size"])

    await asyncio.gather(*(client(i) for i in range(clients)))
    return sizes


def test_closed_loop_settles_into_full_batches():
    async def go():
        m = _model(max_batch=8, max_wait=0.5)
        sizes = await _closed_loop(m, clients=8, per_client=6)
        return m, sizes

    m, sizes = asyncio.run(go())
    assert len(sizes) == 48
    # first pass: the first arrival alone (an idle replica admits at once); then the 7 held
    # ones wait for the first client to come back and all 8 ride together
    assert m.batch_sizes[8] >= 5, dict(m.batch_sizes)
    assert sum(sizes) / len(sizes) >= 6, dict(m.batch_sizes)


def test_idle_replica_does_not_wait_for_company():
    async def go():
        m = _model(max_batch=8, max_wait=2.0)
        await m.predict(b"img", 1)  # leaves expected = 1 after the pass
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        r = await m.predict(b"img", 1)
        return r, time.perf_counter() - t0

    r, elapsed = asyncio.run(go())
    assert r["batch_size"] == 1
    assert elapsed < 1.0  # far below the 2 s max wait: a lone request is not held


def test_gate_gives_up_after_max_wait_when_clients_leave():
    async def go():
        m = _model(max_batch=8, max_wait=0.2)
        await _closed_loop(m, clients=4, per_client=3)  # expected becomes 4
        # now only one client: it must get through after at most max_wait, not hang
        return await asyncio.wait_for(m.predict(b"img", 1), timeout=5)

    assert asyncio.run(go())["batch_size"] == 1


def test_switching_batching_on_under_load_converges_to_full_batches():
    """Batching switched on live while 8 clients keep sending (as `user_config` does): the
    requests queued under max_batch_size=1 drain and the gate then fills batches again."""
    async def go():
        m = _model(max_batch=1, max_wait=0.5)
        sizes: list[int] = []

        async def client(i: int) -> None:
            for _ in range(16):
                await asyncio.sleep(0.002 * (i + 1))
                r = await m.predict(b"img", 1)
                sizes.append(r["batch_size"])
                if len(sizes) == 24:  # mid-run, with requests queued behind the unbatched passes
                    m.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.5})

        await asyncio.gather(*(client(i) for i in range(8)))
        return sizes

    sizes = asyncio.run(go())
    assert set(sizes[:20]) == {1}
    tail = sizes[-48:]
    assert sum(tail) / len(tail) >= 6, tail
