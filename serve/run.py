"""Start (or join) Ray and Serve and run the app: what `flowers serve` and `python -m jobs.deploy` do.

`deploy(settings, block=True)` serves until Ctrl-C/SIGTERM on an embedded Ray (or a cluster's);
`block=False` deploys and returns, leaving the app running on the cluster. Model URIs are
checked before Ray starts, so a wrong path or alias is one line, not a replica retry loop.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time

from flowers.config import ConfigError, ServeAppConfig, ServeConfig
from serve import config as serve_config
from serve.http import curl_examples
from raylink.ports import pick_port, port_free
from serve.ingress_env import LOCAL_DRAIN_S, ingress_env, resolve_proxy

# HAProxy's side ports and the fallback proxy's: Ray's defaults unless taken or set by the user
SIDE_PORTS = {"fallback": ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", 8500),
              "fallback_grpc": ("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", 9500),
              "stats": ("RAY_SERVE_HAPROXY_STATS_PORT", 8404), "metrics": ("RAY_SERVE_HAPROXY_METRICS_PORT", 9101)}


def model_uris(settings: ServeConfig, file_args: dict) -> dict[str, str]:
    """The two model URIs: the settings', else the config's `args:`, else the defaults."""
    d = ServeAppConfig()
    return {"ensemble_uri": settings.ensemble_uri or file_args.get("ensemble_uri") or d.ensemble_uri,
            "student_uri": settings.student_uri or file_args.get("student_uri") or d.student_uri}


def deploy(settings: ServeConfig, block: bool) -> int:
    """Build the app from the config, start Ray + Serve, run it; block until Ctrl-C if asked."""
    path = settings.config or serve_config.DEFAULT_CONFIG
    f = serve_config.read(path)
    tracking = settings.tracking_uri or f.args.get("tracking_uri")
    uris = model_uris(settings, f.args)
    # no tracking_uri: $MLFLOW_TRACKING_URI, else the embedded store, read once by `edge_refs` below
    overrides = {**uris, "tracking_uri": tracking, "follow": settings.follow}
    # the edge: each URI resolved once, here, to a pinned ModelRef (one line on a wrong path or alias, before
    # Ray starts); replicas load exactly these versions and never ask the registry (`--pin` is therefore always
    # in effect); the app's Follower resolves the later ones when an alias moves (serve/follower.py)
    refs, _ = serve_config.edge_refs(serve_config.app_config({**f.args, **{k: v for k, v in overrides.items()
                                                                           if v is not None}}))

    import ray
    from ray import serve

    from raylink.connect import connect
    from serve.app import app_from_config

    def build(gpus: float | None):
        try:
            return app_from_config(path, overrides, gpu_overrides(f, gpus), refs)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None

    spec = build(settings.gpus)
    http = {**spec.http_options, **{k: v for k, v in (("host", settings.host), ("port", settings.port)) if v is not None}}
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)

    address = settings.address or os.environ.get("RAY_ADDRESS")
    if address:
        front = "the cluster's (set when its Ray started; see docs/serving.md)"
    else:
        front = use_proxy(settings.proxy, spec.args.max_body_bytes)
        if not block:
            print("note: no --address/RAY_ADDRESS: deploying on a temporary local Ray that stops when this "
                  "process exits (use `flowers serve` to serve locally)", file=sys.stderr)
    # embedded Ray: offer at least what the minimum replicas ask for, even on a 2-core laptop
    # (torch threads follow each replica's num_cpus, so this oversubscribes nothing)
    connect(address, num_cpus=max(os.cpu_count() or 1, math.ceil(spec.required_cpus())))
    if spec.required_gpus() and not ray.cluster_resources().get("GPU"):
        # replicas that ask for a GPU the cluster lacks would wait for one forever
        print(f"note: the config asks for {spec.required_gpus():g} GPU(s) but the cluster has none: serving on CPU",
              file=sys.stderr)
        spec = build(0)
    if block:  # after ray.init, which installs a SIGTERM handler of its own that skips the message
        def _stop(signum, frame):  # SIGTERM (systemd, kill), and SIGINT even when started with `&`
            raise KeyboardInterrupt

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _stop)
    try:
        start = {"proxy_location": f.proxy_location} if f.proxy_location else {}
        serve.start(http_options={"host": http["host"], "port": int(http["port"])}, **start)
        try:
            serve.run(spec.app, name=spec.name, route_prefix=spec.route_prefix)
        except Exception as e:  # Serve reports replica failures as RuntimeError with a long log
            print(f"error: deploying '{spec.name}' failed: {str(e).strip().splitlines()[-1][:500]}", file=sys.stderr)
            return 1
        base = f"http://{http['host']}:{http['port']}{spec.route_prefix.rstrip('/')}"
        print(f"flowers serving '{spec.name}' at {base}")
        for role, ref in refs.items():
            print(f"  {role + ':':9} {ref.label} ({ref.pinned})")
        follow = f"yes, polled every {spec.args.follow_interval_s:g} s" if spec.args.follow else "no (--no-follow)"
        print(f"  following the registry: {follow}\n  HTTP front: {front}")
        print(f"  POST {base}/v1/predict/ensemble   POST {base}/v1/predict/student   POST {base}/v1/compare")
        print(f"  GET  {base}/v1/models   GET  {base}/healthz")
        print("try:\n" + curl_examples(base))
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


def gpu_overrides(f: serve_config.ServeFile, gpus: float | None) -> dict[str, dict]:
    """Per model deployment: the config's ray_actor_options with num_gpus set (None: the config's own)."""
    if gpus is None:
        return {}
    if gpus < 0:
        raise ConfigError(f"--gpus must be >= 0, got {gpus:g}")
    return {name: {"ray_actor_options": {**(f.deployments.get(name, {}).get("ray_actor_options") or {}),
                                         "num_gpus": gpus}} for name in ("Ensemble", "Student")}


def use_proxy(requested: str, max_body_bytes: int) -> str:
    """Set the environment the embedded Ray starts with for this HTTP front; describe it."""
    proxy, warning = resolve_proxy(requested)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    ports = {key: pick_port() for key, (var, port) in SIDE_PORTS.items()
             if var not in os.environ and not port_free(port)}  # e.g. a second `flowers serve` on this machine
    os.environ.update(ingress_env(proxy, max_body_bytes, ports if proxy == "haproxy" else None, LOCAL_DRAIN_S))
    if proxy == "serve":
        return "Ray Serve's Python proxy"
    fallback = os.environ.get("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "8500")
    return f"HAProxy → Student replicas (Ray's Python proxy as fallback on port {fallback})"
