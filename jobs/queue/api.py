"""What the command line does with the queue: enqueue (after checks), list, status, stop, logs, queues."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

from flowers.config import ConfigError
from jobs import client as J
from jobs.queue import store as S
from jobs.queue.config import check_priority, check_retries
from jobs.queue.need import declared_cpus
from jobs.queue.order import positions

log = logging.getLogger(__name__)

CHECK_TTL_S = 15 * 60  # a cluster whose environment passed the import check is not probed again for this long
REPO = Path(__file__).resolve().parents[2]


def open_store(address: str | None = None, url: str | None = None) -> S.Store:
    return S.Store(S.resolve_url(url, J.resolve_address(address)))


def enqueue(kind: str, args: list[str], *, address: str | None = None, store_url: str | None = None,
            queue: str = "default", priority: int | None = None, max_retries: int = 0,
            num_cpus: float | None = None, driver_cpus: float = 0.0, python: str | None = None,
            working_dir: str | Path = ".", entrypoint: str | None = None, check_env: bool = True,
            start_dispatcher: bool = True) -> S.Job:
    """Check everything a user can get wrong, then add the job WAITING; nothing is queued on error.

    `entrypoint` replaces `python -m jobs.<kind> args` (tests, benches: trivial commands)."""
    check_retries(max_retries)
    if priority is not None:
        check_priority(priority)
    if num_cpus is not None and num_cpus < 0:
        raise ConfigError(f"--num-cpus {num_cpus}: give 0 or more")
    addr = J.resolve_address(address)
    c = J.client(addr)  # no Ray there: one line
    total = J.cluster_cpus(addr)  # a wrong token: one line
    store = open_store(addr, store_url)
    queues = store.queues()
    if queue not in queues:
        raise ConfigError(f"no queue '{queue}' on this cluster (queues: {', '.join(queues)}); see `flowers queues`")
    need = float(num_cpus if num_cpus is not None else declared_cpus(kind, args)) + driver_cpus
    if need > total + 1e-9:
        raise ConfigError(f"the job needs {need:g} CPUs but the whole cluster has {total:g}: lower its "
                          "parallelism (e.g. --set study.resources.max_concurrent=1) or pass --num-cpus")
    python = python or J.default_python()
    renv = J.runtime_env(working_dir)
    entry = entrypoint or J.entrypoint(kind, args, python)
    if check_env and entrypoint is None:
        _check_environment(store, c, addr, python, renv)
    job_id = f"{kind}-{uuid.uuid4().hex[:8]}"
    job = store.add(id=job_id, queue=queue, priority=queues[queue].priority if priority is None else priority,
                    state=S.WAITING, kind=kind, label=J.short_label(entry), entrypoint=entry,
                    runtime_env=json.dumps(renv), driver_cpus=driver_cpus, need_cpus=need,
                    max_retries=max_retries, attempt=0, ray_id=None, submitted_at=time.time(),
                    reason="waiting for the dispatcher")
    if start_dispatcher:
        ensure_dispatcher(store, addr)
    return job


def _check_environment(store: S.Store, c, addr: str, python: str, renv: dict[str, Any]) -> None:
    """The cluster's nodes must import the project with `python`: a one-second probe job, remembered."""
    key = f"{addr}|{python}|{renv['working_dir']}"
    if store.check_passed(key):
        return
    problem = J.probe_environment(c, python, renv)
    if problem:
        raise ConfigError(f"the cluster at {addr} cannot run the job: {problem}")
    store.remember_check(key, CHECK_TTL_S)


