"""The job queue on the local test cluster: admission latency, short jobs per minute, CPU use with a
full queue. Trivial jobs (no training): what is measured is the queue and Ray Jobs, not a model.

    python bench/job_queue.py                   # starts a test cluster (2 workers x 1 CPU), stops it after
    python bench/job_queue.py --state /tmp/fc   # an already running `flowers cluster up --state /tmp/fc`

- admission latency: one job into an empty queue; submit (row committed) → handed to Ray (store
  RUNNING) → Ray reports the driver RUNNING. Median of --latency-runs;
- short jobs per minute: --short jobs of `python -c pass` (0 CPUs) into a queue of 4 slots;
- CPU use with a full queue: --burn jobs that each run one 1-CPU Ray task spinning for --burn-s
  seconds, declared need 1 CPU; the share of the cluster's CPUs the admitted jobs hold, sampled
  every 0.5 s while jobs wait, and the burned CPU-seconds / (cluster CPUs x wall).
Prints the CPU model and flags; nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_line  # noqa: E402  (bench/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]



BURN = ("import ray, time\nray.init()\n@ray.remote(num_cpus=1)\ndef burn(s):\n    t = time.process_time()\n"
        "    end = time.time() + s\n    while time.time() < end: pass\n    return time.process_time() - t\n"
        "print('cpu_s', ray.get(burn.remote({s})))\n")


def enqueue(queue: str, code: str, cpus: float):
    from jobs.queue import api

    return api.enqueue("cmd", [], queue=queue, entrypoint=f"{sys.executable} -c {shlex.quote(code)}", num_cpus=cpus,
                       start_dispatcher=False)


def wait_all(store, ids, timeout=3600):
    from jobs.queue import store as S

    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = [store.get(i) for i in ids]
        if all(j.state in S.FINAL for j in jobs):
            return jobs
        time.sleep(0.2)
    raise SystemExit("jobs did not finish in time")


def latency(store, runs: int) -> tuple[float, float]:
    from jobs import client as J

    c = J.client()
    admit, start = [], []
    for _ in range(runs):
        t0 = time.time()
        job = enqueue("bench", "import time; time.sleep(1)", 0)
        while store.get(job.id).state not in ("RUNNING", "SUCCEEDED", "FAILED"):
            time.sleep(0.05)
        admit.append(time.time() - t0)
        while J.status_name(c.get_job_status(job.id)) == "PENDING":
            time.sleep(0.05)
        start.append(time.time() - t0)
        wait_all(store, [job.id])
    return statistics.median(admit), statistics.median(start)


def throughput(store, n: int) -> float:
    t0 = time.time()
    ids = [enqueue("bench", "pass", 0).id for _ in range(n)]
    jobs = wait_all(store, ids)
    bad = [j for j in jobs if j.state != "SUCCEEDED"]
    if bad:
        raise SystemExit(f"{len(bad)} short jobs did not succeed: {bad[0].message}")
    return n / ((max(j.ended_at for j in jobs) - t0) / 60)


def utilisation(store, n: int, burn_s: float, total: float) -> tuple[float, float]:
    from jobs import client as J
    from jobs.queue import store as S

    t0 = time.time()
    ids = [enqueue("bench", BURN.format(s=burn_s), 1).id for _ in range(n)]
    held = []
    while True:
        jobs = [store.get(i) for i in ids]
        if not any(j.state in S.QUEUED for j in jobs):
            break
        held.append(sum(j.need_cpus for j in jobs if j.state in S.ACTIVE) / total)
        time.sleep(0.5)
    jobs = wait_all(store, ids)
    bad = [j for j in jobs if j.state != "SUCCEEDED"]
    if bad:
        raise SystemExit(f"{len(bad)} burn jobs did not succeed: {bad[0].message}")
    wall = max(j.ended_at for j in jobs) - t0
    c = J.client()
    cpu_s = 0.0
    for j in jobs:
        for line in J.logs_tail(c, j.ray_id).splitlines():
            if line.startswith("cpu_s "):
                cpu_s += float(line.split()[1])
    print(f"  full queue: {n} jobs done in {wall:.0f} s (at best {n * burn_s / total:.0f} s), {cpu_s:.0f} CPU-s burned")
    return (statistics.mean(held) if held else float("nan")), cpu_s / (total * wall)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", help="state dir of a running `flowers cluster up` (default: start one)")
    p.add_argument("--latency-runs", type=int, default=5)
    p.add_argument("--short", type=int, default=20)
    p.add_argument("--burn", type=int, default=6)
    p.add_argument("--burn-s", type=float, default=20.0)
    args = p.parse_args()
    from jobs import client as J
    from jobs import localcluster as T
    from jobs.queue import store as S
    from jobs.queue.config import parse_queues

    cluster = T.LocalCluster.load(args.state) if args.state else \
        T.up(Path(tempfile.mkdtemp(prefix="fqb-", dir="/tmp")), workers=2, cpus_per_worker=1, workdir=REPO)
    try:
        os.environ.update(cluster.env())
        store = S.Store(cluster.env()["FLOWERS_QUEUE_URL"])
        store.set_queues(parse_queues({"queues": {"bench": {"max_running": 4}}}))
        total = J.cluster_cpus()
        print(f"machine: {cpu_line()}; load average {os.getloadavg()[0]:.1f} at start")
        print(f"cluster: head (0 CPUs) + {len(cluster.workers)} workers, {total:g} CPUs; queue 'bench' max_running 4; "
              "dispatcher polls every 1 s")
        a, s = latency(store, args.latency_runs)
        print(f"admission latency (median of {args.latency_runs}): submit → in Ray {a:.2f} s, "
              f"→ driver RUNNING {s:.2f} s")
        print(f"short jobs (python -c pass, {args.short} at once): {throughput(store, args.short):.1f} jobs/min")
        held, used = utilisation(store, args.burn, args.burn_s, total)
        print(f"full queue ({args.burn} jobs x one 1-CPU task of {args.burn_s:g} s): admitted jobs hold "
              f"{held:.0%} of the CPUs while jobs wait; burned CPU-s / (CPUs x wall) = {used:.0%}")
        store.set_queues(parse_queues({}))
    finally:
        if not args.state:
            cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
