"""Evaluate any loaded model (checkpoint, ensemble, exported student) on a dataset split."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flowers import config as C
from flowers.data.bundle import build_data
from flowers.evaluate import write_eval_artifacts
from flowers.predict import LoadedModel, load_model, predict_dataset

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
