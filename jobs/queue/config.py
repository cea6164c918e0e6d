"""The queues a cluster declares: a small YAML file read by the dispatcher.

    queues:
      default: {max_running: 4}
      train:   {max_running: 2, priority: 0}
      urgent:  {max_running: 1, priority: 10}

`default` always exists (max_running 4 unless declared). A job's priority defaults to its queue's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from flowers.config import ConfigError

DEFAULT_QUEUE = "default"
DEFAULT_MAX_RUNNING = 4
# priorities and retries a person would type; anything beyond is a typo, refused in one line
PRIORITY_RANGE = (-1000, 1000)
MAX_RETRIES = 10
MAX_RUNNING_LIMIT = 1000


@dataclass(frozen=True)
class QueueSpec:
    """One queue: at most `max_running` of its jobs admitted at once; `priority` is its jobs' default."""

    name: str
    max_running: int = DEFAULT_MAX_RUNNING
    priority: int = 0


def check_priority(p: int) -> int:
    lo, hi = PRIORITY_RANGE
    if not lo <= p <= hi:
        raise ConfigError(f"priority {p}: give a number from {lo} to {hi} (higher runs first)")
    return p


def check_retries(n: int) -> int:
    if not 0 <= n <= MAX_RETRIES:
        raise ConfigError(f"--max-retries {n}: give 0 to {MAX_RETRIES}")
    return n


def parse_queues(data: dict | None, where: str = "queues config") -> list[QueueSpec]:
    """Validate the `queues:` mapping; `default` is added when missing."""
    raw = (data or {}).get("queues", {}) if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected `queues:` mapping names to {{max_running, priority}}")
    out: dict[str, QueueSpec] = {}
    for name, spec in raw.items():
        spec = spec or {}
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
            raise ConfigError(f"{where}: queue name {name!r}: use letters, digits, - and _ (at most 64)")
        unknown = set(spec) - {"max_running", "priority"}
        if unknown:
            raise ConfigError(f"{where}: queue '{name}': unknown keys {sorted(unknown)} (use max_running, priority)")
        mr = spec.get("max_running", DEFAULT_MAX_RUNNING)
        if not isinstance(mr, int) or not 1 <= mr <= MAX_RUNNING_LIMIT:
            raise ConfigError(f"{where}: queue '{name}': max_running {mr!r}: give 1 to {MAX_RUNNING_LIMIT}")
        pr = spec.get("priority", 0)
        if not isinstance(pr, int):
            raise ConfigError(f"{where}: queue '{name}': priority {pr!r}: give an integer")
        out[name] = QueueSpec(name, mr, check_priority(pr))
    out.setdefault(DEFAULT_QUEUE, QueueSpec(DEFAULT_QUEUE))
    return list(out.values())


def load_queues(path: str | Path | None) -> list[QueueSpec]:
    """The queues of `path` (None: only `default`)."""
    if path is None:
        return [QueueSpec(DEFAULT_QUEUE)]
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"queues config {p} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"queues config {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_queues(data, str(p))
