"""The config schema: frozen dataclasses for runs (data, model, optim, train, distill), the
study, Tune searches, scoring and serving, and the allowed values of the choice fields."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from pydantic import ConfigDict

# how `flowers.config.loading.build` validates every class below: unknown keys are errors
CHECKED = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """A configuration problem; the message names the key or file."""


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split and loaded."""

    __pydantic_config__ = CHECKED

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

    __pydantic_config__ = CHECKED

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

    __pydantic_config__ = CHECKED

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

    __pydantic_config__ = CHECKED

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

    __pydantic_config__ = CHECKED

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

    __pydantic_config__ = CHECKED

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


# ----------------------------------------------------------------------------- study, Tune resources and scoring
# Settings of the Ray jobs (`flowers study`, `flowers tune`, `flowers score`), typed like the run configs.

STUDY_LEVELS = ("l1", "l2", "l3")
STUDY_STAGES = ("tune", "ensemble", "distill", "robustness")


@dataclass(frozen=True)
class ResourcesConfig:
    """Per-trial resources and parallelism."""

    __pydantic_config__ = CHECKED

    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 0 on CPU machines, 1/max_concurrent of a GPU otherwise
    max_concurrent: int = 2
    num_cpus: int | None = None  # size of a local Ray (None: all cores); ignored on a cluster
    stage_cpus: float | None = None  # the L4/L5 stage task (None: the largest node's CPUs)
    stage_gpus: float | None = None  # None: 1 when the cluster has a GPU, else 0


@dataclass(frozen=True)
class StudyConfig:
    """What a study runs and where it records it (`configs/study.yaml`). Relative paths: to the study YAML."""

    __pydantic_config__ = CHECKED

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

    __pydantic_config__ = CHECKED

    name: str = "flowers-tune"  # MLflow experiment and Tune experiment
    num_samples: int = 8
    asha: bool = False  # stop weak trials early (ASHA on val_acc)
    max_failures: int = 1
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass(frozen=True)
class ScoreConfig:
    """Batch scoring settings (`flowers score`); the inputs, model and output are the job's inputs."""

    __pydantic_config__ = CHECKED

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

    __pydantic_config__ = CHECKED

    ensemble_uri: str = "models:/flowers-ensemble@champion"
    student_uri: str = "models:/flowers-student@champion"
    tracking_uri: str | None = None  # MLflow store for models:/ URIs; None: $MLFLOW_TRACKING_URI where `flowers serve` runs
    max_body_bytes: int = 10 * 1024 * 1024  # larger request bodies get 413
    default_top_k: int = 5
    uncertainty_threshold: float | None = None  # None: the threshold stored with each model
    follow: bool = True  # follow the registry: an alias move, canary or shadow reaches the running app
    follow_interval_s: float = 2.0  # registry poll interval of the app's Follower (serve/follower.py)


@dataclass(frozen=True)
class ServeConfig:
    """How `flowers serve` / `python -m jobs.deploy` deploy the app; None: the Serve YAML's value."""

    __pydantic_config__ = CHECKED

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
