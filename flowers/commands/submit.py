"""`flowers submit study|tune|score|deploy`: queue an entry point as a Ray job (`jobs.client.submit`)."""
from __future__ import annotations


def register(sub) -> None:
    from jobs.options import ENTRYPOINTS

    p = sub.add_parser("submit", help="submit a Ray job: study | tune | score | deploy (python -m jobs.<name>)",
                       description="Everything after `--` goes to the entry point, e.g. "
                                   "`flowers submit study -- --profile study-cpu`. Token auth: RAY_AUTH_TOKEN or ~/.ray/auth_token.")
    p.add_argument("job", choices=ENTRYPOINTS)
    p.add_argument("args", nargs="*", help="arguments for the entry point (after --)")
    p.add_argument("--address", help="Ray dashboard/Jobs address (default $RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("--working-dir", default=".", help="folder uploaded as the job's working_dir (default .)")
    p.add_argument("--submission-id", help="job id (default: Ray picks one)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    p.add_argument("--python", default="python", help="python on the cluster nodes (default: python)")
    p.add_argument("--local-store", action="store_true",
                   help="study: track into this machine's .flowers/ (absolute path); only for a head on this machine")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its logs")
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    from pathlib import Path

    from flowers.config import ConfigError
    from jobs import client as J

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
    try:
        sid = J.submit(args.job, extra, args.address, args.working_dir, args.submission_id,
                       args.entrypoint_num_cpus, args.python)
        print(f"submitted {sid}: {J.entrypoint(args.job, extra, args.python)}")
        print(f"follow: flowers jobs logs {sid}   status: flowers jobs status {sid}")
        if args.wait:
            st = J.wait(sid, args.address, timeout_s=24 * 3600)
            print(J.logs(sid, args.address))
            print(f"job {sid}: {st}")
            return 0 if st == "SUCCEEDED" else 1
    except J.JobsError as e:
        raise ConfigError(str(e)) from None
    return 0
