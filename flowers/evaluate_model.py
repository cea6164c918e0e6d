"""Evaluate any loaded model (checkpoint, ensemble, exported student) on a dataset split."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from flowers import config as C
from flowers.evaluate import write_eval_artifacts
from flowers.predict import LoadedModel, load_model

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


def probabilities(model: LoadedModel, dataset, batch_size: int = 64, workers: int = 2, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Run `model.predict_proba` over a LabeledImages dataset (eval transform)."""
    from flowers.train import _bar

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    probs, labels = [], []
    for x, y, _ in _bar(loader, progress, desc="eval"):
        probs.append(model.predict_proba(x))
        labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def evaluate_uri(uri: str, split: str = "test", data_root: str | None = None, config_path: str | None = None,
                 out_dir: Path = Path("eval"), workers: int = 2) -> dict[str, Any]:
    """Metrics and artifacts of `uri` on one split of the data it was trained on."""
    from flowers.train import build_data

    model = load_model(uri)
    data_cfg = data_config_for(model, config_path, data_root)
    data = build_data(data_cfg, model.preprocessing)
    dataset = data.eval_part(split)
    if list(model.class_names) != list(data.class_names):
        raise C.ConfigError(f"model has {len(model.class_names)} classes but the data has {len(data.class_names)}; "
                            "evaluate on the dataset the model was trained on")
    torch.set_grad_enabled(False)
    probs, labels = probabilities(model, dataset, data_cfg.eval_batch_size, workers)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, _ = write_eval_artifacts(probs, labels, data.class_names, out_dir, prefix=split)
    summary = {"model": model.name, "version": model.version, "split": split, "data": data.source,
               **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    (out_dir / f"{split}_metrics.json").write_text(json.dumps(summary, indent=2))
    return summary
