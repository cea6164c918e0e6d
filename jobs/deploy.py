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
from serve.options import add_arguments, settings


def run(args: argparse.Namespace) -> int:
    from serve.run import deploy

    return deploy(settings(args), block=False)


def main(argv: list[str] | None = None) -> int:
    return entry.main("python -m jobs.deploy", __doc__, lambda p: add_arguments(p, pin=True), run, argv)


if __name__ == "__main__":
    sys.exit(main())
