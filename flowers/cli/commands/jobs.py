"""`flowers jobs list|status|logs|stop`: the job queue and the Ray jobs behind it (`jobs.queue.api`)."""
from __future__ import annotations

import json
import sys
import time


def register(sub) -> None:
    p = sub.add_parser("jobs", help="show and control queued and running jobs: list | status ID | logs ID | stop ID")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", help="Ray dashboard/Jobs address (default $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS, "
                                     "else http://127.0.0.1:8265)")
    p.add_argument("--store", help="queue store URL (default $FLOWERS_QUEUE_URL, else SQLite per cluster)")
    p.add_argument("--json", action="store_true", help="list/status as JSON (errors too: {\"error\": ...})")
    p.add_argument("--follow", "-f", action="store_true", help="logs: keep printing until the job ends")
    p.set_defaults(func=run)


def _clock(t: float | None) -> str:
    return "-" if not t else time.strftime("%m-%d %H:%M:%S", time.localtime(t))


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def table(rows: list[dict]) -> str:
    """One line per job: id, queue, priority, place in line, state, start, duration, job, message."""
    head = ["ID", "QUEUE", "PRI", "POS", "STATE", "STARTED", "DURATION", "JOB", "MESSAGE"]
    body = [[r["id"], r["queue"], "-" if r["priority"] is None else str(r["priority"]),
             "-" if r["position"] is None else str(r["position"]), r["state"], _clock(r["started"]),
             _duration(r["duration_s"]), r["job"], (r["message"] or "").replace("\n", " ")[:120]] for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1]
                     for line in [head, *body]).rstrip() + "\n"


def run(args) -> int:
    from flowers.config import ConfigError
    from flowers.errors import user_errors
    from jobs import client as J

    try:
        return _run(args)
    except (J.JobsError, *user_errors()) as e:
        if args.json:
            print(json.dumps({"error": str(e)}))
            return 2
        raise ConfigError(str(e)) from None


def _run(args) -> int:
    from flowers.config import ConfigError
    from jobs.queue import api

    if args.action == "list":
        rows = api.list_all(args.address, args.store)
        print(json.dumps(rows, indent=1) if args.json else table(rows), end="\n" if args.json else "")
        return 0
    if not args.job_id:
        raise ConfigError(f"flowers jobs {args.action}: give a job id (see `flowers jobs list`)")
    if args.action == "status":
        info = api.status(args.job_id, args.address, args.store)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            print(info["state"] + (f": {info['message']}" if info["message"] else ""))
    elif args.action == "logs":
        if args.follow:
            for chunk in api.follow(args.job_id, args.address, args.store):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            print(api.logs(args.job_id, args.address, args.store), end="")
    else:
        print(api.stop(args.job_id, args.address, args.store))
    return 0
