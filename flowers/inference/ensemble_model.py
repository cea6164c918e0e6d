"""Loading an L4 ensemble folder for inference: soft voting over members, one input view per
distinct member preprocessing. Building one (and the diversity analysis) is training's job:
`flowers.training.ensemble`."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from flowers.data.transforms import Preprocessing
from flowers.inference.loaded import Batch, LoadedModel, load_torch_checkpoint
from flowers.inference.onnx_models import load_onnx
from flowers.models.checkpoint import ModelLoadError, locate_model

REGISTERED_NAME = "flowers-ensemble"

# an ensemble's members are single networks: a torch checkpoint or an exported ONNX model
MEMBER_LOADERS = {"checkpoint": load_torch_checkpoint, "onnx": load_onnx}


def soft_vote(member_probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of member probability matrices (weights are normalized to sum to 1)."""
    if not len(member_probs):
        raise ValueError("soft_vote needs at least one member")
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in member_probs])
    w = np.ones(len(stack)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(stack),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"ensemble weights must be {len(stack)} non-negative numbers with a positive sum, got {list(w)}")
    return np.tensordot(w / w.sum(), stack, axes=1).astype(np.float32)


def member_views(preprocessings: Sequence[Preprocessing]) -> tuple[list[Preprocessing], list[int]]:
    """Distinct preprocessings (the ensemble's input views) and each member's view index."""
    views: list[Preprocessing] = []
    index = []
    for pp in preprocessings:
        if pp not in views:
            views.append(pp)
        index.append(views.index(pp))
    return views, index


def _view(x: Batch, i: int) -> torch.Tensor:
    return x[i] if isinstance(x, tuple) else x


class EnsembleModule(torch.nn.Module):
    """uint8 views → log of the weighted mean member probability (softmax of it = the vote)."""

    def __init__(self, modules: Sequence[torch.nn.Module], view_index: Sequence[int], weights: Sequence[float]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(modules)
        self.view_index = list(view_index)
        w = torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w / w.sum(), persistent=False)

    def forward(self, *views: torch.Tensor) -> torch.Tensor:
        total = 0
        for w, m, v in zip(self.weights, self.members, self.view_index):
            total = total + w * torch.softmax(m(views[v]).float(), 1)
        return torch.log(total.clamp_min(1e-12))


def load_members(path: Path, manifest: dict, device: str = "cpu") -> list[tuple[str, LoadedModel]]:
    """(name, model) for each member of an ensemble folder."""
    path = Path(path)
    out = []
    for m in manifest["members"]:
        kind, target, member_manifest = locate_model(path / m["file"])
        if kind not in MEMBER_LOADERS:
            raise ModelLoadError(f"ensemble member {m['file']} in {path} is a '{kind}'; members are checkpoints or ONNX models")
        loaded = MEMBER_LOADERS[kind](target, member_manifest, device)
        if list(loaded.class_names) != list(manifest["class_names"]):
            raise ModelLoadError(f"ensemble member {m['file']} in {path} does not match the ensemble's class names")
        out.append((m["name"], loaded))
    return out


def load_ensemble(path: Path, manifest: dict, device: str) -> LoadedModel:
    """Loader for manifest kind `ensemble` (`flowers.inference.predict.LOADERS`)."""
    path = Path(path)
    if not manifest.get("members"):
        raise ModelLoadError(f"the ensemble manifest in {path} lists no members")
    members = load_members(path, manifest, device)
    weights = manifest.get("weights") or [1.0] * len(members)
    views, index = member_views([m.preprocessing for _, m in members])
    fns = [(m.predict_proba, v) for (_, m), v in zip(members, index)]

    def proba(x: Batch) -> np.ndarray:
        return soft_vote([fn(_view(x, v)) for fn, v in fns], weights)

    module = None
    if all(m.module is not None for _, m in members):
        module = EnsembleModule([m.module for _, m in members], index, weights).eval()
    meta = {k: v for k, v in manifest.items() if k not in ("file", "class_names", "preprocessing", "views")}
    return LoadedModel(proba, views[0], list(manifest["class_names"]), manifest.get("name", REGISTERED_NAME),
                       version=manifest.get("version"), meta=meta, module=module, source=str(path), views=views)
