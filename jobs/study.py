"""The study as a Ray job.

    python -m jobs.study --config configs/study.yaml --profile study-cpu
    ray job submit --working-dir . -- python -m jobs.study --config configs/study.yaml
    flowers submit study -- --profile study-cpu        # same, with the runtime env filled in

Inside a Ray job RAY_ADDRESS is set, so the study joins that cluster.
"""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from flowers.cli import _user_errors
    from flowers.study import add_study_args, main_from_args

    p = argparse.ArgumentParser(prog="python -m jobs.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return main_from_args(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
