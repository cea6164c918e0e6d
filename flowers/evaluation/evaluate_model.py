"""Evaluate any loaded model (checkpoint, ensemble, exported student) on a dataset split."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flowers import config as C
from flowers.data.bundle import build_data
from flowers.evaluation.metrics import write_eval_artifacts
from flowers.inference.predict import LoadedModel, load_model, predict_dataset

log = logging.getLogger(__name__)


def data_config_for(model: LoadedModel, config_path: str | None, data_root: str | None) -> C.DataConfig:
    """The data settings a model was trained with (or the given config), with an optional new root."""
    if config_path:
        data_cfg = C.load_config(config_path).data
    elif model.meta.get("config"):
        data_cfg = C.build(C.Config, model.meta["config"]).data
    else:
        raise C.ConfigError(f"model '{model.source}' carries no data config; pass --config with the data section to use")
    return C.replace(data_cfg, {"root": data_root}) if data_root else data_cfg


def evaluate_uri(uri: str, split: str = "test", data_root: str | None = None, config_path: str | None = None,
                 out_dir: Path = Path("eval"), workers: int = 2) -> dict[str, Any]:
    """Metrics and artifacts of `uri` on one split of the data it was trained on."""
    model = load_model(uri)
    data_cfg = data_config_for(model, config_path, data_root)
    data = build_data(data_cfg, model.preprocessing)
    dataset = data.eval_part(split, model.transform(), model.draft_size)  # the model's own views
    if list(model.class_names) != list(data.class_names):
        raise C.ConfigError(f"model has {len(model.class_names)} classes but the data has {len(data.class_names)}; "
                            "evaluate on the dataset the model was trained on")
    probs, labels = predict_dataset(model.predict_proba, dataset, batch_size=data_cfg.eval_batch_size,
                                    workers=workers, progress=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, _ = write_eval_artifacts(probs, labels, data.class_names, out_dir, prefix=split)
    summary = {"model": model.name, "version": model.version, "split": split, "data": data.source,
               **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    (out_dir / f"{split}_metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def model_name_for(uri: str) -> str:
    """A short table name for a URI: the registered name, else the file or folder name."""
    text = str(uri)
    if text.startswith("models:/"):
        return text[len("models:/"):].split("@")[0].split("/")[0]
    return Path(text.rstrip("/")).name or text


def evaluate_shifts(uri: str, shifts, data_root: str | None = None, config_path: str | None = None,
                    out_dir: Path = Path("eval"), per_class: int | None = None, seed: int = 0,
                    experiment: str | None = None, tracking_uri: str | None = None):
    """The shift suite for one model URI (an ensemble with its members), optionally logged to MLflow
    as one run of `experiment`, after everything has been scored and written."""
    from flowers.evaluation.robustness import run_shift_suite

    model = load_model(uri)  # fail early (bad URI, missing data config) before any scoring
    data_cfg = data_config_for(model, config_path, data_root)
    name = model_name_for(uri)
    report = run_shift_suite({name: str(uri)}, shifts, data_cfg, Path(out_dir), per_class=per_class, seed=seed,
                             progress=True)
    if experiment:
        log_suite(report, experiment, tracking_uri, {"model_uri": str(uri), "shifts": ",".join(s.label for s in shifts),
                                                     "per_class": per_class, "seed": seed})
    return report


def log_suite(report, experiment: str, tracking_uri: str | None, params: dict[str, Any]) -> str:
    """One MLflow run with the suite's params, each model's metrics (prefixed by its name) and files."""
    from flowers.registry import uris as registry
    from flowers.registry import tracking as T

    target = T.configure(registry.resolve_target(tracking_uri))
    client = registry.client(target.tracking_uri)
    exp_id = T.experiment_id(experiment, target)
    run = client.create_run(exp_id, tags={"mlflow.runName": "shift-suite", "flowers.role": "robustness"})
    for k, v in params.items():
        client.log_param(run.info.run_id, k, "" if v is None else str(v))
    for model, metrics in report.metrics.items():
        for k, v in metrics.items():
            client.log_metric(run.info.run_id, f"{model.replace('/', '_')}.{k}", float(v))
    for f in report.files:
        client.log_artifact(run.info.run_id, str(f), "shifts")
    client.set_terminated(run.info.run_id, "FINISHED")
    log.info("shift suite logged to MLflow run %s (experiment %s)", run.info.run_id, experiment)
    return run.info.run_id
