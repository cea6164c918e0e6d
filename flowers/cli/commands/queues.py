"""`flowers queues [list|dispatch]`: the cluster's queues with their limits and counts; the dispatcher."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("queues", help="job queues: list (limits, running, waiting) | dispatch (run the dispatcher)")
    p.add_argument("action", nargs="?", default="list", choices=["list", "dispatch"])
    p.add_argument("--address", help="Ray dashboard/Jobs address (default $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    p.add_argument("--store", help="queue store URL (default $FLOWERS_QUEUE_URL, else SQLite per cluster)")
    p.add_argument("--queues", help="dispatch: queues YAML (name → max_running, priority), written into the store")
    p.add_argument("--poll", type=float, default=1.0, help="dispatch: seconds between passes")
    p.add_argument("--json", action="store_true", help="list as JSON (errors too: {\"error\": ...})")
    p.set_defaults(func=run, exit_if_taken=False)


def run(args) -> int:
    from flowers.config import ConfigError
    from flowers.errors import user_errors
    from jobs import client as J
    from jobs.queue import api, dispatcher

    if args.action == "dispatch":
        return dispatcher.run(args)
    try:
        rows = api.queue_summary(args.address, args.store)
    except (J.JobsError, *user_errors()) as e:
        if args.json:
            print(json.dumps({"error": str(e)}))
            return 2
        raise ConfigError(str(e)) from None
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'QUEUE':<16}{'MAX':>5}{'PRI':>6}{'RUNNING':>9}{'WAITING':>9}")
    for r in rows:
        print(f"{r['queue']:<16}{r['max_running']:>5}{r['priority']:>6}{r['running']:>9}{r['waiting']:>9}")
    return 0
