"""Load any flowers model by URI and predict: the one inference path.

`load_model(uri)` resolves the URI (`flowers.registry.uris.resolve`) and picks the loader the
manifest names; `predict_dataset` runs a model over a dataset (validation, evaluation,
teacher caching, the L4/L5 stages); `Predictor` turns bytes/paths into top-k results
(serving and batch scoring).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from flowers.registry import uris as registry
from flowers.models.checkpoint import (ModelLoadError, find_manifest, load_checkpoint, locate_model, model_from_checkpoint,
                                model_from_folder, sha256_file)
from flowers.data import ImageDecodeError, open_image
from flowers.data.transforms import Normalize, Preprocessing, eval_transform, resize_crop
from flowers.runtime import progress_bar
from flowers.inference.uncertainty import flags, temperature_scale

log = logging.getLogger(__name__)

DEFAULT_UNCERTAINTY_THRESHOLD = 0.5

# One uint8 NCHW batch per view the model needs (a tuple when it needs several).
Batch = Union[torch.Tensor, tuple[torch.Tensor, ...]]


@dataclass
class LoadedModel:
    """A model ready for inference: uint8 NCHW batch (one per view) in, probabilities out.

    `views` are the eval preprocessings the model needs, one per distinct input: a single
    network has one (its own `preprocessing`); an ensemble of members trained at different
    sizes has one per size, so each member sees exactly its own eval preprocessing.
    """

    predict_proba: Callable[[Batch], np.ndarray]
    preprocessing: Preprocessing
    class_names: list[str]
    name: str
    version: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    module: torch.nn.Module | None = None  # uint8 → logits, when the model is a torch module
    source: str = ""
    views: list[Preprocessing] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.views:
            self.views = [self.preprocessing]

    @property
    def draft_size(self) -> int:
        """JPEG draft-decode size that serves every view."""
        return max(v.resize_size for v in self.views)

    def transform(self) -> Callable[[Image.Image], Batch]:
        """PIL image → this model's input: its eval preprocessing per view."""
        tfs = [eval_transform(v) for v in self.views]
        if len(tfs) == 1:
            return tfs[0]
        return lambda img: tuple(tf(img) for tf in tfs)

    def from_pixels(self, images: torch.Tensor) -> Batch:
        """uint8 N×3×H×W images → this model's input, view by view: each view's eval resize and
        centre crop. Images already at a view's input size are taken as that view unchanged (an
        augmented crop handed to an online teacher of the same size stays exactly the same pixels)."""
        xs = tuple(images if images.shape[-2:] == (v.image_size, v.image_size) else resize_crop(v)(images)
                   for v in self.views)
        return xs[0] if len(xs) == 1 else xs

    def example_batch(self, n: int = 1, seed: int = 0) -> Batch:
        """Random uint8 input of the right shapes (warm-up, latency)."""
        g = torch.Generator().manual_seed(seed)
        xs = tuple(torch.randint(0, 256, (n, 3, v.image_size, v.image_size), generator=g, dtype=torch.uint8)
                   for v in self.views)
        return xs[0] if len(xs) == 1 else xs


def collate(items: Sequence[Batch]) -> Batch:
    """Stack single-image inputs (tensors, or per-view tuples) into one batch."""
    if isinstance(items[0], tuple):
        return tuple(torch.stack(col) for col in zip(*items))
    return torch.stack(list(items))


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


class TorchProbModel(torch.nn.Module):
    """Normalize + network: takes the uint8 batch that the shared preprocessing makes."""

    def __init__(self, net: torch.nn.Module, pp: Preprocessing) -> None:
        super().__init__()
        self.norm = Normalize(pp.mean, pp.std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


# ----------------------------------------------------------------------------- loaders


def load_torch_checkpoint(path: Path, manifest: dict, device: str) -> LoadedModel:
    """Loader for manifest kind `checkpoint`: `model.safetensors` + manifest (registered models),
    or a training checkpoint (`best.pt`, read with `weights_only=True`)."""
    if Path(path).suffix == ".safetensors":
        # a model folder: weights from safetensors, everything else from the (verified) manifest
        ckpt = {"model_name": manifest["model_name"], "class_names": manifest["class_names"],
                "preprocessing": manifest["preprocessing"], "config": manifest.get("config") or {},
                "test_metrics": manifest.get("test_metrics") or {"top1": manifest.get("test_accuracy")},
                "uncertainty_threshold": manifest.get("uncertainty_threshold")}
        net = model_from_folder(path, manifest)
    else:
        ckpt = load_checkpoint(path, device)
        net = model_from_checkpoint(ckpt)
    pp = Preprocessing.from_dict(ckpt["preprocessing"])
    # channels_last lets oneDNN pick its blocked conv kernels (measured: README performance table)
    module = TorchProbModel(net, pp).to(device, memory_format=torch.channels_last).eval()

    @torch.inference_mode()
    def proba(x: torch.Tensor) -> np.ndarray:
        return torch.softmax(module(x.to(device, memory_format=torch.channels_last)).float(), 1).cpu().numpy()

    test = ckpt.get("test_metrics", {})
    meta = {"kind": "checkpoint", "model_name": ckpt["model_name"], "level": ckpt["config"].get("level"),
            "test_accuracy": test.get("top1"), "config": ckpt["config"], **{k: v for k, v in manifest.items() if k not in ("kind", "file", "class_names", "preprocessing")}}
    meta.setdefault("uncertainty_threshold", ckpt.get("uncertainty_threshold"))
    return LoadedModel(proba, pp, list(ckpt["class_names"]), manifest.get("name", ckpt["config"].get("level", path.stem)),
                       meta=meta, module=module, source=str(path))


# kind → "module:function"; modules import lazily so the predictor stays light
LOADERS: dict[str, str] = {
    "checkpoint": "flowers.inference.predict:load_torch_checkpoint",
    "ensemble": "flowers.training.ensemble:load_ensemble",
    "onnx": "flowers.inference.onnx_models:load_onnx",
}


def _loader(kind: str) -> Callable[[Path, dict, str], LoadedModel]:
    if kind not in LOADERS:
        raise ModelLoadError(f"unknown model kind '{kind}' in the model manifest (known: {', '.join(LOADERS)})")
    mod, fn = LOADERS[kind].split(":")
    return getattr(importlib.import_module(mod), fn)


def load_model(uri: str | Path, device: str = "cpu") -> LoadedModel:
    """The one way to load a model for inference."""
    resolved = registry.resolve(uri)
    if resolved.manifest_sha256:
        # the registry pinned this version's manifest when it was registered: a rewritten one is refused
        found = find_manifest(resolved.path)
        if found is None or sha256_file(found) != resolved.manifest_sha256:
            raise ModelLoadError(f"model '{uri}': its manifest does not match the checksum the registry recorded "
                                 "for this version; the artifacts were changed after registration, refusing them")
    kind, target, manifest = locate_model(resolved.path)
    try:
        loaded = _loader(kind)(target, manifest, device)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load model from '{uri}' ({kind}): {e}") from e
    if resolved.name:
        loaded.name = resolved.name
    loaded.version = resolved.version or manifest.get("version") or loaded.version
    loaded.meta.update({"alias": resolved.alias, "run_id": resolved.run_id} if resolved.name else {})
    loaded.source = str(uri)
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
    def from_uri(cls, uri: str | Path, device: str = "cpu", threshold: float | None = None) -> "Predictor":
        return cls(load_model(uri, device), threshold)

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
