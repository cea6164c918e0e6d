"""Serve config YAMLs (serve/config.yaml): read, check, and derive deployment versions.

The same file serves `serve deploy serve/config.yaml` (Serve reads it) and `flowers serve` /
`python -m jobs.deploy` (read here, its options applied in Python by serve/app.py).
No Ray import: the CLI reads the config before Ray starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowers.config import ConfigError, ServeAppConfig, build

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
CLUSTER_CONFIG = Path(__file__).with_name("config.cluster.yaml")  # binds 0.0.0.0, ships the code, autoscales
MAX_TOP_K = 102  # Flowers-102 has 102 classes
# the files a replica runs: a change in any of them is new code for Serve (a rolling update)
CODE_FILES = ("app.py", "deployments.py", "explainer.py", "gate.py", "http.py", "metrics.py", "config.py",
              "schemas.py", "web.py", "follower.py", "versions.py")


@dataclass
class ServeFile:
    """The one application of a Serve config file, as `flowers serve` and `jobs.deploy` use it."""

    path: Path
    name: str = "flowers"
    route_prefix: str = "/"
    http_options: dict[str, Any] = field(default_factory=dict)
    proxy_location: str | None = None  # EveryNode | HeadOnly | Disabled; None: Serve's default
    args: dict[str, Any] = field(default_factory=dict)  # the `args:` block, unchecked
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → options


def read(path: str | Path = DEFAULT_CONFIG) -> ServeFile:
    """Read a Serve config; it must describe exactly one application."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"serve config not found: {path}")
    cfg = yaml.safe_load(path.read_text()) or {}
    apps = cfg.get("applications") or []
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected exactly one application, found {len(apps)}")
    app = apps[0]
    deployments = {}
    for d in app.get("deployments") or []:
        d = dict(d)
        deployments[d.pop("name")] = d
    return ServeFile(path, app.get("name", "flowers"), app.get("route_prefix", "/"),
                     dict(cfg.get("http_options") or {}), cfg.get("proxy_location"), dict(app.get("args") or {}),
                     deployments)


def app_config(args: dict[str, Any] | None) -> ServeAppConfig:
    """The app's `args:` block as typed settings, with its value ranges checked."""
    try:
        a = build(ServeAppConfig, dict(args or {}))
    except ConfigError as e:
        raise ConfigError(f"app args: {e}") from None
    if a.max_body_bytes <= 0 or not 1 <= a.default_top_k <= MAX_TOP_K:
        raise ConfigError(f"app args: max_body_bytes must be > 0 and default_top_k in 1..{MAX_TOP_K}, got "
                          f"max_body_bytes={a.max_body_bytes}, default_top_k={a.default_top_k}")
    return a


def edge_refs(a: ServeAppConfig) -> tuple[dict[str, Any], Any]:
    """Resolve both model URIs once (the edge): ({'ensemble': ModelRef, 'student': ModelRef}, the store).

    Replicas get the `ModelRef`s and never ask the registry. The store is the args' tracking_uri, else
    $MLFLOW_TRACKING_URI, else the embedded store (looked up only when a URI needs one)."""
    from flowers.registry.uris import is_mlflow_uri, resolve_ref, store_target

    uris = {"ensemble": a.ensemble_uri, "student": a.student_uri}
    target = store_target(a.tracking_uri) if any(is_mlflow_uri(u) for u in uris.values()) else None
    return {role: resolve_ref(u, target) for role, u in uris.items()}, target


def to_args(a: ServeAppConfig) -> dict[str, Any]:
    """Settings back to the plain dict a deployment constructor gets (Serve serialises it)."""
    return dataclasses.asdict(a)


def code_version(deployment: str, init_args: tuple) -> str:
    """Same code + same constructor arguments → same version.

    `serve deploy` derives versions from the config this way, so a redeploy that only changes
    `user_config` reconfigures live replicas. A new model URI (e.g. a pinned
    models:/name/<version> after an alias move) gives a new version → rolling update.
    """
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in CODE_FILES:
        h.update((here / name).read_bytes())
    h.update(json.dumps([deployment, init_args], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
