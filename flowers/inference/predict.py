"""Load any flowers model and predict: the one inference path.

`load_model(ref)` takes a `flowers.registry.uris.ModelRef` (resolved once, at the edge) or a
URI/path it resolves itself, fetches the files and calls the loader registered for the
manifest's kind; `predict_dataset` runs a model over a dataset (validation, evaluation,
teacher caching, the L4/L5 stages); `Predictor` turns bytes/paths into top-k results
(serving and batch scoring).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from flowers.data import ImageDecodeError, open_image
from flowers.inference.ensemble_model import load_ensemble
from flowers.inference.loaded import Batch, LoadedModel, TorchProbModel, collate, load_torch_checkpoint
from flowers.inference.onnx_models import load_onnx
from flowers.inference.uncertainty import flags, temperature_scale
from flowers.models.checkpoint import ModelLoadError, locate_model
from flowers.registry.uris import ModelRef, TrackingTarget, fetch, resolve_ref
from flowers.runtime import progress_bar

# re-exported: callers build and type against these through the one inference module
__all__ = ["Batch", "LoadedModel", "TorchProbModel", "collate", "load_torch_checkpoint", "LOADERS", "load_model",
           "predict_dataset", "Predictor"]

log = logging.getLogger(__name__)

DEFAULT_UNCERTAINTY_THRESHOLD = 0.5

def predict_dataset(predict_proba: Callable[[Batch], np.ndarray], data: Any, *, batch_size: int = 64,
                    workers: int = 0, progress: bool = False, max_batches: int | None = None,
                    desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """The one inference loop: probabilities and labels over a dataset or loader of (x, y, idx).

    Used by per-epoch validation, evaluation, teacher caching and the L4/L5 stages. Runs
    under `torch.inference_mode()`, which is scoped to this call (no process-wide switch).
    """
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False,
                                                                  num_workers=workers)
    n = len(loader) if max_batches is None else min(len(loader), max_batches)
    probs, labels = [], []
    with torch.inference_mode():
        for i, (x, y, _) in enumerate(progress_bar(loader, progress, total=n, desc=desc)):
            if i >= n:
                break
            probs.append(np.asarray(predict_proba(x), dtype=np.float32))
            labels.append(np.asarray(y))
    if not probs:
        raise ValueError("predict_dataset: the dataset is empty")
    return np.concatenate(probs), np.concatenate(labels)


# the loader of each manifest kind, by the function that loads it
LOADERS: dict[str, Callable[[Path, dict, str, int | None], LoadedModel]] = {
    "checkpoint": load_torch_checkpoint,
    "ensemble": load_ensemble,
    "onnx": load_onnx,
}


def load_model(ref: ModelRef | str | Path, device: str = "cpu", target: TrackingTarget | None = None,
               threads: int | None = None) -> LoadedModel:
    """The one way to load a model for inference.

    Give it the `ModelRef` the edge resolved: it fetches the files and loads them, with no
    registry call. A URI or path is resolved here first (`resolve_ref`, against `target`).
    `threads`: the intra-op threads of its ONNX Runtime sessions (default: this process's CPU share,
    `flowers.runtime.cpu_share`); torch's threads are process-wide (`configure_torch_threads`).
    """
    ref = resolve_ref(ref, target)
    path = fetch(ref)
    kind, target_file, manifest = locate_model(path, manifest=ref.manifest or None)
    if kind not in LOADERS:
        raise ModelLoadError(f"unknown model kind '{kind}' in the model manifest (known: {', '.join(LOADERS)})")
    try:
        loaded = LOADERS[kind](target_file, manifest, device, threads)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load model from '{ref.uri}' ({kind}): {e}") from e
    if ref.name:
        loaded.name = ref.name
    loaded.version = ref.version or manifest.get("version") or loaded.version
    loaded.meta.update({"alias": ref.alias, "run_id": ref.run_id, "pinned": ref.pinned} if ref.name else {})
    loaded.source = ref.uri
    return loaded


# ----------------------------------------------------------------------------- predictor


class Predictor:
    """Bytes/paths/PIL images → top-k labels, probabilities, entropy and the uncertain flag."""

    def __init__(self, model: LoadedModel, threshold: float | None = None) -> None:
        self.model = model
        self.transform = model.transform()
        thr = threshold if threshold is not None else model.meta.get("uncertainty_threshold")
        self.threshold = float(thr) if thr is not None else DEFAULT_UNCERTAINTY_THRESHOLD
        # the temperature fitted on validation with the threshold (flowers.inference.uncertainty); 1: none stored
        self.temperature = float(model.meta.get("uncertainty_temperature") or 1.0)

    @classmethod
    def from_ref(cls, ref: ModelRef | str | Path, device: str = "cpu", threshold: float | None = None,
                 target: TrackingTarget | None = None, threads: int | None = None) -> "Predictor":
        """A predictor for a resolved `ModelRef` (or a URI/path, resolved here against `target`)."""
        return cls(load_model(ref, device, target, threads), threshold)

    from_uri = from_ref  # the same entry point under the name callers with a URI use

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def load_image(self, src: bytes | str | Path | Image.Image) -> Batch:
        """Decode (JPEG draft mode) and apply the model's eval preprocessing → uint8 3×S×S (per view)."""
        img = src if isinstance(src, Image.Image) else open_image(src, draft_size=self.model.draft_size)
        return self.transform(img.convert("RGB"))

    def predict_proba(self, batch: Batch) -> np.ndarray:
        return self.model.predict_proba(batch)

    def format(self, probs: np.ndarray, top_k: int = 5) -> list[dict[str, Any]]:
        """One result dict per probability row."""
        k = max(1, min(top_k, probs.shape[1]))
        probs = temperature_scale(probs, self.temperature)
        ent, flagged = flags(probs, self.threshold)
        order = np.argsort(-probs, axis=1)[:, :k]
        names = self.model.class_names
        out = []
        for row, idx, h, f in zip(probs, order, ent, flagged):
            out.append({
                "label": int(idx[0]),
                "name": names[idx[0]],
                "confidence": float(row[idx[0]]),
                "top_k": [{"label": int(i), "name": names[i], "probability": float(row[i])} for i in idx],
                "entropy": float(h),
                "uncertain": bool(f),
            })
        return out

    def predict(self, sources: Sequence[bytes | str | Path | Image.Image], top_k: int = 5) -> list[dict[str, Any]]:
        """Predict a batch; an item that fails to decode becomes {'error': message}, the rest still run."""
        tensors, ok, results = [], [], [None] * len(sources)
        for i, src in enumerate(sources):
            try:
                tensors.append(self.load_image(src))
                ok.append(i)
            except ImageDecodeError as e:
                results[i] = {"error": str(e)}
        if tensors:
            for i, r in zip(ok, self.format(self.predict_proba(collate(tensors)), top_k)):
                results[i] = r
        return results  # type: ignore[return-value]
