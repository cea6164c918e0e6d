"""`flowers serve`: the ensemble and student endpoints on a local Ray Serve (see docs/serving.md).

A thin adapter: it reads serve/config.yaml, starts (or joins) Ray and Serve, runs the app
from serve/app.py, prints the URLs and a curl example, and blocks until Ctrl-C.
`python -m jobs.deploy` shares these options but deploys and exits.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # serve/ lives next to the flowers package


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `flowers serve` and `python -m jobs.deploy`."""
    p.add_argument("--config", default=str(REPO / "serve" / "config.yaml"),
                   help="Serve config YAML (default serve/config.yaml)")
    p.add_argument("--ensemble", help="ensemble model URI (default from the config: models:/flowers-ensemble@champion)")
    p.add_argument("--student", help="student model URI (default from the config: models:/flowers-student@champion)")
    p.add_argument("--host", help="HTTP host (default from the config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default from the config: 8000)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ URIs (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--address", default=None,
                   help="Ray address (default: RAY_ADDRESS, else a new embedded local Ray)")
    p.add_argument("--proxy", choices=("haproxy", "serve"), default="haproxy",
                   help="HTTP front of an embedded Ray: HAProxy straight to the ingress replicas (default; "
                        "measured 6 ms less per request on 2 cores) or Ray Serve's Python proxy. A cluster's front is set "
                        "when its Ray starts (docs/serving.md)")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=False,
                   help="resolve models:/name@alias to its version before deploying, so a redeploy "
                        "after an alias move rolls the replicas onto the new model")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the ensemble and student over HTTP (local Ray Serve; Ctrl-C stops)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run, heavy=True)


def _import_serve_app():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import serve.app as app_mod
    except ModuleNotFoundError as e:
        raise FileNotFoundError(f"cannot import serve/app.py from {REPO} ({e}); run from a source checkout") from None
    return app_mod


def deploy(args: argparse.Namespace, block: bool) -> int:
    """Build the app from the config, start Ray + Serve, run it; block until Ctrl-C if asked."""
    from flowers.config import ConfigError
    from flowers.predict import export_model_store, resolve_uri
    from flowers.runtime import worker_runtime_env

    app_mod = _import_serve_app()
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri  # driver-side checks and pinning
    try:
        raw = app_mod.load_serve_config(args.config)["applications"][0].get("args") or {}
    except ValueError as e:
        raise ConfigError(str(e)) from None
    uris = {"ensemble_uri": args.ensemble or raw.get("ensemble_uri"), "student_uri": args.student or raw.get("student_uri")}
    export_model_store([u for u in uris.values() if u])
    if args.pin:
        uris = {k: app_mod.pin_alias(v) for k, v in uris.items()}
    for uri in uris.values():  # fail here with one line, not in a replica constructor retry loop
        resolve_uri(uri)
    overrides = {**uris, "tracking_uri": args.tracking_uri or raw.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")}
    try:
        spec = app_mod.app_from_config(args.config, overrides)
    except ValueError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    http = {**spec.http_options, **{k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}}
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)

    import ray
    from ray import serve

    renv = worker_runtime_env()
    # workers import serve.app by module path; the driver's cwd may not be the checkout
    renv["env_vars"]["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    address = args.address or os.environ.get("RAY_ADDRESS")
    init_kw: dict = {"runtime_env": renv, "configure_logging": False}
    if not address:
        # embedded Ray: offer at least what the minimum replicas ask for, even on a 2-core laptop
        # (torch threads follow each replica's num_cpus, so this oversubscribes nothing)
        init_kw.update(num_cpus=max(os.cpu_count() or 1, math.ceil(spec.required_cpus())), include_dashboard=False)
    front = "the cluster's (set when its Ray started; see docs/serving.md)"
    if not address:
        front = _use_proxy(args.proxy, spec.args.max_body_bytes)
    if not block and not address:
        print("note: no --address/RAY_ADDRESS: deploying on a temporary local Ray that stops when this "
              "process exits (use `flowers serve` to serve locally)", file=sys.stderr)
    if block:
        def _stop(signum, frame):  # SIGTERM (systemd, kill), and SIGINT even when started with `&`
            raise KeyboardInterrupt

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _stop)
    ray.init(address=address, **init_kw)
    try:
        serve.start(http_options={"host": http["host"], "port": int(http["port"])})
        try:
            serve.run(spec.app, name=spec.name, route_prefix=spec.route_prefix)
        except Exception as e:  # Serve reports replica failures as RuntimeError with a long log
            print(f"error: deploying '{spec.name}' failed: {str(e).strip().splitlines()[-1][:500]}", file=sys.stderr)
            return 1
        base = f"http://{http['host']}:{http['port']}{spec.route_prefix.rstrip('/')}"
        print(f"flowers serving '{spec.name}' at {base}")
        print(f"  ensemble: {spec.args.ensemble_uri}\n  student:  {spec.args.student_uri}\n  HTTP front: {front}")
        print(f"  POST {base}/v1/predict/ensemble   POST {base}/v1/predict/student   POST {base}/v1/compare")
        print(f"  GET  {base}/v1/models   GET  {base}/healthz")
        print("try:\n" + app_mod.curl_examples(base))
        if not block:
            return 0
        print("Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping...", file=sys.stderr)
        return 0
    finally:
        if block:  # a detached deploy (jobs.deploy) leaves the app running on the cluster
            serve.shutdown()
            ray.shutdown()


def _use_proxy(requested: str, max_body_bytes: int) -> str:
    """Set the environment the embedded Ray starts with for this HTTP front; describe it."""
    from serve.ingress_env import LOCAL_DRAIN_S, ingress_env, pick_port, port_free, resolve_proxy

    proxy, warning = resolve_proxy(requested)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    # HAProxy's side ports and the fallback proxy's keep Ray's defaults unless taken (a second
    # `flowers serve` on this machine) or set by the user
    defaults = {"fallback": ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", 8500),
                "fallback_grpc": ("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", 9500),
                "stats": ("RAY_SERVE_HAPROXY_STATS_PORT", 8404), "metrics": ("RAY_SERVE_HAPROXY_METRICS_PORT", 9101)}
    ports = {}
    for key, (var, port) in defaults.items():
        if var not in os.environ and not port_free(port):
            ports[key] = pick_port()
    os.environ.update(ingress_env(proxy, max_body_bytes, ports if proxy == "haproxy" else None, LOCAL_DRAIN_S))
    if proxy == "serve":
        return "Ray Serve's Python proxy"
    fallback = os.environ.get("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "8500")
    return f"HAProxy → Student replicas (Ray's Python proxy as fallback on port {fallback})"


def run(args: argparse.Namespace) -> int:
    return deploy(args, block=True)
