"""`python -m jobs.localcluster reap PID STATE_DIR`: stop the local cluster once process PID exits."""
from __future__ import annotations

import argparse
import logging
import sys

from jobs.localcluster.cluster import reap_when_gone


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and wait (the tests' reaper runs this in a session of its own)."""
    p = argparse.ArgumentParser(prog="python -m jobs.localcluster", description="stop a test cluster once PID exits")
    p.add_argument("action", choices=["reap"])
    p.add_argument("pid", type=int)
    p.add_argument("state_dir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reap_when_gone(args.pid, args.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
