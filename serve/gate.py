"""Batch admission in front of `@serve.batch`, and the project's only use of Ray Serve internals.

Why a gate. Serve's batcher forms a batch as soon as requests arrive (the first one, then
whatever comes within its wait), not when the model becomes free; formed batches then queue
behind the running pass. Under load this fragments: requests that land during a long ensemble
pass become small batches of their own and stay that way, since their clients come back
together again. So each model replica holds requests that arrive while a pass runs and lets
them into Serve's queue together after the pass: as soon as as many are waiting as were in
flight during it (in a closed loop the clients of the batch just answered come straight
back), or after `max_wait_s`. An idle replica admits at once, so a lone request never waits.
Serve's own batch wait stays 0 while the gate is on; with the gate off (user_config
`admission_gate: false`) Serve waits `max_wait_s` itself, which is Serve's batching alone.
docs/serving.md has the measurements that decided for the gate.

The gate is plain asyncio: one replica is one event loop, so no locks. The model calls
`async with gate.admission():` around each request's trip through the batcher and
`with gate.running_pass():` around each forward pass.

Serve internals. Every private Ray Serve name the project relies on is used in this file and
nowhere else; tests/test_serve_gate.py fails (not skips) when a Ray upgrade removes one:
- `Deployment.options(version=..., _internal=True)`: `serve.run` otherwise gives every
  deployment a random version on each call, so a redeploy that only changes `user_config`
  would restart every replica instead of reconfiguring it live (as `serve deploy` does).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator, Iterator

log = logging.getLogger(__name__)

# the private Serve names used below, checked by tests/test_serve_gate.py
SERVE_INTERNALS = ("Deployment.options(version=..., _internal=True)",)


class AdmissionGate:
    """Holds requests while a pass runs and releases them together (see the module docstring)."""

    def __init__(self, max_batch_size: int = 1, max_wait_s: float = 0.0, enabled: bool = True) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.enabled = enabled
        self._active = 0  # requests inside admission()
        self._peak = 0  # most requests inside admission() during the running pass
        self._expected = 1  # requests the next batch waits for: the last pass's peak
        self._held = 0
        self._busy = False
        self._open = asyncio.Event()
        self._open.set()
        self._timer: asyncio.TimerHandle | None = None
        self._queued = 0  # admitted requests still waiting for their pass to start or end
        self._progress = time.monotonic()  # last pass start or end, or the first admission after idle

    @property
    def serve_wait_s(self) -> float:
        """The wait `@serve.batch` itself should use: none while the gate does the waiting."""
        return 0.0 if self.enabled else self.max_wait_s

    def configure(self, max_batch_size: int | None = None, max_wait_s: float | None = None,
                  enabled: bool | None = None) -> None:
        if max_batch_size is not None:
            self.max_batch_size = max(1, int(max_batch_size))
        if max_wait_s is not None:
            self.max_wait_s = max(0.0, float(max_wait_s))
        if enabled is not None:
            self.enabled = bool(enabled)
            if not self.enabled:
                self._release()

    def settings(self) -> dict[str, Any]:
        return {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.max_wait_s,
                "admission_gate": self.enabled}

    def stalled(self, after_s: float) -> bool:
        """Requests admitted, no pass running, and none started or ended for `after_s`: the
        batcher has stopped taking work (Serve's health check restarts the replica then)."""
        return self._queued > 0 and not self._busy and time.monotonic() - self._progress > after_s

    @contextlib.asynccontextmanager
    async def admission(self) -> AsyncIterator[None]:
        """Wait until this request may enter the batcher; count it while it is inside."""
        self._active += 1
        self._peak = max(self._peak, self._active)
        try:
            if self.enabled and not self._open.is_set():
                self._held += 1
                if not self._busy and self._held >= self._expected:
                    self._release()
                await self._open.wait()
            if self._queued == 0:
                self._progress = time.monotonic()
            self._queued += 1
            try:
                yield
            finally:
                self._queued -= 1
        finally:
            self._active -= 1

    @contextlib.contextmanager
    def running_pass(self) -> Iterator[None]:
        """Around one forward pass: close the gate meanwhile, then admit the next batch."""
        self._open.clear()
        if self._timer is not None:  # a timer from an earlier pass must not open the gate during this one
            self._timer.cancel()
            self._timer = None
        self._busy = True
        self._peak = self._active
        self._progress = time.monotonic()
        try:
            yield
        finally:
            self._busy = False
            self._progress = time.monotonic()
            # as many requests as were here during this pass will want the next one; wait for
            # them, at most max_wait_s
            self._expected = max(1, min(self._peak, self.max_batch_size))
            if not self.enabled or self._held >= self._expected or self.max_wait_s <= 0:
                self._release()
            else:
                self._timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._release)

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._held = 0
        self._open.set()


def with_version(deployment: Any, options: dict[str, Any], version: str) -> Any:
    """`deployment.options(**options)` with an explicit version (Serve internal, see above).

    Same version → `serve.run` reconfigures live replicas; a new one → rolling update. Falls
    back to Serve's default (a restart on every redeploy) with a warning if the option is gone.
    """
    try:
        return deployment.options(**options, version=version, _internal=True)
    except (TypeError, ValueError):
        log.warning("Serve rejected an explicit deployment version; user_config changes will restart replicas")
        return deployment.options(**options)
