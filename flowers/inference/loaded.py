"""A model ready for inference (`LoadedModel`) and the loader of torch checkpoints.

Kept apart from `predict` so the loaders of other kinds (`onnx_models`, `ensemble_model`)
can build a `LoadedModel` without importing the dispatcher that imports them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image

from flowers.data.transforms import Normalize, Preprocessing, eval_transform, resize_crop
from flowers.models.checkpoint import load_checkpoint, model_from_checkpoint, model_from_folder

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


class TorchProbModel(torch.nn.Module):
    """Normalize + network: takes the uint8 batch that the shared preprocessing makes."""

    def __init__(self, net: torch.nn.Module, pp: Preprocessing) -> None:
        super().__init__()
        self.norm = Normalize(pp.mean, pp.std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


def load_torch_checkpoint(path: Path, manifest: dict, device: str, threads: int | None = None) -> LoadedModel:
    """Loader for manifest kind `checkpoint`: `model.safetensors` + manifest (registered models),
    or a training checkpoint (`best.pt`, read with `weights_only=True`). `threads` is unused: torch's
    thread count is per process (`flowers.runtime.configure_torch_threads`)."""
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
