"""Who goes next and why the others wait: a pure function of the store's rows and the cluster's CPUs.

Order: higher priority first, then arrival (the store's sequence number), across all queues.
A job is admitted when its queue has a free slot and the CPUs not yet promised to admitted jobs
cover its declared need. A job that does not fit holds back every job after it (no backfill),
so a big job is never starved by a stream of small ones; a job held back only by its own
queue's limit holds back nobody else.
"""
from __future__ import annotations

from jobs.queue.config import DEFAULT_QUEUE, QueueSpec
from jobs.queue.store import Job


def _n(x: float) -> str:
    return f"{x:g}"


def ordered(queued: list[Job]) -> list[Job]:
    return sorted(queued, key=lambda j: (-j.priority, j.seq))


def plan(queued: list[Job], active: list[Job], queues: dict[str, QueueSpec],
         total_cpus: float) -> list[tuple[Job, str | None]]:
    """Each queued job in order with None (admit now) or the reason it waits, in a user's words."""
    free = total_cpus - sum(j.need_cpus for j in active)
    running: dict[str, int] = {}
    for j in active:
        running[j.queue] = running.get(j.queue, 0) + 1
    out: list[tuple[Job, str | None]] = []
    blockers: list[Job] = []  # waiting jobs ahead that hold back everything after them
    for job in ordered(queued):
        spec = queues.get(job.queue) or queues.get(DEFAULT_QUEUE) or QueueSpec(job.queue)
        n = running.get(job.queue, 0)
        if n >= spec.max_running:
            out.append((job, f"queue '{job.queue}' full: {n}/{spec.max_running} running"))
        elif blockers:
            out.append((job, _behind(job, blockers)))
            blockers.append(job)
        elif job.need_cpus > free + 1e-9:
            out.append((job, f"cluster has {_n(max(free, 0))} free CPUs, job needs {_n(job.need_cpus)}"))
            blockers.append(job)
        else:
            out.append((job, None))
            free -= job.need_cpus
            running[job.queue] = n + 1
    return out


def _behind(job: Job, blockers: list[Job]) -> str:
    higher = sum(1 for b in blockers if b.priority > job.priority)
    n = len(blockers)
    jobs = "job" if n == 1 else "jobs"
    if higher == n:
        return f"behind {n} {jobs} of higher priority"
    if higher == 0:
        return f"behind {n} earlier {jobs}"
    return f"behind {n} {jobs} ({higher} of higher priority)"


def positions(queued: list[Job]) -> dict[str, int]:
    """1-based place in line of every queued job."""
    return {j.id: i + 1 for i, j in enumerate(ordered(queued))}
