"""The study: L1, the L2 ablation grid and L3 as parallel Tune trials, then L4/L5 stages.

`load_study(path, profile, overrides)` reads `configs/study.yaml`; `build_trials`
turns it into trial specs (sharing trials whose resolved configs are equal: L1
is the grid point light/none/constant and L2 the point strong/ls+wd/cosine, so
they train once); `run_study` runs Tune, registers each level's best trial,
runs the later stages and writes the report. Ray and MLflow are imported inside
functions: importing this module has no side effects.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowers import config as C
from flowers import tracking as T

log = logging.getLogger(__name__)

LEVELS = ("l1", "l2", "l3")
STAGES = ("tune", "ensemble", "distill")
REGISTERED = {"l1": "flowers-l1", "l2": "flowers-l2", "l3": "flowers-l3",
              "ensemble": "flowers-ensemble", "distill": "flowers-student"}
# keys that name a config rather than change what it trains
_IDENTITY_KEYS = ("level", "description", "train.run_name", "train.out_dir", "train.progress")


@dataclass(frozen=True)
class ResourcesConfig:
    """Per-trial resources and parallelism."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 0 on CPU machines, 1/max_concurrent of a GPU otherwise
    max_concurrent: int = 2
    num_cpus: int | None = None  # size of a local Ray (None: all cores); ignored on a cluster


@dataclass(frozen=True)
class StudyConfig:
    """What a study runs and where it records it. Relative paths are relative to the study YAML."""

    name: str = "flowers-study"
    levels: dict[str, str] = field(default_factory=lambda: {"l1": "level1.yaml", "l2": "level2.yaml", "l3": "level3.yaml"})
    ablation: str | None = "ablation.yaml"
    share_levels: bool = True  # a level equal to a grid point trains once
    l2_select: str = "fixed"  # fixed: the level2.yaml trial | best_grid: best strong-augmentation grid point by val
    profile: str | None = None  # merged into every trial config (e.g. study-cpu)
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE for every trial config
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    ensemble_members: list[str] = field(default_factory=lambda: list(LEVELS))
    distill_config: str | None = "level5.yaml"
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    max_failures: int = 2
    home: str = ".flowers"  # embedded MLflow store, Tune storage and reports live here by default
    storage_path: str | None = None  # Tune storage; None: <home>/tune. A shared path or URI on clusters
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under home
    report_dir: str | None = None  # None: <home>/reports/<name>


def load_study(path: str | Path, profile: str | None = None, overrides: list[str] | None = None) -> tuple[StudyConfig, Path]:
    """Read a study YAML; `study.KEY=VALUE` overrides go to the study, the rest to every trial."""
    path = Path(path)
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
    study = C.build(StudyConfig, data)
    _validate(study)
    return study, path.parent.resolve()


def _validate(study: StudyConfig) -> None:
    bad = [s for s in study.stages if s not in STAGES]
    if bad:
        raise C.ConfigError(f"stages: unknown stage '{bad[0]}' (choose from {', '.join(STAGES)})")
    if study.l2_select not in ("fixed", "best_grid"):
        raise C.ConfigError(f"l2_select: must be fixed or best_grid, got {study.l2_select!r}")
    if study.resources.cpus_per_trial <= 0 or study.resources.max_concurrent < 1:
        raise C.ConfigError("resources: cpus_per_trial must be > 0 and max_concurrent >= 1")
    unknown = sorted(set(study.levels) - set(LEVELS))
    if unknown:
        raise C.ConfigError(f"levels: unknown level '{unknown[0]}' (choose from {', '.join(LEVELS)})")


# ----------------------------------------------------------------------------- trials


@dataclass
class TrialSpec:
    """One Tune trial: a resolved config plus the roles it plays in the study."""

    key: str
    roles: list[str]
    cfg: C.Config
    axes: dict[str, str] = field(default_factory=dict)

    def to_param(self, run_root: str | None) -> dict[str, Any]:
        return {"key": self.key, "roles": self.roles, "axes": self.axes, "cfg": C.to_dict(self.cfg), "run_root": run_root}


