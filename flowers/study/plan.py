"""The study's plan: read `configs/study.yaml` and turn it into trials. No Ray here.

`load_study(path, profile, overrides)` reads the study YAML into a `StudyConfig`
(`flowers/config/`); `plan_study` turns it, once, into a `StudyPlan`: every trial's config
(`build_trials` makes the `TrialSpec`s), the student's and the data's, each YAML file parsed
once; the plan is what travels to the study's steps and Ray tasks. Trials whose
resolved configs are equal: L1 is the grid point light/none/constant and L2 the point
strong/ls+wd/cosine, so they train once and play two roles. `jobs/study.py` runs the
trials with Ray Tune; `flowers/study/steps.py` does what follows (registry, L4, L5).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowers import config as C

# keys that name a config rather than change what it trains
IDENTITY_KEYS = ("level", "description", "train.run_name", "train.out_dir", "train.progress")


def load_study(path: str | Path, profile: str | None = None,
               overrides: list[str] | None = None) -> tuple[C.StudyConfig, Path]:
    """Read a study YAML; `study.KEY=VALUE` overrides go to the study, the rest to every trial.

    Returns the study and the folder its relative paths are relative to.
    """
    path = C.find_config(path)
    data = C.read_yaml(path)
    trial_over = list(data.get("overrides") or [])
    for text in overrides or []:
        keys, value = C.parse_override(text)
        if keys[0] == "study":
            C.set_dotted(data, keys[1:], value)
        else:
            trial_over.append(text)
    data["overrides"] = trial_over
    if profile:
        data["profile"] = profile
    study = C.build(C.StudyConfig, data)
    validate_study(study)
    return study, path.parent.resolve()


def validate_study(study: C.StudyConfig) -> None:
    """Value checks that types cannot express."""
    bad = [s for s in study.stages if s not in C.STUDY_STAGES]
    if bad:
        raise C.ConfigError(f"stages: unknown stage '{bad[0]}' (choose from {', '.join(C.STUDY_STAGES)})")
    if study.l2_select not in ("fixed", "best_grid"):
        raise C.ConfigError(f"l2_select: must be fixed or best_grid, got {study.l2_select!r}")
    if study.resources.cpus_per_trial <= 0 or study.resources.max_concurrent < 1:
        raise C.ConfigError("resources: cpus_per_trial must be > 0 and max_concurrent >= 1")
    unknown = sorted(set(study.levels) - set(C.STUDY_LEVELS))
    if unknown:
        raise C.ConfigError(f"levels: unknown level '{unknown[0]}' (choose from {', '.join(C.STUDY_LEVELS)})")


# ----------------------------------------------------------------------------- trial configs


def study_path(config_dir: Path, rel: str) -> Path:
    """A path named in the study YAML (relative to its folder unless absolute)."""
    p = Path(rel)
    return p if p.is_absolute() else config_dir / p


def profile_file(study: C.StudyConfig, config_dir: Path) -> str | None:
    """The study's profile as a path: a name under configs/profiles/ or a file."""
    if not study.profile:
        return None
    p = C.profile_path(study.profile, config_dir)
    return str(p if p.is_absolute() or p.exists() else config_dir / p)


def pin_data_root(cfg: C.Config) -> C.Config:
    """$FLOWERS_DATA resolved in the driver, so every trial (and its logged params) names the same data."""
    if cfg.data.root is None and os.environ.get("FLOWERS_DATA"):
        return C.replace(cfg, {"data.root": os.environ["FLOWERS_DATA"]})
    return cfg


def trial_config(study: C.StudyConfig, config_dir: Path, rel: str, extra: list[str] | None = None,
                 cache: dict | None = None) -> C.Config:
    """A level config named in the study, with the study's profile and overrides (then `extra`)."""
    return pin_data_root(C.load_config(study_path(config_dir, rel), profile_file(study, config_dir),
                                       [*study.overrides, *(extra or [])], cache=cache))


def training_key(cfg: C.Config) -> tuple:
    """What makes two configs train the same model (ignores names and output folders)."""
    flat = C.to_flat_dict(cfg)
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if k not in IDENTITY_KEYS))


