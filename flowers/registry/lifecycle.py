"""Live model lifecycle in the registry: canary, shadow, rollback, and what a running app follows.

The intent lives in MLflow itself, so a running `flowers serve` reads it with one call per
registered model (`get_registered_model`: its aliases and tags) and nothing else has to be told:

- `champion` (the gate moves it, `flowers.registry.governance.decide`): the version that answers;
- `canary` alias + registered-model tag `flowers.canary_percent`: that version answers that share
  of the route's requests (`flowers models canary NAME VERSION --percent P`);
- `shadow` alias: that version gets a copy of every request and never answers
  (`flowers models shadow NAME VERSION`);
- rollback: `champion` moves back to the version the current champion replaced (its
  `gate.champion_version` tag, written by the gate), and who/when/why are recorded as
  `rollback.*` tags on the version rolled away from.

Every change is checked before anything moves: a version that does not exist, a percent outside
0-100, a rollback with no previous champion raise `GateError` (one line) and change nothing.
No Ray import: the CLI and the Serve follower both use this.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from flowers.registry import uris as registry
from flowers.registry.governance import GATE_PREFIX, GateError, get_version, who

log = logging.getLogger(__name__)

CANARY = "canary"
SHADOW = "shadow"
CANARY_PERCENT_TAG = "flowers.canary_percent"
ROLLBACK_PREFIX = "rollback."


@dataclass(frozen=True)
class Intent:
    """What the registry asks of one registered model's route, read in one call."""

    name: str
    alias: str  # the alias the route follows (champion unless the app was started on another)
    followed: str | None  # the version that alias names (None: it names none)
    canary: str | None = None
    canary_percent: float = 0.0
    shadow: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alias": self.alias, "followed": self.followed, "canary": self.canary,
                "canary_percent": self.canary_percent, "shadow": self.shadow}


def read_intent(client, name: str, alias: str = registry.CHAMPION) -> Intent:
    """The route's intent: the followed alias's version, the canary (with its share) and the shadow."""
    rm = client.get_registered_model(name)
    aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
    tags = dict(rm.tags or {})
    followed = aliases.get(alias)
    canary = aliases.get(CANARY)
    try:
        percent = float(tags.get(CANARY_PERCENT_TAG) or 0.0)
    except ValueError:  # a hand-edited tag: no canary rather than a crashed follower
        log.warning("%s: tag %s=%r is not a number; canary ignored", name, CANARY_PERCENT_TAG,
                    tags.get(CANARY_PERCENT_TAG))
        percent = 0.0
    if canary == followed:  # promoted: the canary is the champion now
        canary = None
    return Intent(name, alias, followed, canary if percent > 0 else None, percent if canary else 0.0,
                  aliases.get(SHADOW) if aliases.get(SHADOW) != followed else None)


def _model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        raise GateError(f"no registered model '{name}'") from None


def _stamp(client, name: str, version: str, prefix: str, **fields: str) -> None:
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for k, v in {**fields, "by": who(), "at": at}.items():
        client.set_model_version_tag(name, version, prefix + k, str(v))


def set_canary(client, name: str, version: str, percent: float) -> str:
    """Send `percent` % of the route's requests to `version`; returns the version."""
    _model(client, name)
    if not 0 < percent <= 100:
        raise GateError(f"--percent must be in (0, 100], got {percent:g}")
    version = str(get_version(client, name, version).version)
    if version == _alias(client, name, registry.CHAMPION):
        raise GateError(f"{name} version {version} is the champion already; a canary must be another version")
    # percent first: an app that sees the alias before the share would send 0 % meanwhile
    client.set_registered_model_tag(name, CANARY_PERCENT_TAG, f"{percent:g}")
    client.set_registered_model_alias(name, CANARY, version)
    _stamp(client, name, version, "canary.", percent=f"{percent:g}")
    return version


def set_shadow(client, name: str, version: str) -> str:
    """Give `version` a copy of every request of the route (it never answers); returns the version."""
    _model(client, name)
    version = str(get_version(client, name, version).version)
    if version == _alias(client, name, registry.CHAMPION):
        raise GateError(f"{name} version {version} is the champion; shadow another version")
    client.set_registered_model_alias(name, SHADOW, version)
    _stamp(client, name, version, "shadow.")
    return version


def abort(client, name: str, what: tuple[str, ...] = (CANARY, SHADOW)) -> dict[str, str]:
    """End the canary and/or the shadow; returns {alias: version it named} for those that were set."""
    _model(client, name)
    ended = {}
    for alias in what:
        v = _alias(client, name, alias)
        if v is not None:
            client.delete_registered_model_alias(name, alias)
            ended[alias] = v
        if alias == CANARY and _has_tag(client, name):
            client.delete_registered_model_tag(name, CANARY_PERCENT_TAG)
    if not ended:
        raise GateError(f"'{name}' has no {' or '.join(what)} to abort")
    return ended


def finish_canary(client, name: str, version: str) -> bool:
    """After `version` became champion: end the canary if it named that version."""
    if _alias(client, name, CANARY) != str(version):
        return False
    client.delete_registered_model_alias(name, CANARY)
    if _has_tag(client, name):
        client.delete_registered_model_tag(name, CANARY_PERCENT_TAG)
    return True


def _replaced(tags: dict[str, str]) -> str | None:
    """The version a champion replaced: its gate record, or a later rollback's record of it."""
    gate_at, back_at = tags.get(GATE_PREFIX + "at", ""), tags.get(ROLLBACK_PREFIX + "restored_at", "")
    if tags.get(ROLLBACK_PREFIX + "previous") and back_at >= gate_at:
        return tags[ROLLBACK_PREFIX + "previous"]
    return tags.get(GATE_PREFIX + "champion_version")


def previous_champion(client, name: str) -> tuple[str, str]:
    """(current champion, the version it replaced), from the gate's (or a rollback's) record on it."""
    _model(client, name)
    current = _alias(client, name, registry.CHAMPION)
    if current is None:
        raise GateError(f"'{name}' has no champion to roll back")
    prev = _replaced(dict(client.get_model_version(name, current).tags or {}))
    if not prev or prev == current:
        raise GateError(f"{name} version {current} is champion with no previous champion recorded; nothing to roll "
                        "back to")
    get_version(client, name, prev)  # deleted since: one line, nothing moves
    return current, prev


def rollback(client, name: str, reason: str = "") -> tuple[str, str]:
    """Move `champion` back to the previous champion; returns (from, to). Recorded as rollback.* tags."""
    current, prev = previous_champion(client, name)
    earlier = _replaced(dict(client.get_model_version(name, prev).tags or {}))
    client.set_registered_model_alias(name, registry.CHAMPION, prev)
    _stamp(client, name, current, ROLLBACK_PREFIX, to=prev, reason=reason or "(none given)")
    # the restored version replaces again what it replaced before: a second rollback goes one further back
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, prev, ROLLBACK_PREFIX + "restored_from", current)
    client.set_model_version_tag(name, prev, ROLLBACK_PREFIX + "restored_at", at)
    client.set_model_version_tag(name, prev, ROLLBACK_PREFIX + "previous", earlier or "")
    log.info("rollback %s: champion %s -> %s (%s)", name, current, prev, reason)
    return current, prev


def _alias(client, name: str, alias: str) -> str | None:
    v = (client.get_registered_model(name).aliases or {}).get(alias)
    return str(v) if v is not None else None


def _has_tag(client, name: str) -> bool:
    return CANARY_PERCENT_TAG in (client.get_registered_model(name).tags or {})