def _resolve(study: StudyConfig, config_dir: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else config_dir / p


def _profile(study: StudyConfig, config_dir: Path) -> str | None:
    if not study.profile:
        return None
    p = C.profile_path(study.profile, config_dir)
    return str(p if p.is_absolute() or p.exists() else config_dir / p)


def _pin_data_root(cfg: C.Config) -> C.Config:
    # resolve $FLOWERS_DATA in the driver so every trial (and its logged params) names the same data
    if cfg.data.root is None and os.environ.get("FLOWERS_DATA"):
        return C.replace(cfg, {"data.root": os.environ["FLOWERS_DATA"]})
    return cfg


def training_key(cfg: C.Config) -> tuple:
    """What makes two configs train the same model (ignores names and output folders)."""
    flat = C.to_flat_dict(cfg)
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if k not in _IDENTITY_KEYS))


def ablation_grid(study: StudyConfig, config_dir: Path) -> list[tuple[dict[str, str], C.Config]]:
    """(axes, config) for every point of the ablation grid, in a stable order."""
    if not study.ablation:
        return []
    abl_path = _resolve(study, config_dir, study.ablation)
    data = C.read_yaml(abl_path)
    base_rel = data.get("config")
    axes: dict[str, dict[str, dict]] = data.get("axes") or {}
    if not base_rel or not axes:
        raise C.ConfigError(f"{study.ablation}: needs 'config' (the base level YAML) and 'axes'")
    # the base config is named relative to the ablation file itself
    base = C.load_config(_resolve(study, abl_path.parent, base_rel), _profile(study, config_dir), list(study.overrides))
    names = list(axes)
    points = []
    for combo in itertools.product(*(list(axes[a]) for a in names)):
        changes: dict[str, Any] = {}
        for axis, value in zip(names, combo):
            changes.update(axes[axis][value] or {})
        cfg = C.replace(base, {**changes, "level": "ablation"})
        points.append(({a: str(v) for a, v in zip(names, combo)}, _pin_data_root(cfg)))
    return points


def build_trials(study: StudyConfig, config_dir: Path) -> list[TrialSpec]:
    """Level trials first, then the grid; equal configs become one trial with several roles."""
    prof = _profile(study, config_dir)
    specs: list[TrialSpec] = []
    for level, rel in study.levels.items():
        cfg = _pin_data_root(C.load_config(_resolve(study, config_dir, rel), prof, list(study.overrides)))
        specs.append(TrialSpec(level, [level], cfg))
    by_key = {training_key(s.cfg): s for s in specs}
    for axes, cfg in ablation_grid(study, config_dir):
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


# ----------------------------------------------------------------------------- running


@dataclass
class StudyOutcome:
    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    registered: dict[str, str] = field(default_factory=dict)  # stage/level → models:/ URI
    skipped: dict[str, str] = field(default_factory=dict)  # stage → reason
    report: Path | None = None
    failed_trials: list[str] = field(default_factory=list)


def storage_path(study: StudyConfig) -> str:
    if study.storage_path and "://" in study.storage_path:
        return study.storage_path
    return str(Path(study.storage_path or Path(study.home) / "tune").expanduser().resolve())


def _gpus_per_trial(study: StudyConfig) -> float:
    if study.resources.gpus_per_trial is not None:
        return study.resources.gpus_per_trial
    import torch

    n = torch.cuda.device_count()
    return 0.0 if n == 0 else min(1.0, n / study.resources.max_concurrent)


def run_tune(study: StudyConfig, specs: list[TrialSpec], target: T.TrackingTarget, resume: bool = False,
             address: str | None = None) -> list[str]:
    """Run (or continue) the Tune experiment; returns the keys of trials that failed for good."""
    from ray import tune

    from flowers import tune_adapter as A

    A.init_ray(address, study.resources.num_cpus)
    storage = storage_path(study)
    exp_path = f"{storage.rstrip('/')}/{study.name}"
    trainable = tune.with_resources(A.train_trial, {"cpu": study.resources.cpus_per_trial, "gpu": _gpus_per_trial(study)})
    if resume and tune.Tuner.can_restore(exp_path):
        log.info("restoring the Tune experiment at %s", exp_path)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if "://" not in exp_path and Path(exp_path, "tuner.pkl").exists():
            raise C.ConfigError(f"study '{study.name}' already has a Tune experiment at {exp_path}: "
                                "continue it with --resume, or choose another name with --set study.name=NEW")
        run_root = None if "://" in storage else f"{storage}/{study.name}-runs"
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([s.to_param(run_root) for s in specs])},
            tune_config=tune.TuneConfig(max_concurrent_trials=study.resources.max_concurrent,
                                        trial_dirname_creator=A.trial_dirname),
            run_config=tune.RunConfig(
                name=study.name, storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=study.max_failures),
                checkpoint_config=A.CHECKPOINTS,
                callbacks=[A.MlflowStudyCallback(study.name, target, {"study": study.name})],
                verbose=1,
            ),
        )
    grid = A.fit_tuner(tuner)
    failed = [r.config["trial"]["key"] for r in grid if r.error is not None]
    for key in failed:
        log.warning("trial %s failed after %d retries; the study goes on without it", key, study.max_failures)
    return failed