def ensure_dispatcher(store: S.Store, addr: str) -> str | None:
    """On one machine (SQLite) start a dispatcher in the background when none holds the lease; with a
    shared store, say where to start one. Returns a note for the user, or None."""
    if store.dispatcher_alive():
        return None
    if not store.url.startswith("sqlite"):
        return ("no dispatcher runs for this queue store: jobs wait until one does "
                "(`flowers queues dispatch` on the head, or `flowers cluster up`)")
    logf = Path(store.url.removeprefix("sqlite:///")).with_suffix(".log")
    with open(logf, "ab") as out:
        subprocess.Popen([sys.executable, "-m", "jobs.queue.dispatcher", "--address", addr, "--store", store.url,
                          "--exit-if-taken", "--idle-exit", "600"], cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                         stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
    return f"started a dispatcher for {addr} (log: {logf})"


def find(store: S.Store, job_id: str) -> S.Job:
    job = store.get(job_id)
    if job is None:
        raise ConfigError(f"no job '{job_id}' in the queue: see `flowers jobs list`")
    return job


def describe(job: S.Job, pos: dict[str, int] | None = None) -> dict[str, Any]:
    """A job as `jobs list --json` / `jobs status --json` show it."""
    ended = job.ended_at
    return {"id": job.id, "queue": job.queue, "priority": job.priority, "position": (pos or {}).get(job.id),
            "state": job.state if job.state != S.ADMITTING else S.WAITING, "job": job.label, "attempt": job.attempt,
            "ray_id": job.ray_id, "need_cpus": job.need_cpus, "submitted": job.submitted_at,
            "started": job.admitted_at,
            "duration_s": None if job.admitted_at is None else round((ended or time.time()) - job.admitted_at, 1),
            "message": job.reason if job.state in S.QUEUED + (S.ADMITTING,) else (job.message or ""),
            "retries": f"{job.attempt}/{job.max_retries}" if job.max_retries else None}


def list_all(address: str | None = None, store_url: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """The queue's jobs in arrival order, then Ray jobs submitted around the queue."""
    store = open_store(address, store_url)
    jobs = store.jobs(limit=limit)
    pos = positions([j for j in jobs if j.state in S.QUEUED])
    out = [describe(j, pos) for j in jobs]
    known = {j.id for j in jobs} | {j.ray_id for j in jobs if j.ray_id} | \
        {j.attempt_id(n) for j in jobs for n in range(j.attempt + 1)}
    for r in J.list_jobs(address):
        probe = "import flowers, jobs" in (r.get("entrypoint") or "")  # submit's environment check
        if not r["submission_id"] or r["submission_id"] in known or probe:
            continue
        start, end = (r["start_time"] or 0) / 1000, (r["end_time"] or 0) / 1000
        out.append({"id": r["submission_id"], "queue": "-", "priority": None, "position": None,
                    "state": r["status"], "job": J.short_label(r["entrypoint"] or ""), "attempt": 0,
                    "ray_id": r["submission_id"], "need_cpus": None, "submitted": start or None,
                    "started": start or None, "duration_s": round((end or time.time()) - start, 1) if start else None,
                    "message": _ray_message(r), "retries": None})
    return out


def _ray_message(r: dict[str, Any]) -> str:
    """One line for a job Ray ran outside the queue."""
    msg = r.get("message") or ""
    if r["status"] == "FAILED":
        return J.explain_failure(SimpleNamespace(**r), msg, (r.get("entrypoint") or "python").split(" ", 1)[0])
    return msg.splitlines()[0][:200] if msg else ""


def status(job_id: str, address: str | None = None, store_url: str | None = None) -> dict[str, Any]:
    """The queue's view of a job; for a job submitted to Ray around the queue, Ray's."""
    store = open_store(address, store_url)
    job = store.get(job_id)
    if job is not None:
        return describe(job, positions(store.jobs(S.QUEUED)))
    info = J.job_info(J.client(address), job_id)
    if info is None:
        raise ConfigError(f"no job '{job_id}' in the queue or in Ray: see `flowers jobs list`")
    r = {"submission_id": job_id, "status": J.status_name(info.status), "entrypoint": info.entrypoint,
         "message": info.message, "driver_exit_code": getattr(info, "driver_exit_code", None)}
    start, end = (info.start_time or 0) / 1000, (info.end_time or 0) / 1000
    return {"id": job_id, "queue": "-", "priority": None, "position": None, "state": r["status"],
            "job": J.short_label(info.entrypoint or ""), "attempt": 0, "ray_id": job_id, "need_cpus": None,
            "submitted": start or None, "started": start or None,
            "duration_s": round((end or time.time()) - start, 1) if start else None,
            "message": _ray_message(r), "retries": None}


def stop(job_id: str, address: str | None = None, store_url: str | None = None) -> str:
    """A waiting job is removed (it never starts); a running one is stopped through Ray."""
    store = open_store(address, store_url)
    job = store.get(job_id)
    if job is None:  # a job submitted to Ray around the queue
        return "stopping" if J.stop_job(J.client(address), job_id) else "not running"
    if store.move(job_id, S.QUEUED, state=S.STOPPED, ended_at=time.time(), reason=None,
                  message="removed from the queue before it started"):
        return "removed from the queue (it never started)"
    if job.state in S.FINAL:
        return f"already {job.state}"
    store.set(job_id, stop_requested=True)
    job = store.get(job_id)
    if job.ray_id:
        J.stop_job(J.client(address), job.ray_id)
    return "stopping"


def logs(job_id: str, address: str | None = None, store_url: str | None = None) -> str:
    job = open_store(address, store_url).get(job_id)
    if job is None:  # a job submitted to Ray around the queue
        return J.client_logs(job_id, address)
    if not job.ray_id:
        return f"job {job_id} has not started: {job.reason or job.message or job.state}\n"
    return J.client_logs(job.ray_id, address)


def follow(job_id: str, address: str | None = None, store_url: str | None = None,
           poll_s: float = 1.0) -> Iterator[str]:
    """Wait for the job to start, then its log as it grows (Ray's tail_job_logs) until it ends."""
    store = open_store(address, store_url)
    if store.get(job_id) is None:  # a job submitted to Ray around the queue
        yield from J.tail_logs(job_id, address)
        return
    job = find(store, job_id)
    said = None
    while job.state in S.QUEUED + (S.ADMITTING,):
        if job.reason != said:
            said = job.reason
            yield f"[queue] {job.id} waiting: {job.reason}\n"
        time.sleep(poll_s)
        job = find(store, job_id)
    if job.ray_id:
        yield from J.tail_logs(job.ray_id, address)


def queue_summary(address: str | None = None, store_url: str | None = None) -> list[dict[str, Any]]:
    store = open_store(address, store_url)
    jobs = store.jobs([*S.QUEUED, *S.ACTIVE])
    out = []
    for q in store.queues().values():
        mine = [j for j in jobs if j.queue == q.name]
        out.append({"queue": q.name, "max_running": q.max_running, "priority": q.priority,
                    "running": sum(j.state in S.ACTIVE for j in mine),
                    "waiting": sum(j.state in S.QUEUED for j in mine)})
    return out


def wait(job_id: str, address: str | None = None, store_url: str | None = None, timeout_s: float = 24 * 3600,
         poll_s: float = 2.0) -> str:
    store = open_store(address, store_url)
    deadline = time.time() + timeout_s
    while True:
        job = find(store, job_id)
        if job.state in S.FINAL:
            return job.state
        if time.time() > deadline:
            raise ConfigError(f"job {job_id} still {job.state} after {timeout_s:.0f}s")
        time.sleep(poll_s)
