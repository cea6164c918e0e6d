"""One Tune trial: the trainable around `flowers.training.loop.fit`, and the driver-side MLflow callback.

The trainable is a plain function of `config`: every epoch goes to
`tune.report(metrics, checkpoint=...)`, and a restarted trial picks up
`tune.get_checkpoint()`'s `last.pt`. MLflow is written only by the callback, which Tune
runs in the driver process: one writer, however many trials.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
from ray import tune

from flowers import config as C
from flowers.registry import run_notes as N
from flowers.registry import tracking as T
from flowers.registry.uris import TrackingTarget

log = logging.getLogger(__name__)

# files of a finished trial that travel in its final checkpoint (the driver logs them)
FINAL_FILES = ("best.pt", "config.yaml", "split.json", "datasets.json", "metrics.json", "curves.png",
               "test_confusion.png", "test_confusion.csv", "test_per_class.csv", "test_most_confused.json")
PENDING_WAIT_S = 300  # at the end, how long queued MLflow writes wait for the server to come back
NODE_TAG = "ray.node_id"  # the node a trial's last result came from
NODES_TAG = "ray.node_ids"  # every node it ran on, in order (a node failure moves it)
SKIPPED = "skipped"  # result flag of a trial that an earlier driver already finished (resume)
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "epoch_seconds",
                 "images_per_s", "best_val_acc")


def _link(src: Path, dst: Path) -> None:
    # last.pt/best.pt are replaced atomically by fit, so a hard link is a consistent snapshot
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _report_with_files(metrics: dict[str, Any], run_dir: Path, names: tuple[str, ...]) -> None:
    """`tune.report` with a checkpoint of these run files; the staging folder goes once Tune has persisted it."""
    stage = Path(tempfile.mkdtemp(prefix="flowers-ckpt-"))
    try:
        for name in names:
            if (run_dir / name).is_file():
                _link(run_dir / name, stage / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(stage)))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def trial_key(config: dict[str, Any], trial_id: str) -> str:
    """Study trials are named by the study; search trials add Tune's trial id."""
    key = config["trial"]["key"]
    return f"{key}-{trial_id}" if config.get("overrides") else key


def trial_dirname(trial) -> str:
    """Short trial folder names (the default embeds the whole config)."""
    return f"{trial.trial_id}_{trial.config['trial']['key']}"


