"""Ray entry point for batch scoring: `python -m jobs.score DIR... --model URI --out PATH`.

Runs locally or through `ray job submit -- python -m jobs.score ...`; same options as
`flowers score`. Folders, output rules and the model are checked before Ray starts;
then `ray.init(address=...)` connects with the workers' allocator env and Ray Data
scores the images (flowers.scoring.score_folders).
"""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from flowers.cli import _user_errors
    from flowers.commands.score import add_arguments, run

    parser = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return run(args)  # ray.init(address=args.address, runtime_env=worker_runtime_env()) happens in there
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
