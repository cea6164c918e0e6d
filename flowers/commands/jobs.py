"""`flowers jobs list|status|logs|stop`: the Ray job queue (`jobs.client`)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("jobs", help="show and control the Ray job queue: list | status ID | logs ID | stop ID")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", help="Ray dashboard/Jobs address (default $RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.set_defaults(func=run)


def run(args) -> int:
    from flowers.config import ConfigError
    from jobs import client as J

    try:
        if args.action == "list":
            for j in J.list_jobs(args.address):
                print(f"{j['submission_id']}\t{j['status']}\t{j['entrypoint']}")
            return 0
        if not args.job_id:
            raise ConfigError(f"flowers jobs {args.action}: give a job id (see `flowers jobs list`)")
        if args.action == "status":
            print(J.status(args.job_id, args.address))
        elif args.action == "logs":
            print(J.logs(args.job_id, args.address), end="")
        else:
            print("stopped" if J.stop(args.job_id, args.address) else "not running")
    except J.JobsError as e:
        raise ConfigError(str(e)) from None
    return 0
