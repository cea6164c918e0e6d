"""Command-line options of `flowers serve` and `python -m jobs.deploy`, and the settings they give.

No Ray, torch or FastAPI here: the `flowers` CLI builds every parser at start-up and stays fast.
"""
from __future__ import annotations

import argparse

from flowers.config import ServeConfig
from serve.ingress_env import PROXIES


def add_arguments(p: argparse.ArgumentParser, pin: bool = False) -> None:
    """The deploy options; `pin` is the default of --pin (jobs.deploy pins, `flowers serve` does not)."""
    p.add_argument("--config", help="Serve config YAML (default: serve/config.yaml; on a cluster: "
                                      "serve/config.cluster.yaml)")
    p.add_argument("--ensemble", help="ensemble model URI (default from the config: models:/flowers-ensemble@champion)")
    p.add_argument("--student", help="student model URI (default from the config: models:/flowers-student@champion)")
    p.add_argument("--host", help="HTTP host (default from the config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default from the config: 8000)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ URIs (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--address", default=None,
                   help="Ray address (default: RAY_ADDRESS, else a new embedded local Ray)")
    p.add_argument("--proxy", choices=PROXIES, default="haproxy",
                   help="HTTP front of an embedded Ray: HAProxy straight to the ingress replicas (default; "
                        "see docs/serving.md for what each costs) or Ray Serve's Python proxy. A cluster's "
                        "front is set when its Ray starts (docs/serving.md)")
    p.add_argument("--gpus", type=float, default=None, metavar="N",
                   help="GPUs per Ensemble and Student replica, e.g. 1 or 0.5 (default: the config's "
                        "ray_actor_options.num_gpus); a cluster without GPUs serves on CPU and says so")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=pin,
                   help="resolve models:/name@alias to its version before deploying, so a redeploy "
                        "after an alias move rolls the replicas onto the new model (replicas always get "
                        "the pinned version now; kept for scripts)")
    p.add_argument("--follow", action=argparse.BooleanOptionalAction, default=None,
                   help="follow the registry while serving (default: on, the config's args.follow): when "
                        "the alias a model was started with moves, or a canary/shadow is set, the running "
                        "app loads, warms up and switches with no failed request (docs/serving.md)")


def settings(args: argparse.Namespace) -> ServeConfig:
    """The parsed options as settings."""
    return ServeConfig(config=args.config, ensemble_uri=args.ensemble, student_uri=args.student, host=args.host,
                       port=args.port, tracking_uri=args.tracking_uri, address=args.address, proxy=args.proxy,
                       pin=args.pin, gpus=args.gpus, follow=args.follow)