def trial_records(tracker: T.StudyTracker) -> list[dict[str, Any]]:
    """Finished trial runs of this study with their roles, axes and metrics (from MLflow)."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_id}' and tags.`{T.ROLE_TAG}` = 'trial'",
        max_results=1000)
    out = []
    for r in runs:
        tags = r.data.tags
        out.append({
            "key": tags.get(T.KEY_TAG), "run_id": r.info.run_id, "status": r.info.status,
            "roles": [x for x in tags.get("flowers.roles", "").split(",") if x],
            "axes": {k[5:]: v for k, v in tags.items() if k.startswith("axis.")},
            "metrics": dict(r.data.metrics), "params": dict(r.data.params),
        })
    return out


def select_champions(study: StudyConfig, records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each level's best finished trial by best validation accuracy (see `l2_select`)."""
    done = [r for r in records if r["status"] == "FINISHED" and "best_val_acc" in r["metrics"]]
    chosen = {}
    for level in study.levels:
        if level == "l2" and study.l2_select == "best_grid":
            cands = [r for r in done if "ablation" in r["roles"] and r["axes"].get("augment") == "strong"]
        else:
            cands = [r for r in done if level in r["roles"]]
        if cands:
            chosen[level] = max(cands, key=lambda r: r["metrics"]["best_val_acc"])
    return chosen


def _champion_run(client, name: str) -> str | None:
    try:
        return client.get_model_version_by_alias(name, T.CHAMPION).run_id
    except Exception:  # no such model or alias yet
        return None


def register_levels(study: StudyConfig, tracker: T.StudyTracker, records: list[dict[str, Any]]) -> dict[str, str]:
    """Register each level's champion (`flowers-lN@champion`, tagged with the study)."""
    out = {}
    for level, rec in select_champions(study, records).items():
        name = REGISTERED[level]
        if _champion_run(tracker.client, name) != rec["run_id"]:
            T.register(tracker.client, name, rec["run_id"], "model", T.CHAMPION,
                       {T.STUDY_TAG: study.name, "trial": rec["key"],
                        "val_acc": f"{rec['metrics']['best_val_acc']:.4f}",
                        "test_top1": f"{rec['metrics'].get('test_top1', float('nan')):.4f}"})
        out[level] = f"models:/{name}@{T.CHAMPION}"
    return out


def _stage_done(tracker: T.StudyTracker, key: str) -> bool:
    rid = tracker._find(key, "stage")
    return bool(rid) and tracker.client.get_run(rid).info.status == "FINISHED"


def _log_stage(tracker: T.StudyTracker, key: str, result, registered_name: str, study: str) -> str:
    run_id = tracker.child(key, "stage", {"flowers.stage": key})
    tracker.log_params(run_id, result.params)
    tracker.log_metrics(run_id, result.metrics)
    tracker.set_tags(run_id, result.tags)
    tracker.log_artifacts(run_id, result.artifacts, "artifacts")
    tracker.log_model_dir(run_id, result.model_dir, "model", registered_name, T.CHAMPION, {T.STUDY_TAG: study})
    tracker.finish(run_id)
    return f"models:/{registered_name}@{T.CHAMPION}"


def run_ensemble(study: StudyConfig, config_dir: Path, tracker: T.StudyTracker, members: dict[str, str],
                 out_dir: Path) -> str | None:
    """L4: soft voting over the registered levels, as a child run; registers flowers-ensemble."""
    from flowers.ensemble import run_ensemble_stage

    members = {k: v for k, v in members.items() if k in study.ensemble_members}
    if len(members) < 2:
        log.warning("ensemble stage skipped: needs at least two registered levels, have %s", sorted(members))
        return None
    first = next(iter(study.levels.values()))
    data_cfg = _pin_data_root(C.load_config(_resolve(study, config_dir, first), _profile(study, config_dir),
                                            list(study.overrides))).data
    result = run_ensemble_stage(members, data_cfg, out_dir)
    return _log_stage(tracker, "l4-ensemble", result, REGISTERED["ensemble"], study.name)


