"""The dispatcher: admits queued jobs to Ray Jobs in order, follows them, retries infrastructure failures.

    python -m jobs.queue.dispatcher --address http://HEAD:8265 [--store URL] [--queues queues.yaml]
    flowers queues dispatch ...          # the same

One process per store holds the lease (`Store.take_lease`, renewed every pass; a dead holder's
lease expires after `LEASE_TTL_S` and the next dispatcher takes over). It keeps no state of its
own: every pass reads the store and Ray, so killing it at any instant loses nothing:
- a job is moved WAITING → ADMITTING in the store *before* it is handed to Ray, under the Ray
  submission id `<job id>` (attempt 0) or `<job id>-rN`, so on restart every ADMITTING job is looked
  up in Ray by that id: found → RUNNING (never submitted twice), absent → submitted now;
- a RUNNING job whose Ray record ended gets its outcome; an infrastructure failure (driver killed,
  job supervisor died or never started, the head lost the job) with retries left goes back in line
  as RETRYING with its attempt number up, and a study is resumed from its storage (`--resume`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from typing import Any

from jobs import client as J
from jobs.queue import store as S
from jobs.queue.config import load_queues
from jobs.queue.order import plan

log = logging.getLogger(__name__)

LEASE_TTL_S = 15.0
POLL_S = 1.0
# a job whose driver never started (runtime env package lost, supervisor not placed in time) ran no
# code, so sending it again cannot run anything twice: that many times, whatever --max-retries says
START_RETRIES = 3


class Dispatcher:
    """One admitting pass at a time over the store at `url`, for the Ray Jobs API at `address`."""

    def __init__(self, store: S.Store, address: str | None = None, owner: str | None = None):
        self.store = store
        self.address = address
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}"
        self.client = None  # made on the first pass: a dispatcher may start before the head answers
        self._cpus: tuple[float, float] = (0.0, 0.0)  # (value, when)

    def cluster_cpus(self) -> float:
        """Total CPUs of the live nodes, at most 5 s old."""
        value, when = self._cpus
        if time.time() - when > 5:
            value = J.cluster_cpus(self.address)
            self._cpus = (value, time.time())
        return value

    def step(self) -> bool:
        """One pass: lease, reconcile ADMITTING, follow RUNNING, admit what fits. False without the lease."""
        if not self.store.take_lease(self.owner, LEASE_TTL_S):
            return False
        if self.client is None:
            self.client = J.client(self.address)
        for job in self.store.jobs([S.ADMITTING]):
            self._hand_to_ray(job)
        for job in self.store.jobs([S.RUNNING]):
            self._follow(job)
        queued = self.store.jobs(S.QUEUED)
        if queued:
            active = self.store.jobs(S.ACTIVE)
            decisions = plan(queued, active, self.store.queues(), self.cluster_cpus())
            for job, reason in decisions:
                if reason is None:
                    first_start = job.admitted_at or time.time()  # a retried job keeps its first start
                    if self.store.move(job.id, [job.state], state=S.ADMITTING, admitted_at=first_start,
                                       ray_id=job.attempt_id(), reason=None):
                        self._hand_to_ray(self.store.get(job.id))
                elif reason != job.reason:
                    self.store.set(job.id, reason=reason)
        return True

    def _hand_to_ray(self, job: S.Job) -> None:
        """Submit an ADMITTING job under its deterministic id, or find that Ray already has it."""
        rid = job.attempt_id()
        try:
            if J.job_info(self.client, rid) is None:
                J.submit_entrypoint(self.client, job.entrypoint, json.loads(job.runtime_env), rid, job.driver_cpus,
                                    {"flowers.queue": job.queue, "flowers.job": job.id})
        except J.JobsError as e:
            # Ray refused (bad runtime env, unreachable): stays ADMITTING and is tried again next pass
            log.warning("job %s: Ray did not take it yet: %s", job.id, e)
            return
        if self.store.move(job.id, [S.ADMITTING], state=S.RUNNING):
            log.info("job %s admitted to Ray as %s (queue %s, %g CPUs)", job.id, rid, job.queue, job.need_cpus)
            if self.store.get(job.id).stop_requested:  # stopped while we were submitting
                J.stop_job(self.client, rid)

    def _follow(self, job: S.Job) -> None:
        info = J.job_info(self.client, job.ray_id or job.attempt_id())
        if info is None:
            self._ended(job, "FAILED", "the Ray head no longer knows this job (restarted?)", "infra")
            return
        status = J.status_name(info.status)
        if status in ("PENDING", "RUNNING"):
            if job.stop_requested:
                J.stop_job(self.client, job.ray_id)
            return
        if status in ("SUCCEEDED", "STOPPED"):
            self._ended(job, status, "finished" if status == "SUCCEEDED" else "stopped", "done")
            return
        start = J.start_failure(info)
        if start:
            self._ended(job, "FAILED", start, "start")
            return
        infra = J.infrastructure_failure(info)
        msg = infra or J.explain_failure(info, J.logs_tail(self.client, job.ray_id), python_of(job))
        self._ended(job, "FAILED", msg, "infra" if infra else "job")

    def _ended(self, job: S.Job, status: str, message: str, cause: str) -> None:
        """Record an attempt's end. `cause`: done | job (its own input or code: final) | infra (retried
        while --max-retries allows) | start (the driver never ran: retried up to START_RETRIES times)."""
        history = json.loads(job.history) + [{"attempt": job.attempt, "ray_id": job.ray_id, "status": status,
                                              "message": message, "cause": cause, "ended_at": time.time()}]
        starts = sum(1 for h in history if h.get("cause") == "start")
        if cause == "start" and not job.stop_requested and starts <= START_RETRIES:
            retry, why = True, f"start retry {starts}/{START_RETRIES} after: {message}"
        elif cause == "infra" and not job.stop_requested and job.attempt - starts < job.max_retries:
            n = job.attempt - starts + 1
            retry, why = True, f"retry {n}/{job.max_retries} after: {message}"
        else:
            retry, why = False, ""
        if retry:
            self.store.move(job.id, [S.RUNNING], state=S.RETRYING, attempt=job.attempt + 1, ray_id=None,
                            entrypoint=resume_entrypoint(job), history=json.dumps(history), reason=why)
            log.info("job %s: %s", job.id, why)
            return
        if cause == "infra" and job.max_retries:
            message += f" (no retries left of {job.max_retries})"
        self.store.move(job.id, [S.RUNNING], state=status, ended_at=time.time(), message=message,
                        history=json.dumps(history), reason=None)
        log.info("job %s %s: %s", job.id, status, message)

    def run(self, poll_s: float = POLL_S, stop_after: float | None = None, exit_if_taken: bool = False,
            idle_exit_s: float | None = None) -> None:
        """Pass after pass until killed (or `stop_after` seconds: tests, benches). One started on demand by
        a CLI call (`exit_if_taken`, `idle_exit_s`) returns when another dispatcher holds the lease, or
        after `idle_exit_s` with nothing queued or running (the next submit starts one again)."""
        t_end = time.time() + stop_after if stop_after else None
        busy_at = time.time()
        log.info("dispatcher %s on %s for %s", self.owner, S.redact(self.store.url), J.resolve_address(self.address))
        try:
            while t_end is None or time.time() < t_end:
                try:
                    if not self.step() and exit_if_taken:
                        log.info("another dispatcher holds the lease: %s", self.store.lease()[0])
                        return
                    if idle_exit_s is not None:
                        if self.store.jobs([*S.QUEUED, *S.ACTIVE], limit=1):
                            busy_at = time.time()
                        elif time.time() - busy_at > idle_exit_s:
                            log.info("nothing queued or running for %.0fs: exiting", idle_exit_s)
                            return
                except J.JobsError as e:  # Ray unreachable for a while (head restarting): keep the lease, retry
                    log.warning("pass skipped: %s", e)
                    self.store.take_lease(self.owner, LEASE_TTL_S)
                time.sleep(poll_s)
        finally:
            self.store.release_lease(self.owner)


def python_of(job: S.Job) -> str:
    return job.entrypoint.split(" ", 1)[0]


def resume_entrypoint(job: S.Job) -> str:
    """A retried study continues from its Tune storage and MLflow runs (no finished trial again)."""
    if job.kind == "study" and " --resume" not in f"{job.entrypoint} ":
        return job.entrypoint + " --resume"
    return job.entrypoint


def main(argv: list[str] | None = None) -> int:
    from flowers.errors import user_errors

    p = argparse.ArgumentParser(prog="python -m jobs.queue.dispatcher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray Jobs address (default $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS)")
    p.add_argument("--store", help="queue store URL (default $FLOWERS_QUEUE_URL, else SQLite per address)")
    p.add_argument("--queues", help="queues YAML (name → max_running, priority); written into the store")
    p.add_argument("--poll", type=float, default=POLL_S, help="seconds between passes")
    p.add_argument("--exit-if-taken", action="store_true", help="exit when another dispatcher holds the lease")
    p.add_argument("--idle-exit", type=float, default=None, metavar="S",
                   help="exit after S seconds with nothing queued or running (dispatchers started on demand)")


def run(args: Any) -> int:
    J.quiet_ray_logs()
    address = J.resolve_address(args.address)
    store = S.Store(S.resolve_url(args.store, address))
    if args.queues:
        store.set_queues(load_queues(args.queues))
    Dispatcher(store, address).run(args.poll, exit_if_taken=args.exit_if_taken,
                                   idle_exit_s=getattr(args, "idle_exit", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
