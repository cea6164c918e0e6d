"""Typed configuration: frozen dataclasses loaded from YAML, with `a.b=c` overrides.

A config file may name a `base:` file (relative to itself) that it extends; a
profile (e.g. `configs/profiles/cpu.yaml`) is merged on top, then `--set`
overrides. Unknown keys and wrong types are errors that name the key.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key or file."""


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split and loaded."""

    root: str | None = None  # None: $FLOWERS_DATA, else the download cache
    format: str = "vgg"  # vgg (Flowers-102 release) | folder (one subfolder per class)
    split: str = "random"  # official | random (seeded, stratified 80/10/10)
    seed: int = 0
    classes: int | None = None  # keep only the first N classes (quick runs)
    image_size: int = 224
    resize_size: int | None = None  # eval resize before centre crop; None: image_size * 256 / 224
    augment: str = "light"  # none | light | strong
    cutout_frac: float = 0.25  # side of the cutout square as a fraction of image_size (strong)
    batch_size: int = 32
    eval_batch_size: int = 64
    workers: int = 2
    max_train_batches: int | None = None  # cap per epoch (smoke tests)
    max_eval_batches: int | None = None
    # Frozen-trunk training (flowers/training/feature_cache.py): the backbone below model.trainable_units
    # stays frozen, its features are computed once per image (and per augmented view) and cached.
    feature_cache: bool = False
    cache_views: int = 2  # augmented views cached per training image (plus its clean version)
    shift_views: int = 0  # more cached views under the `shifts` preset (docs/robustness.md)
    cache_dir: str | None = None  # None: $FLOWERS_CACHE/features, else ~/.cache/flowers/features


@dataclass(frozen=True)
class ModelConfig:
    """Which network: a registered backbone, optionally with attention pooling."""

    arch: str = "resnet50"
    attention: bool = False
    pretrained: Union[str, bool, None] = "DEFAULT"
    dropout: float = 0.2
    trainable_units: int = 1  # with data.feature_cache: backbone units trained above the frozen trunk

    @property
    def name(self) -> str:
        return f"attention_{self.arch}" if self.attention else self.arch


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, loss and learning-rate schedule."""

    lr: float = 3e-4
    backbone_lr_mult: float = 1.0  # backbone lr = lr * this (heads learn faster)
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    schedule: str = "constant"  # constant | cosine
    warmup_epochs: float = 0.0
    grad_clip: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Loop settings that do not change the model."""

    epochs: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch intra-op threads; None: this process's CPU share
    deterministic: bool = False
    out_dir: str = "runs"
    run_name: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class DistillConfig:
    """L5 knowledge distillation (used when task == distill)."""

    teacher: str | None = None  # model URI of the teacher (ensemble or level)
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the KD term; (1 - alpha) weights cross-entropy
    cache_teacher: bool = True  # precompute teacher probabilities once per image
    # static INT8 weights of the exported student (flowers/inference/export.py INT8_RECIPES): the 7-bit ones cannot
    # saturate on any x86 CPU, u8s8_7bit_bc also bias-corrects; u8s8 keeps 8-bit weights (exact on VNNI
    # CPUs; flowers' loaders switch ONNX Runtime to its exact kernels elsewhere and say so); u8u8 cannot
    # saturate either but runs slowly
    int8_recipe: str = "u8s8_7bit_bc"


@dataclass(frozen=True)
class Config:
    """A whole run: one level, one trial."""

    level: str = "l1"
    task: str = "classification"  # classification | distill
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


CHOICES: dict[str, tuple[Any, ...]] = {
    "data.format": ("vgg", "folder"),
    "data.split": ("official", "random"),
    "data.augment": ("none", "light", "strong", "shifts"),
    "distill.int8_recipe": ("u8s8_7bit_bc", "u8s8_7bit", "u8s8", "u8u8"),
    "optim.schedule": ("constant", "cosine"),
    "task": ("classification", "distill"),
}


# ----------------------------------------------------------------------------- building


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int→float and YAML-ish strings."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # bool before str so "true" from --set becomes a bool where a bool is allowed
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - programming error


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (valid keys under "
            f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def build(cls: type, values: dict) -> Any:
    """Build a (nested) config dataclass from a plain dict, checking keys, types and choices."""
    obj = _build(cls, values)
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
PROJECT_ROOT = Path(__file__).resolve().parents[1]


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


# ----------------------------------------------------------------------------- study, Tune resources and scoring
# Settings of the Ray jobs (`flowers study`, `flowers tune`, `flowers score`), typed like the run configs.

STUDY_LEVELS = ("l1", "l2", "l3")
STUDY_STAGES = ("tune", "ensemble", "distill", "robustness")


@dataclass(frozen=True)
class ResourcesConfig:
    """Per-trial resources and parallelism."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 0 on CPU machines, 1/max_concurrent of a GPU otherwise
    max_concurrent: int = 2
    num_cpus: int | None = None  # size of a local Ray (None: all cores); ignored on a cluster
    stage_cpus: float | None = None  # the L4/L5 stage task (None: the largest node's CPUs)
    stage_gpus: float | None = None  # None: 1 when the cluster has a GPU, else 0


