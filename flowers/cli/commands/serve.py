"""`flowers serve`: the ensemble and student endpoints on a local Ray Serve (see docs/serving.md).

A thin adapter over serve/run.py: it reads serve/config.yaml, starts (or joins) Ray and Serve,
runs the app, prints the URLs and a curl example, and blocks until Ctrl-C.
`python -m jobs.deploy` shares these options but deploys and exits.
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from serve.options import add_arguments

    p = sub.add_parser("serve", help="serve the ensemble and student over HTTP (local Ray Serve; Ctrl-C stops)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run, heavy=True)


def run(args: argparse.Namespace) -> int:
    from serve.options import settings
    from serve.run import deploy

    return deploy(settings(args), block=True)
