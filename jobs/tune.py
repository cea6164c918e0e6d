"""Ray Tune: the study's trials as one grid, and `flowers tune`, a search around one level.

    python -m jobs.tune -c configs/level1.yaml -p cpu --param optim.lr=loguniform:1e-4:3e-3 --asha
    flowers tune ...                                     # the same

Trials are `jobs.trial.train_trial`; the driver-side `MlflowStudyCallback` is the only
MLflow writer. Both Tuners expect Ray to be connected (`raylink.connect.connect`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ray import tune

from flowers import config as C
from flowers import storage
from flowers.registry import uris as registry
from flowers.registry import tracking as T
from flowers.registry.uris import TrackingTarget
from flowers.study.plan import TrialSpec, pin_data_root, run_root, storage_path
from jobs import entry
from jobs.options import add_tune_arguments, search_settings
from jobs.trial import MlflowStudyCallback, train_trial, trial_dirname
from raylink import connect as cluster

log = logging.getLogger(__name__)

# Tune saves its experiment state at most every 10 s by default, while each report deletes the
# trial's older checkpoints beyond num_to_keep: a driver killed in between leaves a state naming a
# deleted checkpoint, and that trial cannot resume ("does not exist on storage anymore"; seen with
# short epochs). Saving the state on every controller step and keeping two checkpoints means the
# state always names one that exists.
CHECKPOINTS = tune.CheckpointConfig(num_to_keep=2)


def fit_tuner(tuner: tune.Tuner) -> tune.ResultGrid:
    """`tuner.fit()` with the experiment state saved on every step (see CHECKPOINTS)."""
    old = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S")
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"  # read when fit() builds its controller
    try:
        return tuner.fit()
    finally:
        if old is None:
            os.environ.pop("TUNE_GLOBAL_CHECKPOINT_S", None)
        else:
            os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = old


def trainable(resources: C.ResourcesConfig, finished: set[str] | None = None):
    """`train_trial` with its per-trial CPUs and GPUs (by default a share of the cluster's GPUs,
    counted by Ray across all nodes: a CPU-only head may drive GPU workers); on resume, with the
    keys of trials MLflow records as finished, which do not train again."""
    gpus = resources.gpus_per_trial
    if gpus is None:
        n = cluster.cluster_gpus()
        gpus = 0.0 if n == 0 else min(1.0, n / resources.max_concurrent)
    fn = tune.with_parameters(train_trial, finished=sorted(finished)) if finished else train_trial
    return tune.with_resources(fn, {"cpu": resources.cpus_per_trial, "gpu": gpus})


def tune_storage(uri: str) -> tuple[str, dict[str, Any]]:
    """(storage_path, extra kwargs) for Tune: object storage goes through our filesystem resolver,
    so an S3-compatible endpoint (AWS_ENDPOINT_URL_S3) and bounded retries apply."""
    if not storage.is_remote(uri):
        return uri, {}
    fs, path = storage.filesystem(uri)
    return path, {"storage_filesystem": fs}


def _new_tuner(study: C.StudyConfig, specs: list[TrialSpec], name: str, store: str, where: str,
               fs_kw: dict[str, Any], callback: MlflowStudyCallback) -> tune.Tuner:
    return tune.Tuner(
        trainable(study.resources),
        param_space={"trial": tune.grid_search([s.to_param(run_root(store, name)) for s in specs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=study.resources.max_concurrent,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=name, storage_path=where, **fs_kw,
            failure_config=tune.FailureConfig(max_failures=study.max_failures),
            checkpoint_config=CHECKPOINTS,
            callbacks=[callback],
            verbose=1,
        ),
    )


def run_tune(study: C.StudyConfig, specs: list[TrialSpec], target: TrackingTarget, resume: bool = False,
             finished: set[str] | None = None) -> list[str]:
    """Run (or continue) the study's trials as one Tune grid; returns the keys of trials that failed for good.

    `finished`: trial keys MLflow records as finished (resume). The Tune experiment is restored
    so interrupted trials continue from their last checkpoint; if its saved state cannot be read
    (a driver killed while writing it), only the trials not in `finished` run again, afresh.
    """
    store = storage_path(study.home, study.storage_path)
    where, fs_kw = tune_storage(store)
    callback = MlflowStudyCallback(study.name, target, {"study": study.name})
    MlflowStudyCallback.undelivered.pop(study.name, None)
    exp_path = f"{where.rstrip('/')}/{study.name}"
    if resume and tune.Tuner.can_restore(exp_path, **fs_kw):
        log.info("restoring the Tune experiment at %s/%s", store.rstrip("/"), study.name)
        try:
            grid = fit_tuner(tune.Tuner.restore(exp_path, trainable=trainable(study.resources, finished),
                                                resume_unfinished=True, resume_errored=True, **fs_kw))
        except Exception as e:  # Tune's own state is unreadable; MLflow still says what finished
            todo = [s for s in specs if s.key not in (finished or set())]
            log.warning("the saved Tune state of %s cannot be restored (%s); running the %d unfinished trials "
                        "again from scratch", study.name, str(e).splitlines()[0] if str(e) else type(e).__name__,
                        len(todo))
            if not todo:
                return []
            name = f"{study.name}-resumed-{time.strftime('%Y%m%d-%H%M%S')}"
            grid = fit_tuner(_new_tuner(study, todo, name, store, where, fs_kw, callback))
    else:
        if not fs_kw and Path(exp_path, "tuner.pkl").exists():
            raise C.ConfigError(f"study '{study.name}' already has a Tune experiment at {exp_path}: "
                                "continue it with --resume, or choose another name with --set study.name=NEW")
        grid = fit_tuner(_new_tuner(study, specs, study.name, store, where, fs_kw, callback))
    if MlflowStudyCallback.undelivered.get(study.name):
        raise T.TrackingError(f"the MLflow server {target.tracking_uri} stayed unreachable; trial metrics or "
                              "artifacts were not recorded. Start it again and rerun with --resume (finished "
                              "trials are not trained again)")
    failed = [r.config["trial"]["key"] for r in grid if r.error is not None]
    for key in failed:
        log.warning("trial %s failed after %d retries; the study goes on without it", key, study.max_failures)
    return failed


# ----------------------------------------------------------------------------- flowers tune


def parse_space(texts: list[str]) -> dict[str, Any]:
    """`optim.lr=loguniform:1e-4:1e-2`, `data.augment=choice:light,strong`, `uniform:a:b`, `randint:a:b`."""
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
            raise C.ConfigError(f"--param '{text}': expected KEY=choice:a,b | loguniform:LO:HI | uniform:LO:HI | "
                                "randint:LO:HI") from None
    return space


def run_search(cfg: C.Config, space: dict[str, Any], search: C.SearchConfig, target: TrackingTarget,
               home: str = registry.DEFAULT_HOME) -> dict[str, Any]:
    """A hyperparameter search around `cfg` (ASHA early stopping optional); the best trial's values."""
    store = storage_path(home)
    where, fs_kw = tune_storage(store)
    spec = TrialSpec(cfg.level, [cfg.level, "search"], pin_data_root(cfg))
    scheduler = (tune.schedulers.ASHAScheduler(time_attr="training_iteration", grace_period=1, reduction_factor=2)
                 if search.asha else None)
    tuner = tune.Tuner(
        trainable(search.resources),
        param_space={"trial": spec.to_param(run_root(store, search.name)), "overrides": space},
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", num_samples=search.num_samples, scheduler=scheduler,
                                    max_concurrent_trials=search.resources.max_concurrent),
        run_config=tune.RunConfig(
            name=search.name, storage_path=where, **fs_kw, failure_config=tune.FailureConfig(max_failures=search.max_failures),
            checkpoint_config=CHECKPOINTS, verbose=1,
            callbacks=[MlflowStudyCallback(search.name, target, {"study": search.name, "search": "true"})]))
    best = fit_tuner(tuner).get_best_result(metric="val_acc", mode="max", scope="all")
    T.StudyTracker(search.name, target).finish_study()
    return {"best_config": best.config.get("overrides"), "best_val_acc": best.metrics.get("best_val_acc"),
            "tracking_uri": target.tracking_uri, "experiment": search.name}


def run(args: argparse.Namespace) -> int:
    """Load the config, connect, search, print the best values as JSON."""
    if not args.param:
        raise C.ConfigError("flowers tune: give at least one --param KEY=SPACE (e.g. optim.lr=loguniform:1e-4:3e-3)")
    cfg = C.load_config(args.config, args.profile, args.overrides)
    space = parse_space(args.param)
    search = search_settings(args)
    target = T.configure(registry.resolve_target(args.tracking_uri))
    cluster.connect(args.address, search.resources.num_cpus)
    print(json.dumps(run_search(cfg, space, search, target), indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry.main("python -m jobs.tune", __doc__, add_tune_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
