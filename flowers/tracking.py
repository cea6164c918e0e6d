"""MLflow tracking for the study: one experiment per study, a parent run, nested child runs.

Nothing here touches MLflow at import. Entry points call `configure(...)` once:
with no URI it uses the embedded store (`sqlite:///<abs>/mlflow.db` plus a local
artifact folder next to it); a `--tracking-uri` / `MLFLOW_TRACKING_URI` points at
a server instead. All writes for a study come from one process (the Tune driver),
so parallel trials never contend for the SQLite file.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from flowers import governance as G
from flowers import mlflow_model
from flowers.checkpoint import (MANIFEST, PER_IMAGE, load_checkpoint, read_manifest, read_per_image, sha256_file,
                                update_manifest, verify_folder, write_checkpoint_folder)
from flowers.registry import CHALLENGER, MANIFEST_TAG, TrackingTarget, register

log = logging.getLogger(__name__)

class TrackingError(RuntimeError):
    """The tracking server could not record what a study produced; the message says what to do."""


STUDY_TAG = "flowers.study"
ROLE_TAG = "flowers.role"  # study | trial | stage
KEY_TAG = "flowers.key"  # stable trial/stage name: finds the same child run after a restore


def configure(target: TrackingTarget) -> TrackingTarget:
    """Point this process's MLflow at `target` (creates the embedded folder). Call from entry points."""
    import mlflow

    if target.embedded:
        Path(target.tracking_uri.split("sqlite:///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(target.tracking_uri)  # the registry follows the tracking URI
    # child processes (stages, loaders in the same job) resolve models:/ URIs against the same store
    os.environ["MLFLOW_TRACKING_URI"] = target.tracking_uri
    return target


def experiment_id(name: str, target: TrackingTarget) -> str:
    """The study's experiment, created with the embedded artifact folder when needed."""
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    loc = f"{target.artifact_root}/{name}" if target.artifact_root else None
    return client.create_experiment(name, artifact_location=loc)


def _param_value(v: Any) -> str:
    s = "null" if v is None else str(v)
    return s[:6000]  # MLflow's param value limit


def clean_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Finite numbers only (MLflow rejects NaN-like junk and lists)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


class StudyTracker:
    """The study's parent run and its children, found again by tag after a restart."""

    def __init__(self, study: str, target: TrackingTarget, tags: dict[str, str] | None = None) -> None:
        from mlflow import MlflowClient

        self.study = study
        self.target = target
        self.client = MlflowClient()
        self.experiment_id = experiment_id(study, target)
        self.parent_id = self._find_or_create(None, "study", study, tags or {})
        self._children: dict[str, str] = {}

    def find(self, key: str, role: str) -> str | None:
        """Run id of the latest run of this study tagged with `key` and `role`, if any."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{KEY_TAG}` = '{key}' and tags.`{ROLE_TAG}` = '{role}'",
            max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def _find_or_create(self, parent: str | None, role: str, key: str, tags: dict[str, str]) -> str:
        found = self.find(key, role)
        if found:
            if self.client.get_run(found).info.status != "RUNNING":
                self.client.update_run(found, status="RUNNING")
            return found
        all_tags = {STUDY_TAG: self.study, ROLE_TAG: role, KEY_TAG: key, **tags}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=key)
        return run.info.run_id

    def has_child(self, key: str) -> bool:
        """Whether this tracker already opened (or found again) the nested run `key`."""
        return key in self._children

    def child(self, key: str, role: str = "trial", tags: dict[str, str] | None = None) -> str:
        """Run id of the nested run `key` (created on first use, reused after a restore)."""
        if key not in self._children:
            self._children[key] = self._find_or_create(self.parent_id, role, key, tags or {})
        return self._children[key]

    # --------------------------------------------------------------------- logging

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        todo = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(todo), 100):  # MLflow batch limit
            self.client.log_batch(run_id, params=todo[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, v, ts, step or 0) for k, v in clean_metrics(metrics).items()]
        for i in range(0, len(ms), 500):
            self.client.log_batch(run_id, metrics=ms[i:i + 500])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_artifacts(self, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for p in paths:
            p = Path(p)
            if p.is_dir():
                self.client.log_artifacts(run_id, str(p), f"{artifact_path}/{p.name}" if artifact_path else p.name)
            elif p.is_file():
                self.client.log_artifact(run_id, str(p), artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def finish_study(self, status: str = "FINISHED") -> None:
        self.finish(self.parent_id, status)

    # --------------------------------------------------------------------- models

    def log_model_dir(self, run_id: str, model_dir: Path, artifact_path: str = "model",
                      registered_name: str | None = None, alias: str | None = CHALLENGER,
                      tags: dict[str, str] | None = None, description: str | None = None) -> str | None:
        """Log a model folder as an MLflow Model and optionally register it; returns the new version.

        `model_dir` holds `flowers_model.json` (ensemble, exported student) or a `best.pt`,
        which becomes a pickle-free folder (`model.safetensors` + manifest, no optimizer).
        The logged artifact is an MLflow Model (`flowers.mlflow_model`) wrapping that folder,
        with lineage in its manifest and a model card; lineage also goes on the run (and on
        the version when registered) as `lineage.*` tags. Registration makes a `challenger`:
        `flowers.governance.decide` is what moves `champion`.
        """
        model_dir = Path(model_dir)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / mlflow_model.FOLDER
            if (model_dir / MANIFEST).is_file():
                shutil.copytree(model_dir, folder)
            elif (model_dir / "best.pt").is_file():
                write_checkpoint_folder(load_checkpoint(model_dir / "best.pt"), folder)
            else:
                raise FileNotFoundError(f"{model_dir}: no {MANIFEST} or best.pt to log as a model")
            manifest = read_manifest(folder)
            verify_folder(folder, manifest)  # register exactly what the stage wrote
            record = read_per_image(folder) if (folder / PER_IMAGE).is_file() else None
            lineage = {**(manifest.get("lineage") or {}), **G.git_state(), "study": self.study,
                       "study_run_id": self.parent_id, "run_id": run_id}
            if record:
                lineage["split_hash"] = record["split_hash"]
            manifest = update_manifest(folder, lineage=lineage)
            card = Path(tmp) / mlflow_model.CARD
            card.write_text(G.model_card(manifest, record, registered_name or manifest.get("name")))
            out = mlflow_model.save(folder, Path(tmp) / "mlflow", card, {
                "kind": manifest.get("kind"), "name": manifest.get("name"), "lineage": lineage})
            run_tags = {MANIFEST_TAG: sha256_file(out / mlflow_model.FOLDER_PATH / MANIFEST),
                        "flowers.kind": str(manifest.get("kind")), **G.lineage_tags(lineage)}
            accuracy = (float(sum(p == y for p, y in zip(record["preds"], record["labels"])) / len(record["ids"]))
                        if record else manifest.get("test_accuracy"))
            if accuracy is not None:
                run_tags[G.ACCURACY_TAG] = f"{accuracy:.6g}"
            self.client.log_artifacts(run_id, str(out), artifact_path)
        self.set_tags(run_id, run_tags)
        if not registered_name:
            return None
        return register(self.client, registered_name, run_id, artifact_path, alias,
                        {STUDY_TAG: self.study, **run_tags, **(tags or {})}, description,
                        model_tags={STUDY_TAG: self.study, **(tags or {})})


def version_tags(client, run_id: str) -> dict[str, str]:
    """The tags `log_model_dir` put on a run that belong on a version registered from it (lineage,
    manifest checksum, test accuracy)."""
    tags = client.get_run(run_id).data.tags
    return {k: v for k, v in tags.items()
            if k.startswith(G.LINEAGE_PREFIX) or k in (MANIFEST_TAG, G.ACCURACY_TAG, "flowers.kind")}


def log_run_dir(tracker: StudyTracker, run_id: str, run_dir: Path) -> None:
    """Artifacts a `fit` run folder holds: curves, confusion PNG/CSV, per-class CSV, split, config, summary."""
    run_dir = Path(run_dir)
    keep = [p for p in sorted(run_dir.iterdir()) if p.is_file() and p.suffix in (".png", ".csv", ".json", ".yaml")]
    tracker.log_artifacts(run_id, keep)
