"""Ray entry point that deploys the flowers Serve app and exits: `python -m jobs.deploy`.

    ray job submit --working-dir . -- python -m jobs.deploy --config serve/config.yaml

Same options as `flowers serve`, but aliases are pinned by default (models:/name@champion →
models:/name/<version>): after moving the alias, run this again and Serve rolls the
replicas onto the new model (max_surge_percent in the config starts the new replica before
the old one drains, so no request is dropped). The app keeps running after the job ends.
"""
from __future__ import annotations

import argparse
import sys

from jobs import entry


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`flowers serve`'s options, pinning aliases by default."""
    from flowers.commands.serve import add_arguments as add_serve_arguments

    add_serve_arguments(p)
    p.set_defaults(pin=True)


def run(args: argparse.Namespace) -> int:
    from flowers.commands.serve import deploy

    return deploy(args, block=False)


def main(argv: list[str] | None = None) -> int:
    return entry.main("python -m jobs.deploy", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
