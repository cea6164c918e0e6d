"""What every `python -m jobs.X` shares: parse, configure logging, run, one-line user errors."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable


def main(prog: str, doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
         run: Callable[[argparse.Namespace], int], argv: list[str] | None = None) -> int:
    """Parse `argv` with `add_arguments`, then `run(args)`; errors a user can fix print one line, exit 2."""
    from flowers.errors import user_errors

    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return int(run(args) or 0)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
