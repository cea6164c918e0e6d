"""Loading configs: YAML files (with `base:` links), profiles, `a.b=c` overrides, and building
the typed dataclasses of `flowers.config.schema` with checks that name the key."""
from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from flowers.config.schema import CHOICES, Config, ConfigError


# ----------------------------------------------------------------------------- building


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.lru_cache(maxsize=None)
def _adapter(cls: type) -> TypeAdapter:
    # pydantic checks and converts (int -> float, YAML-ish strings); unknown keys are refused by the
    # schema's `__pydantic_config__`; `_config_error` turns its report into today's one-line messages
    return TypeAdapter(cls)


EXPECTED = {"int": "an integer", "float": "a number", "bool": "true/false", "string": "a string", "list": "a list",
            "tuple": "a list", "dict": "a mapping", "dataclass": "a mapping"}


def _type_name(tp: Any) -> str:
    """`str | bool | None` for a union, else the type's name."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _locate(cls: type, loc: tuple) -> tuple[str, Any, type]:
    """A pydantic error location → (dotted key, its annotation, the dataclass holding it)."""
    key, tp, owner = "", cls, cls
    for part in loc:
        if isinstance(part, int):
            key, tp = f"{key}[{part}]", (typing.get_args(tp) or (Any,))[0]
            continue
        if not _is_dataclass_type(tp):
            break  # a union member's tag, not a key
        owner, key = tp, f"{key}.{part}" if key else str(part)
        tp = typing.get_type_hints(tp).get(part, Any)
    return key, tp, owner


def _config_error(cls: type, e: ValidationError) -> ConfigError:
    """The first problem pydantic found, said the way the rest of the project says it."""
    errors = e.errors()
    err = errors[0]
    key, tp, owner = _locate(cls, err["loc"])
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        parent = key.rpartition(".")[0]
        names = sorted(f.name for f in dataclasses.fields(owner))
        return ConfigError(f"unknown config key '{key}' (valid keys under '{parent or 'top level'}': {', '.join(names)})")
    value = err.get("input")
    if sum(_locate(cls, x["loc"])[0] == key for x in errors) > 1:  # every member of a union refused it
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    what = EXPECTED.get(err["type"].split("_")[0], None)
    return ConfigError(f"{key}: expected {what}, got {value!r}" if what else f"{key}: {err['msg']} (got {value!r})")


def build(cls: type, values: dict) -> Any:
    """Build a (nested) config dataclass from a plain dict, checking keys, types and choices."""
    try:
        obj = _adapter(cls).validate_python(values)
    except ValidationError as e:
        raise _config_error(cls, e) from None
    if cls is Config:
        validate(obj)
    return obj


def validate(cfg: Config) -> None:
    """Value checks that types cannot express."""
    flat = to_flat_dict(cfg)
    for key, allowed in CHOICES.items():
        if flat.get(key) not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(allowed)}, got {flat.get(key)!r}")
    positive = ["data.image_size", "data.batch_size", "data.eval_batch_size", "train.epochs", "optim.lr"]
    for key in positive:
        if not flat[key] > 0:
            raise ConfigError(f"{key}: must be > 0, got {flat[key]!r}")
    if not 0.0 <= cfg.optim.label_smoothing < 1.0:
        raise ConfigError(f"optim.label_smoothing: must be in [0, 1), got {cfg.optim.label_smoothing}")
    if not 0.0 <= cfg.distill.alpha <= 1.0:
        raise ConfigError(f"distill.alpha: must be in [0, 1], got {cfg.distill.alpha}")
    if cfg.distill.temperature <= 0:
        raise ConfigError(f"distill.temperature: must be > 0, got {cfg.distill.temperature}")
    if cfg.data.workers < 0:
        raise ConfigError(f"data.workers: must be >= 0, got {cfg.data.workers}")
    if cfg.data.cache_views < 0 or cfg.data.shift_views < 0:
        raise ConfigError(f"data.cache_views/shift_views: must be >= 0, got {cfg.data.cache_views}/{cfg.data.shift_views}")
    if cfg.model.trainable_units < 0:
        raise ConfigError(f"model.trainable_units: must be >= 0, got {cfg.model.trainable_units}")
    if cfg.data.feature_cache and cfg.task == "distill" and not cfg.distill.cache_teacher:
        raise ConfigError("distill.cache_teacher: must be true with data.feature_cache (the online teacher "
                          "needs image batches, the cached trunk gives features)")
    if cfg.task == "distill" and not cfg.distill.teacher:
        raise ConfigError("distill.teacher: a teacher model URI is required when task is 'distill'")


# ----------------------------------------------------------------------------- YAML and overrides


def deep_merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge; `extra` wins."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# the checkout this module runs from: its configs/ answer relative `configs/...` paths from any folder
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def find_config(path: str | Path) -> Path:
    """`path` if it exists; a relative path that does not (e.g. `configs/study.yaml` typed in another folder)
    falls back to the same path inside the project's checkout, so commands work from any working folder."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    alt = PROJECT_ROOT / p
    return alt if alt.is_file() else p


