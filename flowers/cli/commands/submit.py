"""`flowers submit study|tune|score|deploy`: queue an entry point for the cluster (`jobs.queue.api`).

The job waits in a queue (`--queue`, `--priority`) until its queue has a free slot and the cluster
the CPUs it declares; the dispatcher then hands it to Ray Jobs (docs/queue.md).
"""
from __future__ import annotations


def register(sub) -> None:
    from jobs.options import ENTRYPOINTS

    p = sub.add_parser("submit", help="queue a Ray job: study | tune | score | deploy (python -m jobs.<name>)",
                       description="Everything after `--` goes to the entry point, e.g. "
                                   "`flowers submit study -- --profile study-cpu`. Token auth: RAY_AUTH_TOKEN or "
                                   "~/.ray/auth_token. Queue store: $FLOWERS_QUEUE_URL (a cluster's PostgreSQL; "
                                   "`flowers cluster env` sets it), else a SQLite file per cluster under "
                                   "~/.flowers/queues.")
    p.add_argument("job", choices=ENTRYPOINTS)
    p.add_argument("args", nargs="*", help="arguments for the entry point (after --)")
    p.add_argument("--address", help="Ray dashboard/Jobs address (default $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS, "
                                     "else http://127.0.0.1:8265)")
    p.add_argument("--queue", "-q", default="default", help="queue name (default: default; see `flowers queues`)")
    p.add_argument("--priority", type=int, help="higher runs first within the line (default: the queue's)")
    p.add_argument("--max-retries", type=int, default=0,
                   help="resubmit after an infrastructure failure (node lost, driver killed, start timeout); a "
                        "study resumes from its storage. Never for a failure of the job's own input or code")
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs the job needs at once (default: from its config: trials × CPUs per trial, ...)")
    p.add_argument("--driver-cpus", type=float, default=0.0,
                   help="CPUs reserved for the driver process itself (Ray entrypoint resources; default 0)")
    p.add_argument("--working-dir", default=".", help="folder uploaded as the job's working_dir (default .)")
    p.add_argument("--python", default=None,
                   help="Python on the cluster nodes (default: the one running flowers, i.e. this environment)")
    p.add_argument("--store", help="queue store URL (default $FLOWERS_QUEUE_URL, else SQLite per cluster)")
    p.add_argument("--no-check", dest="check_env", action="store_false",
                   help="skip the check that the nodes can import the project with --python")
    p.add_argument("--local-store", action="store_true",
                   help="study: track into this machine's .flowers/ (absolute path); only for a head on this machine")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its logs")
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    from pathlib import Path

    from flowers.config import ConfigError
    from jobs import client as J
    from jobs.queue import api

    J.quiet_ray_logs()
    extra = list(args.args)
    tracked = any(a == "--tracking-uri" or a.startswith("--tracking-uri=") for a in extra) or \
        bool(os.environ.get("MLFLOW_TRACKING_URI"))
    if args.job in ("study", "tune") and not (tracked or args.local_store):
        # the job runs in a temporary copy of the working dir: an embedded store there is lost with it
        raise ConfigError(f"a submitted {args.job} needs a tracking server: add `-- --tracking-uri http://MLFLOW:5000` "
                          "(or set MLFLOW_TRACKING_URI), or pass --local-store when the Ray head runs on this machine")
    if args.job == "study" and args.local_store and not any(a.startswith("study.home=") for a in extra):
        # the job runs in a copy of the working dir; a relative .flowers would vanish with it
        extra += ["--set", f"study.home={Path('.flowers').resolve()}"]
    if not Path(args.working_dir).is_dir():
        raise ConfigError(f"--working-dir {args.working_dir}: not a folder")
    try:
        job = api.enqueue(args.job, extra, address=args.address, store_url=args.store, queue=args.queue,
                          priority=args.priority, max_retries=args.max_retries, num_cpus=args.num_cpus,
                          driver_cpus=args.driver_cpus, python=args.python, working_dir=args.working_dir,
                          check_env=args.check_env, start_dispatcher=False)
        print(f"submitted {job.id}: {job.label} (queue {job.queue}, priority {job.priority}, {job.need_cpus:g} CPUs)")
        note = api.ensure_dispatcher(api.open_store(args.address, args.store), J.resolve_address(args.address))
        if note:
            print(note)
        print(f"follow: flowers jobs logs {job.id} --follow   status: flowers jobs status {job.id}")
        if args.wait:
            st = api.wait(job.id, args.address, args.store)
            print(api.logs(job.id, args.address, args.store), end="")
            info = api.status(job.id, args.address, args.store)
            print(f"job {job.id}: {st}" + (f" ({info['message']})" if info["message"] else ""))
            return 0 if st == "SUCCEEDED" else 1
    except J.JobsError as e:
        raise ConfigError(str(e)) from None
    return 0
