"""`flowers` command line: train, evaluate and manage data; later stages add their commands.

Every subcommand lives in `flowers/cli/commands/<name>.py` with `register(subparsers)`.
Errors a user can fix print one line and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from flowers.cli.commands import COMMAND_MODULES
from flowers.errors import user_errors

DESCRIPTION = """\
flowers: fine-grained Oxford Flowers-102 classification, from research to production.

The story, one command per step:
  make run / flowers study      L1, the L2 ablation grid and L3 as parallel Ray Tune trials, then
                                the L4 ensemble and the L5 INT8 student; all tracked in MLflow
  flowers ui                    browse runs, plots and registered models (models:/flowers-l1@champion, ...)
  flowers report                the study's results next to the seed's figures (Markdown + PNGs)
  flowers serve                 ensemble and student endpoints side by side (Ray Serve, HTTP)
  flowers score DIR --model U   batch-score image folders to Parquet (Ray Data)
  flowers submit study|score|deploy --address URL   queue any of it on a Ray cluster (Ray Jobs)

One level at a time:
  L1  ResNet-50 transfer baseline          flowers train -c configs/level1.yaml
  L2  augmentation/regularization recipe   flowers train -c configs/level2.yaml
  L3  attention pooling + Grad-CAM         flowers train -c configs/level3.yaml
  L4  soft-voting ensemble + diversity     flowers ensemble --members URI URI URI --out DIR
  L5  distilled INT8 student               flowers distill -c configs/level5.yaml

Add `--profile cpu` for small-machine settings (offline-pretrained EfficientNet-Lite0,
smaller images, few epochs) and `--set key=value` to change any config value.
Data comes from data.root, $FLOWERS_DATA, or `flowers data download`.
"""

EPILOG = "Run `flowers COMMAND --help` for each command's options."


def version_string() -> str:
    """`flowers 0.1.0`, plus the git commit when the package runs from a checkout (editable install)."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    try:
        text = f"flowers {version('flowers')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        text = "flowers (not installed)"
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            rev = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=10"],
                                 capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            rev = ""
        if rev:
            text += f" (git {rev}, {root})"
    return text


class _VersionAction(argparse.Action):
    """Like argparse's "version" action, but computes the string (a git call) only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_string())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowers", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action=_VersionAction, help="print the version (and git commit) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"flowers.cli.commands.{name}").register(sub)
    return parser


def _maybe_reexec(argv: list[str]) -> None:
    """Restart once with the fast-allocator environment: malloc reads it only at start-up."""
    from flowers.runtime import allocator_active, allocator_env

    if os.environ.get("FLOWERS_REEXEC") or allocator_active():
        return
    env = {**os.environ, **allocator_env(), "FLOWERS_REEXEC": "1"}
    try:
        os.execve(sys.executable, [sys.executable, "-m", "flowers.cli.main", *argv], env)
    except OSError:  # pragma: no cover - keep going with the default allocator
        pass


def main(argv: list[str] | None = None, allow_reexec: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `flowers submit study --address URL -- --profile x`: argparse cannot put flags between a
    # `nargs="*"` positional and `--`, so what follows `--` is handed to the command as is
    passthrough: list[str] | None = None
    own = argv
    if "--" in argv:
        cut = argv.index("--")
        own, passthrough = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(own)
    if passthrough is not None:
        if not hasattr(args, "args"):
            parser.error(f"'--' passes arguments to a job; `flowers {args.command or ''}` takes none")
        args.args = [*args.args, *passthrough]
    if not args.command:
        parser.print_help()
        return 0
    if allow_reexec and getattr(args, "heavy", False):
        _maybe_reexec(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except user_errors() as e:
        if getattr(args, "json", False):  # scripts read stdout: keep it valid JSON on errors too
            import json

            print(json.dumps({"error": str(e)}))
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `flowers data verify | head`
        return 0


def entry() -> None:
    """Console-script entry: heavy commands restart once with the fast allocator."""
    sys.exit(main(allow_reexec=True))


if __name__ == "__main__":
    sys.exit(main())