def train_trial(config: dict[str, Any], finished: Sequence[str] = ()) -> None:
    """Tune trainable: one trial. `config['trial']` is a `flowers.study.plan.TrialSpec.to_param()`.

    `finished`: trial keys MLflow records as finished (a resumed study). Tune's saved state is
    uploaded to remote storage in the background, so a driver killed just after a trial ended can
    leave a state that still lists it as running; such a trial reports `skipped` and trains nothing.
    """
    from flowers.training.tasks import make_task
    from flowers.training.loop import fit

    spec = dict(config["trial"])
    cfg = C.build(C.Config, spec["cfg"])
    if config.get("overrides"):  # a search (`flowers tune`): sampled values on top of the base config
        cfg = C.replace(cfg, config["overrides"])
        spec["key"] = trial_key(config, tune.get_context().get_trial_id())
    elif spec["key"] in finished:
        log.info("trial %s finished in an earlier run of this study; not trained again", spec["key"])
        tune.report({"key": spec["key"], "final": True, SKIPPED: True})
        return
    run_dir = Path(spec["run_root"]) / spec["key"] if spec.get("run_root") else Path(tune.get_context().get_trial_dir()) / "run"
    run_dir.mkdir(parents=True, exist_ok=True)

    resume_from = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            for name in ("last.pt", "best.pt"):
                if (Path(d) / name).is_file():
                    shutil.copy2(Path(d) / name, run_dir / name)
        if (run_dir / "last.pt").is_file():
            resume_from = run_dir / "last.pt"
            log.info("trial %s resumes from its checkpoint", spec["key"])

    node = ray.get_runtime_context().get_node_id()  # recorded on the trial's MLflow run

    def report(metrics: dict[str, float], rd: Path) -> None:
        _report_with_files({**metrics, "key": spec["key"], "final": False, "node_id": node}, rd, ("last.pt", "best.pt"))

    res = fit(cfg, make_task(cfg), callback=report, run_dir=run_dir, resume_from=resume_from)
    last = res.history[-1] if res.history else {}
    test = {f"test_{k}": v for k, v in res.test_metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    _report_with_files({**last, **test, "best_val_acc": res.best_val_acc, "best_epoch": res.best_epoch,
                        "key": spec["key"], "final": True, "node_id": node}, res.run_dir, FINAL_FILES)


class MlflowStudyCallback(tune.Callback):
    """Driver-side logger: per-epoch metrics live, artifacts and the model when a trial ends."""

    undelivered: dict[str, int] = {}  # study → MLflow writes left queued at the end of its experiment

    def __init__(self, study: str, target: TrackingTarget, study_tags: dict[str, str] | None = None) -> None:
        self.study = study
        self.target = target
        self.study_tags = study_tags or {}
        self._tracker: T.StudyTracker | None = None
        self._params_logged: set[str] = set()
        self._nodes: dict[str, list[str]] = {}
        self._pending: list[tuple[str, Callable[[], None]]] = []

    def __getstate__(self) -> dict:
        # Tune pickles the run config (with callbacks) for `Tuner.restore`; the client is rebuilt lazily
        return {**self.__dict__, "_tracker": None, "_params_logged": set(), "_nodes": {}, "_pending": []}

    @property
    def tracker(self) -> T.StudyTracker:
        if self._tracker is None:
            T.configure(self.target)
            self._tracker = T.StudyTracker(self.study, self.target, self.study_tags)
        return self._tracker

    def _run_for(self, trial) -> str:
        spec = trial.config["trial"]
        key = trial_key(trial.config, trial.trial_id)
        axes = spec.get("axes", {})
        # study trials get a readable name (`L1 baseline`, `grid strong/ls_wd/cosine`); search trials keep their key
        name = key if trial.config.get("overrides") else N.run_name(key, spec["roles"], axes)
        run_id = self.tracker.child(key, "trial", {
            "flowers.roles": ",".join(spec["roles"]), N.LEVEL_TAG: N.level_of(spec["roles"]),
            "mlflow.runName": name, **{f"axis.{k}": str(v) for k, v in axes.items()}})
        if key not in self._params_logged:  # once per driver process (log_params skips what a restored run has)
            params = C.to_flat_dict(C.build(C.Config, spec["cfg"]))
            params.update({f"axis.{k}": v for k, v in axes.items()})
            params.update(trial.config.get("overrides") or {})
            self.tracker.log_params(run_id, params)
            # the description is generated from the config this trial trains (never a hand-written text)
            self.tracker.set_tags(run_id, {N.NOTE_TAG: N.describe_trial(params, spec["roles"], axes)})
            self._params_logged.add(key)
        return run_id

    def _record_node(self, run_id: str, node: str | None) -> None:
        """Tag the run with the Ray node it ran on (every node, in order, if a restart moved it)."""
        if not node:
            return
        seen = self._nodes.setdefault(run_id, [])
        if not seen:  # after a driver restart: continue the list the run already has
            prior = self.tracker.client.get_run(run_id).data.tags.get(NODES_TAG, "")
            seen.extend(x for x in prior.split(",") if x)
        if not seen or seen[-1] != node:
            seen.append(node)
            self.tracker.set_tags(run_id, {NODE_TAG: node, NODES_TAG: ",".join(seen)})

    # MLflow writes are queued in order and retried on the next event when the server is away
    # (MLflow's client already retries each request for a while): nothing is lost to an outage.

    def _deliver(self, what: str, write: Callable[[], None]) -> None:
        self._pending.append((what, write))
        while self._pending:
            name, fn = self._pending[0]
            try:
                fn()
            except Exception as e:  # tracking must never kill the study
                log.warning("MLflow write '%s' failed (%s); %d queued, retried on the next event",
                            name, str(e).splitlines()[0] if str(e) else type(e).__name__, len(self._pending))
                return
            self._pending.pop(0)

    def _log_result(self, trial, result: dict[str, Any]) -> None:
        if result.get(SKIPPED):  # finished and logged by an earlier driver
            return
        run_id = self._run_for(trial)
        self._record_node(run_id, result.get("node_id"))
        step = int(result.get("epoch", 0))
        if result.get("final"):  # at the last epoch's step: no artificial step-0 point
            keep = {k: v for k, v in result.items() if k.startswith("test_") or k == "best_epoch"}
        else:
            keep = {k: v for k, v in result.items() if k in EPOCH_METRICS}
        self.tracker.log_metrics(run_id, N.mlflow_metrics(keep, "trial"), step=step)

    def _log_final(self, trial, ckpt) -> None:
        run_id = self._run_for(trial)
        if ckpt is not None:
            with ckpt.as_directory() as d:
                d = Path(d)
                T.log_run_dir(self.tracker, run_id, d)
                if (d / "best.pt").is_file():
                    self.tracker.log_model_dir(run_id, d, "model")
                T.log_run_views(self.tracker, run_id, d)
        self.tracker.finish(run_id)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._deliver(f"metrics of {trial}", functools.partial(self._log_result, trial, dict(result)))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if (trial.last_result or {}).get(SKIPPED):  # its run is already FINISHED with its artifacts
            return
        self._deliver(f"artifacts of {trial}", functools.partial(self._log_final, trial, trial.checkpoint))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._deliver(f"status of {trial}", lambda: self.tracker.finish(self._run_for(trial), "FAILED"))

    def on_experiment_end(self, trials, **info) -> None:
        """Last chance for queued writes: wait for the server a while, then say what is missing."""
        deadline = time.monotonic() + PENDING_WAIT_S
        while self._pending and time.monotonic() < deadline:
            time.sleep(5)
            self._deliver("queued writes", lambda: None)
        # Tune may run a copy of this callback (a restored Tuner unpickles its own): report by study name
        MlflowStudyCallback.undelivered[self.study] = len(self._pending)
        if self._pending:
            log.error("%d MLflow writes could not be delivered (first: %s)", len(self._pending), self._pending[0][0])