def ablation_grid(study: C.StudyConfig, config_dir: Path, cache: dict | None = None) -> list[tuple[dict[str, str], C.Config]]:
    """(axes, config) for every point of the ablation grid, in a stable order."""
    if not study.ablation:
        return []
    abl_path = study_path(config_dir, study.ablation)
    data = C.read_yaml(abl_path, cache)
    base_rel = data.get("config")
    axes: dict[str, dict[str, dict]] = data.get("axes") or {}
    if not base_rel or not axes:
        raise C.ConfigError(f"{study.ablation}: needs 'config' (the base level YAML) and 'axes'")
    # the base config is named relative to the ablation file itself
    base = C.load_config(study_path(abl_path.parent, base_rel), profile_file(study, config_dir), list(study.overrides),
                         cache=cache)
    names = list(axes)
    points = []
    # a profile may give the grid a smaller budget than the levels (its `grid:` section); the report says so
    budget = C.profile_grid_changes(profile_file(study, config_dir), config_dir, cache)
    for combo in itertools.product(*(list(axes[a]) for a in names)):
        changes: dict[str, Any] = dict(budget)
        for axis, value in zip(names, combo):
            changes.update(axes[axis][value] or {})
        cfg = C.replace(base, {**changes, "level": "ablation"})
        points.append(({a: str(v) for a, v in zip(names, combo)}, pin_data_root(cfg)))
    return points


# ----------------------------------------------------------------------------- trials


@dataclass
class TrialSpec:
    """One Tune trial: a resolved config plus the roles it plays in the study."""

    key: str
    roles: list[str]
    cfg: C.Config
    axes: dict[str, str] = field(default_factory=dict)

    def to_param(self, run_root: str | None) -> dict[str, Any]:
        """The trial as plain data (Tune's param space); `run_root` holds the trials' run folders."""
        return {"key": self.key, "roles": self.roles, "axes": self.axes, "cfg": C.to_dict(self.cfg), "run_root": run_root}


def build_trials(study: C.StudyConfig, config_dir: Path, cache: dict | None = None) -> list[TrialSpec]:
    """Level trials first, then the grid; equal configs become one trial with several roles."""
    specs = [TrialSpec(level, [level], trial_config(study, config_dir, rel, cache=cache))
             for level, rel in study.levels.items()]
    by_key = {training_key(s.cfg): s for s in specs}
    for axes, cfg in ablation_grid(study, config_dir, cache):
        hit = by_key.get(training_key(cfg)) if study.share_levels else None
        if hit is not None and "ablation" not in hit.roles:
            hit.roles.append("ablation")
            hit.axes = axes
            continue
        key = "abl-" + "-".join(axes.values())
        spec = TrialSpec(key, ["ablation"], cfg, axes)
        specs.append(spec)
        by_key.setdefault(training_key(cfg), spec)
    return specs


@dataclass
class StudyPlan:
    """A study read once, at the edge: its settings, every trial's config, the student's and the
    levels' shared data config. The study's steps and Ray tasks get this object; nothing downstream
    reads a config file again."""

    study: C.StudyConfig
    config_dir: Path
    trials: list[TrialSpec]
    student: C.Config | None  # the L5 student's config, None when the study names none
    data: C.DataConfig  # the levels' shared data settings (the first level's), for L4 and the robustness step


def plan_study(study: C.StudyConfig, config_dir: Path) -> StudyPlan:
    """Resolve every config the study will use; each YAML file (the profile included) is parsed once."""
    cache: dict = {}
    trials = build_trials(study, config_dir, cache)
    student = None
    if study.distill_config and study_path(config_dir, study.distill_config).is_file():
        student = trial_config(study, config_dir, study.distill_config, cache=cache)
    first = next((t.cfg for t in trials if t.key in study.levels), None)
    data = first.data if first is not None else trial_config(study, config_dir, next(iter(study.levels.values())),
                                                             cache=cache).data
    return StudyPlan(study, config_dir, trials, student, data)


def storage_path(home: str, storage: str | None = None) -> str:
    """Tune storage: a URI as given, else an absolute folder (default `<home>/tune`)."""
    if storage and "://" in storage:
        return storage
    return str(Path(storage or Path(home) / "tune").expanduser().resolve())


def run_root(storage: str, name: str) -> str | None:
    """Where trials keep their run folders: next to Tune's storage when it is local, else in the trial dir."""
    return None if "://" in storage else f"{storage.rstrip('/')}/{name}-runs"
