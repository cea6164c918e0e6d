"""Ray entry point that deploys the flowers Serve app and exits: `python -m jobs.deploy`.

    ray job submit --working-dir . -- python -m jobs.deploy --config serve/config.yaml

Same options as `flowers serve`, but aliases are pinned by default (models:/name@champion →
models:/name/<version>): after moving the alias, run this again and Serve rolls the
replicas onto the new model (max_surge_percent in the config starts the new replica before
the old one drains, so no request is dropped). The app keeps running after the job ends.
"""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from flowers.cli import _user_errors
    from flowers.commands.serve import add_arguments, deploy

    parser = argparse.ArgumentParser(prog="python -m jobs.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(pin=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return deploy(args, block=False)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
