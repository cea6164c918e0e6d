"""Unit level, no Serve: the Follower's two-phase rollout and failure bookkeeping, the dealt canary split.

The behaviour over HTTP with real replicas and a real registry is in tests/test_lifecycle.py; these
pin down the referee's rules case by case in milliseconds."""
from __future__ import annotations

import pytest

from flowers.registry.uris import ModelRef, TrackingTarget


def _ref(version: str, alias: str | None = "champion", name: str = "m") -> ModelRef:
    return ModelRef(uri=f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}",
                    pinned=f"models:/{name}/{version}", source=f"/store/{version}", kind="checkpoint",
                    tracking=TrackingTarget("http://registry"), name=name, version=version, alias=alias)


@pytest.fixture
def follower():
    from serve.follower import Follower

    cls = Follower.func_or_class
    f = cls({"student": _ref("1"), "ensemble": ModelRef(uri="/x.pt", pinned="/x.pt", source="/x.pt",
                                                         kind="checkpoint")}, tracking=None)
    return f


def _move(f, version: str | None, canary=None, percent=0.0, shadow=None) -> None:
    route = f.routes["student"]
    with f.lock:
        f._apply("student", route, {"target": _ref(version) if version else None,
                                    "canary": _ref(canary, "canary") if canary else None,
                                    "shadow": _ref(shadow, "shadow") if shadow else None}, percent)


def test_only_aliased_registry_routes_are_followed(follower):
    assert follower.routes["student"].follow == "champion" and follower.routes["ensemble"].follow is None


def test_target_becomes_serving_only_when_every_live_replica_holds_it(follower):
    follower.report("student", "b", ["models:/m/1"], {}, "1")
    _move(follower, "2")
    # replica a has loaded v2, replica b not yet: no switch
    d = follower.report("student", "a", ["models:/m/1", "models:/m/2"], {}, "1")
    assert d["serving"].version == "1" and d["target"].version == "2"
    assert follower.status()["student"]["state"] == "rolling out"
    d = follower.report("student", "b", ["models:/m/1", "models:/m/2"], {}, "1")
    assert d["serving"].version == "2" and d["target"] is None
    s = follower.status()["student"]
    assert (s["serving_version"], s["target_version"], s["last_switch"]["to"]) == ("2", None, "2")


def test_a_replica_failing_the_target_abandons_it_and_the_old_keeps_serving(follower):
    _move(follower, "3")
    d = follower.report("student", "a", ["models:/m/1"], {"models:/m/3": "ModelLoadError: checksum mismatch"}, "1")
    assert d["serving"].version == "1" and d["target"] is None
    s = follower.status()["student"]
    assert "checksum mismatch" in s["failed"]["3"]["reason"] and s["target_version"] is None
    _move(follower, "3")  # the alias still names it: not retried
    assert follower.routes["student"].target is None
    _move(follower, "1")  # the alias moves away ...
    _move(follower, "3")  # ... and back onto it: tried again
    assert follower.routes["student"].target.version == "3"


def test_canary_and_shadow_follow_the_registry(follower):
    _move(follower, "1", canary="2", percent=25.0, shadow="3")
    d = follower.desired("student")
    assert (d["canary"].version, d["canary_percent"], d["shadow"].version) == ("2", 25.0, "3")
    assert d["canary"].alias == "canary"
    _move(follower, "1")  # aborted
    d = follower.desired("student")
    assert d["canary"] is None and d["canary_percent"] == 0.0 and d["shadow"] is None


def test_canary_share_is_dealt_within_one_request():
    from serve.versions import Slot, Versions

    v = Versions.__new__(Versions)
    v.serving, v.canary = Slot(_ref("1"), None), Slot(_ref("2", "canary"), None)
    v.canary_percent, v.dealt = 30.0, 0
    picks = [v.pick()[1] for _ in range(400)]
    assert picks.count("canary") == 120
    for start in range(0, 380, 37):  # any window, not only the whole run
        window = picks[start:start + 20]
        assert abs(window.count("canary") - 6) <= 1


def test_compare_agreement_and_mean_abs_difference():
    import numpy as np

    from serve.versions import compare

    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.5, 0.4, 0.1])
    agree, diff = compare(p, q)
    assert agree and diff == pytest.approx(0.4 / 3)
    assert compare(p, np.array([0.1, 0.8, 0.1]))[0] is False
    assert np.isnan(compare(p, np.array([0.5, 0.5]))[1])