def run_distill(study: StudyConfig, config_dir: Path, tracker: T.StudyTracker, teacher: str, out_dir: Path) -> str | None:
    """L5: distil `teacher` into the student, as a child run with per-epoch metrics; registers flowers-student."""
    from flowers.distill import run_distill_stage

    if not study.distill_config or not _resolve(study, config_dir, study.distill_config).is_file():
        log.warning("distill stage skipped: no student config (distill_config=%r)", study.distill_config)
        return None
    cfg = C.load_config(_resolve(study, config_dir, study.distill_config), _profile(study, config_dir),
                        [*study.overrides, f"distill.teacher={teacher}"])
    cfg = _pin_data_root(cfg)
    run_id = tracker.child("l5-distill", "stage", {"flowers.stage": "l5-distill"})
    tracker.log_params(run_id, C.to_flat_dict(cfg))

    def callback(metrics: dict[str, float], run_dir: Path) -> None:
        tracker.log_metrics(run_id, metrics, step=int(metrics.get("epoch", 0)))

    result = run_distill_stage(cfg, out_dir, callback=callback)
    return _log_stage(tracker, "l5-distill", result, REGISTERED["distill"], study.name)


def run_study(study: StudyConfig, config_dir: Path, resume: bool = False, address: str | None = None) -> StudyOutcome:
    """Tune trials → registry → L4 → L5 → report. Safe to call again with `resume=True`."""
    from flowers import report as R

    target = T.configure(T.resolve_target(study.tracking_uri, study.home))
    tracker = T.StudyTracker(study.name, target, {"study": study.name})
    tracker.set_tags(tracker.parent_id, {"hardware": hardware()})
    outcome = StudyOutcome(study.name, target.tracking_uri, tracker.experiment_id, tracker.parent_id)
    specs = build_trials(study, config_dir)
    tracker.log_params(tracker.parent_id, {
        "trials": ",".join(s.key for s in specs), "stages": ",".join(study.stages),
        "profile": study.profile, "overrides": " ".join(study.overrides), "l2_select": study.l2_select,
        "cpus_per_trial": study.resources.cpus_per_trial, "max_concurrent": study.resources.max_concurrent})
    t0 = time.perf_counter()
    status = "FAILED"
    try:
        if "tune" in study.stages:
            outcome.failed_trials = run_tune(study, specs, target, resume, address)
        records = trial_records(tracker)
        outcome.registered.update(register_levels(study, tracker, records))
        out_root = Path(study.home).expanduser().resolve() / "stages" / study.name
        if "ensemble" in study.stages:
            if resume and _stage_done(tracker, "l4-ensemble"):
                outcome.registered["ensemble"] = f"models:/{REGISTERED['ensemble']}@{T.CHAMPION}"
            else:
                uri = run_ensemble(study, config_dir, tracker, dict(outcome.registered), out_root / "ensemble")
                if uri:
                    outcome.registered["ensemble"] = uri
                else:
                    outcome.skipped["ensemble"] = "fewer than two registered levels"
        if "distill" in study.stages:
            teacher = outcome.registered.get("ensemble") or next(iter(outcome.registered.values()), None)
            if resume and _stage_done(tracker, "l5-distill"):
                outcome.registered["distill"] = f"models:/{REGISTERED['distill']}@{T.CHAMPION}"
            elif teacher is None:
                log.warning("distill stage skipped: no registered teacher")
                outcome.skipped["distill"] = "no teacher"
            else:
                uri = run_distill(study, config_dir, tracker, teacher, out_root / "distill")
                if uri:
                    outcome.registered["distill"] = uri
                else:
                    outcome.skipped["distill"] = "no student config"
        tracker.log_metrics(tracker.parent_id, {"study_wall_seconds": time.perf_counter() - t0})
        report_dir = Path(study.report_dir or Path(study.home) / "reports" / study.name)
        outcome.report = R.write_report(study.name, report_dir, tracker=tracker)
        tracker.log_artifacts(tracker.parent_id, [outcome.report, *sorted(report_dir.glob("*.png"))], "report")
        status = "FINISHED"
    finally:
        tracker.finish_study(status)
    return outcome