def read_yaml(path: str | Path, cache: dict | None = None) -> dict:
    """Read a YAML mapping, following `base:` links; errors name the file.

    `cache` (path → mapping), shared by the reads of one plan, parses each file once.
    """
    path = find_config(path)
    key = str(path.resolve())
    if cache is not None and key in cache:
        return copy.deepcopy(cache[key])
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (a path, or relative to this folder or to {PROJECT_ROOT})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base:
        data = deep_merge(read_yaml(path.parent / base, cache), data)
    if cache is not None:
        cache[key] = copy.deepcopy(data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` → (['a', 'b'], value parsed as YAML so numbers/bools/null work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. optim.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string; numbers like that are common in overrides
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def set_dotted(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{'.'.join(keys)}': '{k}' is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        set_dotted(data, *parse_override(text))
    return data


GRID_KEY = "grid"  # a profile section for the ablation grid's points only (e.g. a smaller budget)


def profile_grid_changes(profile: str | None, config_dir: Path | None = None,
                         cache: dict | None = None) -> dict[str, Any]:
    """A profile's `grid:` section as dotted keys, e.g. `{'train.epochs': 3}` (empty without one)."""
    if not profile:
        return {}
    grid = read_yaml(profile_path(profile, config_dir), cache).get(GRID_KEY) or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{profile}: '{GRID_KEY}' must be a mapping of config changes, e.g. train: {{epochs: 3}}")

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    return flat(grid)


def profile_path(profile: str, config_dir: Path | None = None) -> Path:
    """A profile is a path or a name under configs/profiles/."""
    p = Path(profile)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    base = config_dir or Path("configs")
    return base / "profiles" / f"{profile}.yaml"


def load_config(
    path: str | Path | None = None,
    profile: str | None = None,
    overrides: list[str] | None = None,
    cls: type = Config,
    cache: dict | None = None,
) -> Any:
    """Load YAML (or defaults), merge a profile, apply `a.b=c` overrides, build and check."""
    data: dict = read_yaml(path, cache) if path else {}
    if profile:
        config_dir = Path(path).parent if path else None
        prof = read_yaml(profile_path(profile, config_dir), cache)
        prof.pop(GRID_KEY, None)  # the study applies it to ablation-grid points only
        data = deep_merge(data, prof)
    data = apply_overrides(data, overrides or [])
    return build(cls, data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{'data.image_size': 224, ...}`: the form MLflow params and reports use."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(to_flat_dict(v, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = v
    return out


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Any, changes: dict[str, Any]) -> Any:
    """A copy with dotted keys changed, e.g. `{'optim.lr': 1e-4}`; re-validated."""
    data = to_dict(cfg)
    for key, value in changes.items():
        set_dotted(data, key.split("."), value)
    return build(type(cfg), data)
