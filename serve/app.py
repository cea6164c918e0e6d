"""The Serve application builder: the Ensemble bound into the Student ingress.

`build_app(args)` is the import path for `serve deploy serve/config.yaml`; `make_app(args, options)`
builds it with per-deployment options in Python; `app_from_config(path)` builds the same app with
the YAML's per-deployment options applied in Python (used by `flowers serve`,
`python -m jobs.deploy`, the tests and the bench). How HTTP
reaches the Student replicas (HAProxy or Ray's Python proxy) is decided when Ray starts:
see serve/ingress_env.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from flowers.config import ServeAppConfig
from flowers.registry.uris import ModelRef, TrackingTarget
from flowers.runtime import worker_runtime_env
from serve import config as serve_config
from serve import web
from serve.deployments import Ensemble, Student
from serve.explainer import Explainer
from serve.follower import Follower
from serve.gate import with_version

DEFAULT_ACTOR_OPTIONS = {"Ensemble": {"num_cpus": 1}, "Student": {"num_cpus": 1},
                         # Grad-CAM on request, one at a time: reserves no CPU unless the config says so
                         "Explainer": {"num_cpus": 0},
                         # the registry poller: a thread that sleeps between polls
                         "Follower": {"num_cpus": 0}}


def with_runtime_env(opts: dict[str, Any]) -> dict[str, Any]:
    """Give replicas the fast-allocator environment, keeping any env vars the options set."""
    opts = dict(opts)
    actor = dict(opts.get("ray_actor_options") or {})
    renv = dict(actor.get("runtime_env") or {})
    renv["env_vars"] = {**worker_runtime_env()["env_vars"], **(renv.get("env_vars") or {})}
    actor["runtime_env"] = renv
    opts["ray_actor_options"] = actor
    return opts


def _versioned(dep: serve.Deployment, opts: dict[str, Any], init_args: tuple) -> serve.Deployment:
    return with_version(dep, opts, serve_config.code_version(dep.name, init_args))


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application: `serve deploy` imports this with the config's `args:` block
    (Serve applies the config's per-deployment options itself).

    Serve accepts a builder of exactly one parameter; callers that build the app in Python with
    per-deployment options use `make_app`.
    """
    return make_app(args)


def make_app(args: dict[str, Any] | None = None,
             deployment_options: dict[str, dict[str, Any]] | None = None) -> serve.Application:
    """The app with `deployment_options`: a deployment name (Ensemble, Student, Explainer, Follower) →
    `.options()` keyword arguments. Both model URIs are resolved here (the edge, when `serve deploy`
    imports this); `app_from_config` takes refs resolved earlier."""
    a = serve_config.app_config(args)
    return _build(a, _options(deployment_options), *serve_config.edge_refs(a))


def _options(deployment_options: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    opts = {name: {"ray_actor_options": dict(DEFAULT_ACTOR_OPTIONS[name])} for name in DEFAULT_ACTOR_OPTIONS}
    for name, o in (deployment_options or {}).items():
        if name not in opts:
            raise ValueError(f"unknown deployment '{name}' in options; known: {sorted(opts)}")
        opts[name].update(o)
    return {n: with_runtime_env(o) for n, o in opts.items()}


def _build(a: ServeAppConfig, opts: dict[str, dict[str, Any]], refs: dict[str, ModelRef],
           target: TrackingTarget | None) -> serve.Application:
    """Bind the four deployments; replicas get the resolved refs, never a URI to resolve."""
    fol_args = (refs, target, a.follow, a.follow_interval_s)
    fol = _versioned(Follower, opts["Follower"], fol_args).bind(*fol_args)
    # the Follower's handle is not part of a model deployment's version (only the refs are)
    ens = _versioned(Ensemble, opts["Ensemble"], (refs["ensemble"], a.uncertainty_threshold)).bind(
        refs["ensemble"], fol, a.uncertainty_threshold)
    exp_args = (refs["ensemble"], refs["student"])
    exp = _versioned(Explainer, opts["Explainer"], exp_args).bind(*exp_args)
    # the handles are not part of the Student's version: a new ensemble URI rolls only the Ensemble
    # (and the Explainer); the static files of the page are (the Student serves them)
    stu_args = serve_config.to_args(a)
    return _versioned(Student, opts["Student"], (refs["student"], stu_args, web.static_digest())).bind(
        refs["student"], ens, stu_args, exp, fol)


@dataclass
class ServeSpec:
    """What a Serve config describes, ready for `serve.start` + `serve.run`."""

    name: str
    route_prefix: str
    http_options: dict[str, Any]
    args: ServeAppConfig
    deployment_options: dict[str, dict[str, Any]]
    refs: dict[str, ModelRef] | None = None  # resolved by the caller (serve/run.py); None: on first use
    _app: serve.Application | None = field(default=None, repr=False)

    @property
    def app(self) -> serve.Application:
        """The bound app; the model URIs are resolved now unless the caller resolved them already."""
        if self._app is None:
            refs, target = (self.refs, next((r.tracking for r in self.refs.values() if r.tracking), None)) \
                if self.refs is not None else serve_config.edge_refs(self.args)
            self._app = _build(self.args, _options(self.deployment_options), refs, target)
        return self._app

    def required_cpus(self) -> float:
        """CPUs the minimum replica counts ask for (a local Ray must offer at least this)."""
        total = 0.0
        for name, default in DEFAULT_ACTOR_OPTIONS.items():
            o = self.deployment_options.get(name, {})
            auto = o.get("autoscaling_config") or {}
            n = o.get("num_replicas", auto.get("min_replicas", 1))
            total += float((o.get("ray_actor_options") or default).get("num_cpus", default["num_cpus"])) * max(1, int(n))
        return total


    def required_gpus(self) -> float:
        """GPUs the minimum replica counts ask for."""
        total = 0.0
        for name in DEFAULT_ACTOR_OPTIONS:
            o = self.deployment_options.get(name, {})
            auto = o.get("autoscaling_config") or {}
            n = o.get("num_replicas", auto.get("min_replicas", 1))
            total += float((o.get("ray_actor_options") or {}).get("num_gpus") or 0) * max(1, int(n))
        return total


def app_from_config(path: str | Path = serve_config.DEFAULT_CONFIG, overrides: dict[str, Any] | None = None,
                    deployment_overrides: dict[str, dict[str, Any]] | None = None,
                    refs: dict[str, ModelRef] | None = None) -> ServeSpec:
    """Build the app as `serve deploy` would, from the YAML, with `args` overrides (None: keep)."""
    f = serve_config.read(path)
    args = {**f.args, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    dep_opts = {name: dict(o) for name, o in f.deployments.items()}
    for name, o in (deployment_overrides or {}).items():
        dep_opts.setdefault(name, {}).update(o)
    for o in dep_opts.values():  # Serve refuses both; a fixed count overrides autoscaling
        if "num_replicas" in o and o.get("autoscaling_config"):
            o.pop("autoscaling_config")
    _options(dep_opts)  # an unknown deployment name fails here, before Ray starts
    return ServeSpec(f.name, f.route_prefix, f.http_options, serve_config.app_config(args), dep_opts, refs)