def parse_space(texts: list[str]) -> dict[str, Any]:
    """`optim.lr=loguniform:1e-4:1e-2`, `data.augment=choice:light,strong`, `uniform:a:b`, `randint:a:b`."""
    from ray import tune

    space: dict[str, Any] = {}
    for text in texts:
        key, _, spec = text.partition("=")
        kind, _, rest = spec.partition(":")
        try:
            if kind == "choice":
                space[key] = tune.choice([C.parse_override(f"x={v}")[1] for v in rest.split(",")])
            elif kind in ("loguniform", "uniform"):
                lo, hi = (float(v) for v in rest.split(":"))
                space[key] = getattr(tune, kind)(lo, hi)
            elif kind == "randint":
                lo, hi = (int(v) for v in rest.split(":"))
                space[key] = tune.randint(lo, hi)
            else:
                raise ValueError(kind)
        except ValueError:
            raise C.ConfigError(f"--param '{text}': expected KEY=choice:a,b | loguniform:LO:HI | uniform:LO:HI | randint:LO:HI") from None
    return space


def run_search(cfg: C.Config, space: dict[str, Any], name: str, num_samples: int = 8, asha: bool = False,
               resources: ResourcesConfig = ResourcesConfig(), home: str = ".flowers", tracking_uri: str | None = None,
               address: str | None = None, max_failures: int = 1) -> dict[str, Any]:
    """`flowers tune`: a hyperparameter search around one level config (ASHA early stopping optional)."""
    from ray import tune

    from flowers import tune_adapter as A

    target = T.configure(T.resolve_target(tracking_uri, home))
    A.init_ray(address, resources.num_cpus)
    storage = storage_path(StudyConfig(name=name, home=home))
    spec = TrialSpec(cfg.level, [cfg.level, "search"], _pin_data_root(cfg))
    scheduler = (tune.schedulers.ASHAScheduler(time_attr="training_iteration", grace_period=1, reduction_factor=2)
                 if asha else None)
    tuner = tune.Tuner(
        tune.with_resources(A.train_trial, {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial or 0}),
        param_space={"trial": spec.to_param(f"{storage}/{name}-runs"), "overrides": space},
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", num_samples=num_samples, scheduler=scheduler,
                                    max_concurrent_trials=resources.max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=storage, failure_config=tune.FailureConfig(max_failures=max_failures),
                                  checkpoint_config=A.CHECKPOINTS,
                                  callbacks=[A.MlflowStudyCallback(name, target, {"study": name, "search": "true"})], verbose=1))
    grid = A.fit_tuner(tuner)
    best = grid.get_best_result(metric="val_acc", mode="max", scope="all")
    T.StudyTracker(name, target).finish_study()
    return {"best_config": best.config.get("overrides"), "best_val_acc": best.metrics.get("best_val_acc"),
            "tracking_uri": target.tracking_uri, "experiment": name}


def hardware() -> str:
    """One line for reports: CPU model and cores, GPU if any."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"


def add_study_args(p) -> None:
    """Arguments shared by `flowers study` and `python -m jobs.study`."""
    p.add_argument("--config", "-c", default="configs/study.yaml", help="study YAML (default configs/study.yaml)")
    p.add_argument("--profile", "-p", help="profile merged into every trial config, e.g. study-cpu or smoke")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="study.KEY=VALUE changes the study; other keys change every trial config (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study (Tuner.restore)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under .flowers/)")


def main_from_args(args) -> int:
    """Load, run, print where to look. Used by the CLI and the Ray job entry point."""
    import dataclasses

    study, config_dir = load_study(args.config, args.profile, args.overrides)
    if args.tracking_uri:
        study = dataclasses.replace(study, tracking_uri=args.tracking_uri)
    outcome = run_study(study, config_dir, resume=args.resume, address=args.address)
    if outcome.report and Path(outcome.report).is_file():
        print(Path(outcome.report).read_text())
    print(summary_text(outcome))
    return 0 if not outcome.failed_trials else 1


def summary_text(outcome: StudyOutcome, home: str = ".flowers") -> str:
    """What to print at the end: the report, the UI command and the model URIs."""
    lines = [f"study '{outcome.name}' done", f"report: {outcome.report}",
             f"MLflow: {outcome.tracking_uri} (experiment '{outcome.name}')",
             f"UI:     flowers ui{'' if outcome.tracking_uri.startswith('sqlite:') else ' --tracking-uri ' + outcome.tracking_uri}"]
    for k, uri in outcome.registered.items():
        lines.append(f"model {k}: {uri}")
    for k, why in outcome.skipped.items():
        lines.append(f"stage {k}: skipped ({why})")
    if outcome.failed_trials:
        lines.append(f"failed trials: {', '.join(outcome.failed_trials)}")
    return "\n".join(lines)
