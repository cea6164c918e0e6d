"""MLflow tracking for the study: one experiment per study, a parent run, nested child runs.

Nothing here touches MLflow at import. Entry points call `configure(...)` once:
with no URI it uses the embedded store (`sqlite:///<abs>/mlflow.db` plus a local
artifact folder next to it); a `--tracking-uri` / `MLFLOW_TRACKING_URI` points at
a server instead. All writes for a study come from one process (the Tune driver),
so parallel trials never contend for the SQLite file.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

from flowers.registry import governance as G
from flowers.registry import flavor as mlflow_model
from flowers.registry import run_notes as N
from flowers.models.checkpoint import (MANIFEST, PER_IMAGE, load_checkpoint, read_manifest, read_per_image, sha256_file,
                                update_manifest, verify_folder, write_checkpoint_folder)
from flowers.registry.uris import CHALLENGER, MANIFEST_TAG, TrackingTarget, logged_model, register

log = logging.getLogger(__name__)

class TrackingError(RuntimeError):
    """The tracking server could not record what a study produced; the message says what to do."""


STUDY_TAG = "flowers.study.plan"
ROLE_TAG = "flowers.role"  # study | trial | stage
KEY_TAG = "flowers.key"  # stable trial/stage name: finds the same child run after a restore
DROPPED_PARAMS = ("description",)  # a hand-written text, not a setting: the run's description is generated
WEIGHTS_TAG = "flowers.files_sha256"  # hash of the model files' checksums: the same model logged again is reused
DIGEST_CHARS = 36  # MLflow's limit on a dataset digest


def configure(target: TrackingTarget) -> TrackingTarget:
    """Point this process's MLflow fluent API at `target` (creates the embedded folder). Call from entry
    points. The environment is left alone: whatever else needs the store gets `target` as an argument."""
    import mlflow

    if target.embedded:
        Path(target.tracking_uri.split("sqlite:///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(target.tracking_uri)  # the registry follows the tracking URI
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
        self.describe_experiment()
        self.parent_id = self._find_or_create(None, "study", study, {N.LEVEL_TAG: "study", **(tags or {})})
        self._children: dict[str, str] = {}

    def describe_experiment(self) -> None:
        """Tag the experiment as model training (the UI lands on the runs table) and describe it."""
        want = {**N.EXPERIMENT_KIND, N.NOTE_TAG: N.experiment_note(self.study, self.experiment_id)}
        have = self.client.get_experiment(self.experiment_id).tags
        for k, v in want.items():
            if have.get(k) != v:
                self.client.set_experiment_tag(self.experiment_id, k, v)

    def find(self, key: str, role: str) -> str | None:
        """Run id of the latest run of this study tagged with `key` and `role`, if any."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{KEY_TAG}` = '{key}' and tags.`{ROLE_TAG}` = '{role}'",
            max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def _find_or_create(self, parent: str | None, role: str, key: str, tags: dict[str, str],
                        name: str | None = None) -> str:
        tags = dict(tags)
        name = tags.pop("mlflow.runName", None) or name  # the run name may come as its tag
        found = self.find(key, role)
        if found:
            info = self.client.get_run(found).info
            if info.status != "RUNNING" or (name and info.run_name != name):
                self.client.update_run(found, status="RUNNING", name=name or info.run_name)
            return found
        all_tags = {STUDY_TAG: self.study, ROLE_TAG: role, KEY_TAG: key, **tags}
        all_tags.setdefault(N.LEVEL_TAG, key)  # every run has a level to filter by (a later step: its key)
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name or key)
        return run.info.run_id

    def has_child(self, key: str) -> bool:
        """Whether this tracker already opened (or found again) the nested run `key`."""
        return key in self._children

    def child(self, key: str, role: str = "trial", tags: dict[str, str] | None = None, name: str | None = None) -> str:
        """Run id of the nested run `key` (created on first use, reused after a restore); `name` is
        what the runs table shows (default: the key)."""
        if key not in self._children:
            self._children[key] = self._find_or_create(self.parent_id, role, key, tags or {}, name)
        return self._children[key]

    def describe(self, run_id: str, text: str) -> None:
        """The run's description in the UI (generated from its config: `flowers.registry.run_notes`)."""
        self.client.set_tag(run_id, N.NOTE_TAG, text)

    # --------------------------------------------------------------------- logging

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        todo = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing and k not in DROPPED_PARAMS]
        for i in range(0, len(todo), 100):  # MLflow batch limit
            self.client.log_batch(run_id, params=todo[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int | None = None, kind: str | None = None,
                    model_id: str | None = None) -> None:
        """Log `metrics` at `step` (0: a one-off figure); with `kind` (trial, ensemble, student) the names
        go through the study's vocabulary (`flowers.registry.run_notes.mlflow_metrics`); `model_id` links them to
        a logged model too."""
        import time

        from mlflow.entities import Metric

        if kind:
            metrics = N.mlflow_metrics(metrics, kind)
        ts = int(time.time() * 1000)
        ms = [Metric(k, v, ts, step or 0, model_id=model_id) for k, v in clean_metrics(metrics).items()]
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
        """Log a model folder as an MLflow logged model of the run and optionally register it; returns
        the new version.

        `model_dir` holds `flowers_model.json` (ensemble, exported student) or a `best.pt`,
        which becomes a pickle-free folder (`model.safetensors` + manifest, no optimizer).
        The logged model (named `artifact_path`, linked to the run as its output, so the UI's
        Models column and the experiment's Models tab show it) is an MLflow Model
        (`flowers.registry.flavor`) wrapping that folder, with lineage in its manifest and a model
        card, which also becomes the registered version's description; lineage also goes on the
        run (and on the version when registered) as `lineage.*` tags. Registration makes a
        `challenger`: `flowers.registry.governance.decide` is what moves `champion`.
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
            card_text = G.model_card(manifest, record, registered_name or manifest.get("name"))
            card = Path(tmp) / mlflow_model.CARD
            card.write_text(card_text)
            out = mlflow_model.save(folder, Path(tmp) / "mlflow", card, {
                "kind": manifest.get("kind"), "name": manifest.get("name"), "lineage": lineage})
            run_tags = {MANIFEST_TAG: sha256_file(out / mlflow_model.FOLDER_PATH / MANIFEST),
                        WEIGHTS_TAG: G.config_hash(manifest.get("sha256") or {}),
                        "flowers.kind": str(manifest.get("kind")), **G.lineage_tags(lineage)}
            accuracy = (float(sum(p == y for p, y in zip(record["preds"], record["labels"])) / len(record["ids"]))
                        if record else manifest.get("test_accuracy"))
            if accuracy is not None:
                run_tags[G.ACCURACY_TAG] = f"{accuracy:.6g}"
            model = self._logged_model(run_id, artifact_path, out, run_tags)
        self.set_tags(run_id, run_tags)
        if accuracy is not None:  # the logged model's page shows the accuracy of exactly this model
            known = self.client.get_metric_history(run_id, "test/acc")  # at the run's own step: no new point
            self.log_metrics(run_id, {"test/acc": accuracy}, step=known[-1].step if known else 0,
                             model_id=model.model_id)
        if not registered_name:
            return None
        return register(self.client, registered_name, run_id, artifact_path, alias,
                        {STUDY_TAG: self.study, **run_tags, **(tags or {})}, description or card_text,
                        model_tags={STUDY_TAG: self.study, **(tags or {})}, model=model)

    def _logged_model(self, run_id: str, name: str, out: Path, tags: dict[str, str]):
        """The run's logged model `name` holding `out`: the one already logged with the same manifest
        (a resumed study logs nothing twice), else a new one linked to the run as its output."""
        from mlflow.entities import LoggedModelOutput

        found = logged_model(self.client, run_id, name)
        if found is not None and found.tags.get(WEIGHTS_TAG) == tags[WEIGHTS_TAG]:
            return found
        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=run_id,
                                                tags={k: v for k, v in tags.items() if len(v) < 5000},
                                                model_type=f"flowers-{tags.get('flowers.kind')}")
        self.client.log_model_artifacts(model.model_id, str(out))
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        return model

    # --------------------------------------------------------------------- what the UI shows

    def log_datasets(self, run_id: str, record: dict[str, Any]) -> None:
        """The train/val/test splits as the run's inputs (`flowers.registry.governance.dataset_record`): digest
        `<data checksum>-<split part hash>`, so the Datasets column, filter and lineage work. Inputs
        the run already has are not logged again."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        have = {(d.dataset.name, d.dataset.digest) for d in (self.client.get_run(run_id).inputs.dataset_inputs or [])}
        todo = []
        for part, info in (record.get("splits") or {}).items():
            name = f"{record.get('name') or 'flowers'}-{part}"
            digest = f"{record.get('data_checksum') or 'unknown'}-{info.get('hash') or 'unknown'}"[:DIGEST_CHARS]
            if (name, digest) in have:
                continue
            profile = {"images": info.get("images"), "data_checksum": record.get("data_checksum"),
                       "split_hash": info.get("hash"), "split": record.get("split")}
            ds = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": record.get("source")}),
                         profile=json.dumps(profile))
            todo.append(DatasetInput(ds, [InputTag("mlflow.data.context", part)]))
        if todo:
            self.client.log_inputs(run_id, datasets=todo)

    def log_eval_tables(self, run_id: str, folder: Path, prefix: str = "test") -> None:
        """Per-class accuracy and the most-confused pairs (files `write_eval_artifacts` wrote) as MLflow
        tables, once per run (MLflow appends to a table logged again)."""
        import pandas as pd

        folder = Path(folder)
        have = {a.path for a in self.client.list_artifacts(run_id, "tables")}
        per_class, confused = folder / f"{prefix}_per_class.csv", folder / f"{prefix}_most_confused.json"
        if per_class.is_file() and f"tables/{prefix}_per_class_accuracy.json" not in have:
            self.client.log_table(run_id, pd.read_csv(per_class), f"tables/{prefix}_per_class_accuracy.json")
        if confused.is_file() and f"tables/{prefix}_most_confused.json" not in have:
            rows = json.loads(confused.read_text())
            if rows:
                self.client.log_table(run_id, pd.DataFrame(rows), f"tables/{prefix}_most_confused.json")

    def log_images(self, run_id: str, images: dict[str, Path], step: int = 0) -> None:
        """PNG files as the run's images under `key` (the UI's image charts), once per key and step."""
        from PIL import Image

        have = {a.path.rsplit("/", 1)[-1].split("+timestamp+")[0] for a in self.client.list_artifacts(run_id, "images")}
        for key, path in images.items():
            if Path(path).is_file() and f"{key.replace('/', '~')}+step+{step}" not in have:
                with Image.open(path) as im:
                    self.client.log_image(run_id, im.convert("RGB"), key=key, step=step)


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


def log_run_views(tracker: StudyTracker, run_id: str, run_dir: Path) -> None:
    """What the UI shows of a `fit` run beside its files: the splits as dataset inputs, per-class accuracy
    and the most-confused pairs as tables, the test confusion matrix as an image (at the last epoch)."""
    run_dir = Path(run_dir)
    if (run_dir / "datasets.json").is_file():
        tracker.log_datasets(run_id, json.loads((run_dir / "datasets.json").read_text()))
    tracker.log_eval_tables(run_id, run_dir, "test")
    epochs = 0
    if (run_dir / "metrics.json").is_file():
        epochs = len(json.loads((run_dir / "metrics.json").read_text()).get("history") or [])
    tracker.log_images(run_id, {"test/confusion": run_dir / "test_confusion.png"}, step=epochs)
