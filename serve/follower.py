"""The Follower deployment: the app's one reader of the registry, and the rollout's referee.

    registry ──poll every follow_interval_s──► Follower (1 replica, no CPU reserved)
                                                 │  desired(route): serving / target / canary / shadow ModelRefs
    Student, Ensemble replicas ──every 1 s──────►│  report(route, replica, loaded, failed, shadow stats)

Why this shape (docs/serving.md, "Following the registry"): a poll is the safety net MLflow's
webhooks leave anyway (best-effort, SQL stores only), and one poller per app keeps the registry
load at one `get_registered_model` per route per interval whatever the replica count. The
Follower is the edge: it resolves each new version once (`resolve_ref`) and hands replicas the
`ModelRef`; replicas never talk to the registry. A route's version changes in two phases:
every live replica of the route loads and warms the target beside the serving version
(`target`), and only when all have reported it ready does the Follower make it `serving`; the
replicas switch on their next poll and drop the old model once its in-flight batches finish. A
replica that fails to load or warm the target up reports why: the target is abandoned (the old
version keeps serving) and GET /v1/models and the log say which version failed and why. The
failed version is not retried until the alias moves again.

The Follower runs its poll in a thread (MLflow's client is blocking); every method replicas call
is cheap and reads state under a lock.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from flowers.registry import lifecycle
from flowers.registry.uris import ModelRef, TrackingTarget, client, resolve_ref

log = logging.getLogger(__name__)

REPLICA_POLL_S = 1.0  # how often model replicas ask for the desired state
LIVE_S = 10.0  # a replica silent this long no longer counts for the rollout


@dataclass
class Route:
    """One model route's rollout state, as the Follower keeps it."""

    serving: ModelRef
    follow: str | None  # the alias followed (None: a pinned version or a file: nothing to follow)
    target: ModelRef | None = None
    target_since: float | None = None
    canary: ModelRef | None = None
    canary_percent: float = 0.0
    shadow: ModelRef | None = None
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)  # version → {reason, at, replica}
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)  # replica id → its last report
    last_switch: dict[str, Any] | None = None  # {from, to, seen_at, switched_at, seconds}
    generation: int = 0
    seen: dict[str, str | None] = field(default_factory=dict)  # what the registry named at the last poll

    def live(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        return {r: rep for r, rep in self.replicas.items() if now - rep["at"] < LIVE_S}


def _key(ref: ModelRef | None) -> str | None:
    return ref.pinned if ref is not None else None


def _version(ref: ModelRef | None) -> str | None:
    return None if ref is None else (ref.version or ref.pinned)


@serve.deployment(name="Follower", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class Follower:
    """Polls the registry for the routes' aliases, canary and shadow; referees each route's rollout."""

    def __init__(self, refs: dict[str, ModelRef], tracking: TrackingTarget | None, follow: bool = True,
                 interval_s: float = 2.0) -> None:
        self.lock = threading.Lock()
        self.routes = {role: Route(ref, ref.alias if (follow and ref.alias and ref.name) else None)
                       for role, ref in refs.items()}
        self.tracking, self.interval_s = tracking, float(interval_s)
        self.polls, self.poll_error = 0, None
        self.resolved: dict[tuple[str, str], ModelRef] = {}  # (name, version) → ref: each version resolved once
        if tracking is not None and any(r.follow for r in self.routes.values()):
            threading.Thread(target=self._loop, name="registry-follower", daemon=True).start()
        log.info("follower: %s", {role: (r.serving.label, r.follow) for role, r in self.routes.items()})

    # ------------------------------------------------------------------ the registry side

    def _loop(self) -> None:
        c = client(self.tracking.tracking_uri)
        while True:
            try:
                self.poll(c)
                self.poll_error = None
            except Exception as e:  # a registry outage: keep serving what runs, say so, retry
                if self.poll_error is None:
                    log.warning("follower: registry poll failed: %s", str(e).splitlines()[0][:300])
                self.poll_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            time.sleep(self.interval_s)

    def _ref(self, name: str, version: str | None, alias: str) -> ModelRef | None:
        if version is None:
            return None
        if (name, version) not in self.resolved:
            self.resolved[(name, version)] = resolve_ref(f"models:/{name}/{version}", self.tracking)
        return dataclasses.replace(self.resolved[(name, version)], alias=alias)

    def poll(self, c) -> None:
        """One look at the registry: move each followed route's target, canary and shadow."""
        self.polls += 1
        for role, route in list(self.routes.items()):
            if not route.follow:
                continue
            intent = lifecycle.read_intent(c, route.serving.name, route.follow)
            updates: dict[str, Any] = {}
            for what, version, alias in (("target", intent.followed, route.follow),
                                         ("canary", intent.canary, lifecycle.CANARY),
                                         ("shadow", intent.shadow, lifecycle.SHADOW)):
                try:
                    updates[what] = self._ref(route.serving.name, version, alias)
                except Exception as e:  # unresolvable (deleted artifacts, bad manifest): record, don't roll
                    updates[what] = None
                    self._fail(route, version, f"cannot resolve: {str(e).splitlines()[0][:300]}", "follower")
            with self.lock:
                self._apply(role, route, updates, intent.canary_percent)

    def _apply(self, role: str, route: Route, u: dict[str, Any], percent: float) -> None:
        for what, ref in u.items():  # an alias that moves onto a version that failed before: try it again
            if ref is not None and route.seen.get(what) not in (None, ref.version):
                route.failed.pop(ref.version, None)
            route.seen[what] = ref.version if ref is not None else None
        target = u["target"]
        if target is not None and (_key(target) == _key(route.serving) or target.version in route.failed):
            target = None
        if _key(target) != _key(route.target):
            if route.target is not None:
                log.info("follower: %s rollout to %s abandoned (the alias moved)", role, route.target.label)
            if target is not None:
                log.info("follower: %s: %s moved to %s; rolling out (serving %s)", role, route.follow,
                         target.version, route.serving.version)
            route.target, route.target_since = target, (time.time() if target is not None else None)
            route.generation += 1
        canary = u["canary"] if u["canary"] is not None and u["canary"].version not in route.failed else None
        shadow = u["shadow"] if u["shadow"] is not None and u["shadow"].version not in route.failed else None
        if (_key(canary), percent if canary else 0.0, _key(shadow)) != \
                (_key(route.canary), route.canary_percent, _key(route.shadow)):
            log.info("follower: %s canary %s (%g%%), shadow %s", role, _version(canary), percent if canary else 0,
                     _version(shadow))
            route.canary, route.canary_percent, route.shadow = canary, (percent if canary else 0.0), shadow
            route.generation += 1

    def _fail(self, route: Route, version: str | None, reason: str, replica: str) -> None:
        if version is None or version in route.failed:
            return
        log.error("follower: %s version %s not rolled out: %s (replica %s); %s version %s keeps serving",
                  route.serving.name, version, reason, replica, route.serving.name, route.serving.version)
        route.failed[version] = {"reason": reason, "replica": replica,
                                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    # ------------------------------------------------------------------ the replica side

    def desired(self, role: str) -> dict[str, Any]:
        """What replicas of `role` should hold: serving, target (load, don't answer), canary, shadow."""
        with self.lock:
            return _desired(self.routes[role])

    def report(self, role: str, replica: str, loaded: list[str], failed: dict[str, str],
               answering: str | None, shadow: dict[str, Any] | None = None) -> dict[str, Any]:
        """A replica's state (keys are pinned URIs); commits a target every live replica holds."""
        with self.lock:
            r = self.routes[role]
            r.replicas[replica] = {"loaded": list(loaded), "answering": answering, "shadow": shadow or {},
                                   "at": time.time()}
            for key, reason in failed.items():
                for ref in (r.target, r.canary, r.shadow):
                    if ref is not None and _key(ref) == key:
                        self._fail(r, ref.version or key, reason, replica)
            if r.target is not None and (r.target.version or r.target.pinned) in r.failed:
                r.target, r.target_since = None, None
                r.generation += 1
            for what in ("canary", "shadow"):
                ref = getattr(r, what)
                if ref is not None and ref.version in r.failed:
                    setattr(r, what, None)
                    r.generation += 1
            live = r.live()
            if r.target is not None and live and all(_key(r.target) in rep["loaded"] for rep in live.values()):
                now = time.time()
                r.last_switch = {"from": r.serving.version, "to": r.target.version,
                                 "seconds_load_to_switch": round(now - (r.target_since or now), 3),
                                 "switched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}
                log.info("follower: %s now serving %s (was %s; every live replica warmed it up)", role,
                         r.target.label, r.serving.label)
                r.serving, r.target, r.target_since = r.target, None, None
                r.generation += 1
            return _desired(r)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per route: the rollout state for GET /v1/models."""
        with self.lock:
            return {role: self._status(r) for role, r in self.routes.items()}

    def _status(self, r: Route) -> dict[str, Any]:
        live = r.live()
        on: dict[str, int] = {}
        for rep in live.values():
            v = rep["answering"]
            on[v] = on.get(v, 0) + 1
        shadow = _merge_shadow([rep["shadow"] for rep in live.values()])
        return {"following": r.follow, "serving_version": r.serving.version,
                "target_version": r.target.version if r.target else None,
                "state": "rolling out" if r.target else "steady",
                "replicas": on, "replicas_live": len(live),
                "canary": {"version": r.canary.version, "percent": r.canary_percent} if r.canary else None,
                # the pairs outlive the shadow: the comparison stays readable after `abort`
                "shadow": {"version": _version(r.shadow), "pairs": shadow} if r.shadow or shadow else None,
                "failed": dict(r.failed), "last_switch": r.last_switch,
                "registry": {"polls": self.polls, "interval_s": self.interval_s, "error": self.poll_error}}


def _desired(r: Route) -> dict[str, Any]:
    return {"serving": r.serving, "target": r.target, "canary": r.canary, "canary_percent": r.canary_percent,
            "shadow": r.shadow, "generation": r.generation}


def _merge_shadow(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum each replica's per-pair shadow counters, then derive the rates."""
    sums: dict[str, dict[str, float]] = {}
    for rep in reports:
        for pair, s in rep.items():
            acc = sums.setdefault(pair, {})
            for k, v in s.items():
                acc[k] = acc.get(k, 0.0) + v
    out = {}
    for pair, s in sums.items():
        n = s.get("n", 0.0)
        out[pair] = {"requests": int(n), "skipped": int(s.get("skipped", 0)),
                     "top1_agreement": round(s["agree"] / n, 4) if n else None,
                     "mean_abs_prob_diff": round(s["abs_diff"] / n, 6) if n else None,
                     "primary_ms_mean": round(s["primary_ms"] / n, 3) if n else None,
                     "shadow_ms_mean": round(s["shadow_ms"] / n, 3) if n else None}
    return out