@dataclass(frozen=True)
class StudyConfig:
    """What a study runs and where it records it (`configs/study.yaml`). Relative paths: to the study YAML."""

    name: str = "flowers-study"
    levels: dict[str, str] = field(default_factory=lambda: {"l1": "level1.yaml", "l2": "level2.yaml", "l3": "level3.yaml"})
    ablation: str | None = "ablation.yaml"
    share_levels: bool = True  # a level equal to a grid point trains once
    l2_select: str = "fixed"  # fixed: the level2.yaml trial | best_grid: best strong-augmentation grid point by val
    profile: str | None = None  # merged into every trial config (e.g. study-cpu)
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE for every trial config
    stages: list[str] = field(default_factory=lambda: list(STUDY_STAGES))
    ensemble_members: list[str] = field(default_factory=lambda: list(STUDY_LEVELS))
    distill_config: str | None = "level5.yaml"
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    max_failures: int = 2
    home: str = ".flowers"  # embedded MLflow store, Tune storage and reports live here by default
    storage_path: str | None = None  # Tune storage; None: <home>/tune. A URI (s3://...) on clusters
    # true: home, storage_path and data.root are folders every node mounts at the same path (NFS...)
    shared_storage: bool = False
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under home
    report_dir: str | None = None  # None: <home>/reports/<name>
    # champion gate: a challenger is kept out only when shown worse by more than this accuracy
    # fraction (0.005 = half a point) on the same test images (flowers/registry/governance.py)
    gate_margin: float = 0.005
    # the robustness step (flowers/study/robustness_step.py): shift suite spec, test images per class, OOD photos
    shift_suite: str = "all"
    shift_per_class: int | None = 2
    ood_dir: str | None = None  # None: built once from its Debian package (flowers/evaluation/ood_sources.py)


@dataclass(frozen=True)
class SearchConfig:
    """`flowers tune`: a hyperparameter search around one level config."""

    name: str = "flowers-tune"  # MLflow experiment and Tune experiment
    num_samples: int = 8
    asha: bool = False  # stop weak trials early (ASHA on val_acc)
    max_failures: int = 1
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass(frozen=True)
class ScoreConfig:
    """Batch scoring settings (`flowers score`); the inputs, model and output are the job's inputs."""

    batch_size: int = 32  # images per model call
    workers: int | None = None  # model actors; None: one per cluster CPU (or GPU share), at most one per batch
    cpus_per_worker: float | None = None  # CPUs (= torch threads) per actor; None: cluster CPUs / workers
    gpus_per_worker: float | None = None  # GPUs per actor; None/0: CPU only (also when the cluster has no GPUs)
    top_k: int = 5
    resume: bool = False  # keep the rows already in the output, score only the rest
    overwrite: bool = False  # replace an existing output
    progress: bool = True
    dataset_threshold: int = 10_000  # more images than this: a folder of part files instead of one file
    part_rows: int = 1024  # rows per part file in a dataset folder (also what a crash can lose)
    path_column: str | None = None  # column of a Parquet listing; None: `path`, else its only string column
    shared_fs: bool = False  # every Ray node mounts the local inputs, output and model at the same paths
    engine: str = "auto"  # auto | local (this process, no Ray) | ray (Ray Data); auto: local for small local jobs
    local_max: int = 10_000  # auto: at most this many images scored in-process (docs/scoring.md: measured)


# ----------------------------------------------------------------------------- serving
# `flowers serve` / `python -m jobs.deploy` settings, and the Serve app's `args:` block (serve/config.yaml).


@dataclass(frozen=True)
class ServeAppConfig:
    """The Serve application's arguments: the `args:` block of serve/config.yaml."""

    ensemble_uri: str = "models:/flowers-ensemble@champion"
    student_uri: str = "models:/flowers-student@champion"
    tracking_uri: str | None = None  # MLflow store for models:/ URIs; None: the replicas' $MLFLOW_TRACKING_URI
    max_body_bytes: int = 10 * 1024 * 1024  # larger request bodies get 413
    default_top_k: int = 5
    uncertainty_threshold: float | None = None  # None: the threshold stored with each model
    follow: bool = True  # follow the registry: an alias move, canary or shadow reaches the running app
    follow_interval_s: float = 2.0  # registry poll interval of the app's Follower (serve/follower.py)


@dataclass(frozen=True)
class ServeConfig:
    """How `flowers serve` / `python -m jobs.deploy` deploy the app; None: the Serve YAML's value."""

    config: str | None = None  # Serve config YAML; None: the packaged serve/config.yaml
    ensemble_uri: str | None = None
    student_uri: str | None = None
    host: str | None = None
    port: int | None = None
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else the embedded store
    address: str | None = None  # Ray address; None: $RAY_ADDRESS, else a new embedded Ray
    proxy: str = "haproxy"  # HTTP front of an embedded Ray: haproxy | serve (serve/ingress_env.py)
    pin: bool = False  # models:/name@alias -> models:/name/<version> before deploying
    gpus: float | None = None  # GPUs per model replica (ray_actor_options.num_gpus); None: the YAML's
    follow: bool | None = None  # follow the registry's aliases live; None: the YAML's (default True)
