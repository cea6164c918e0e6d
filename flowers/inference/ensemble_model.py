"""Loading an L4 ensemble folder for inference: soft voting over members, one input view per
distinct member preprocessing. Building one (and the diversity analysis) is training's job:
`flowers.training.ensemble`; fusing it into one ONNX graph, `flowers.inference.fused_ensemble`.

With a fused graph in the folder (manifest entry `fused`, nested folder `fused/`) the loader
predicts with it (one ONNX Runtime session, INT8 where that kept the accuracy) and loads the
torch members only when something asks for `module` (Grad-CAM, a distillation teacher's trunk).
A fused graph that is missing, changed, unreadable, of other views, or INT8 that could saturate on
this CPU is skipped with one warning: the members serve, as without one.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from flowers.data.transforms import Preprocessing
from flowers.inference.loaded import Batch, LoadedModel, load_torch_checkpoint
from flowers.inference.onnx_models import cpu_flags, int8_weight_check, load_onnx, saturation_warning
from flowers.models.checkpoint import ModelLoadError, locate_model, read_manifest, verify_folder

log = logging.getLogger(__name__)

REGISTERED_NAME = "flowers-ensemble"
FUSED_DIR = "fused"  # the nested model folder holding the ensemble as one ONNX graph

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
    return x[i] if isinstance(x, (tuple, list)) else x  # a DataLoader collates a tuple of views into a list


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


def load_members(path: Path, manifest: dict, device: str = "cpu",
                 threads: int | None = None) -> list[tuple[str, LoadedModel]]:
    """(name, model) for each member of an ensemble folder."""
    path = Path(path)
    out = []
    for m in manifest["members"]:
        kind, target, member_manifest = locate_model(path / m["file"])
        if kind not in MEMBER_LOADERS:
            raise ModelLoadError(f"ensemble member {m['file']} in {path} is a '{kind}'; members are checkpoints or ONNX models")
        loaded = MEMBER_LOADERS[kind](target, member_manifest, device, threads)
        if list(loaded.class_names) != list(manifest["class_names"]):
            raise ModelLoadError(f"ensemble member {m['file']} in {path} does not match the ensemble's class names")
        out.append((m["name"], loaded))
    return out


class FusedLoadedModel(LoadedModel):
    """An ensemble served by its fused graph; `module` (the members' EnsembleModule) loads on first use."""

    def __init__(self, *args: Any, members_module: Callable[[], torch.nn.Module | None], **kwargs: Any) -> None:
        self._make_module, self._module, self._lock = members_module, None, threading.Lock()
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def module(self) -> torch.nn.Module | None:
        with self._lock:
            if self._module is None and self._make_module is not None:
                self._module, self._make_module = self._make_module(), None
        return self._module

    @module.setter
    def module(self, value: torch.nn.Module | None) -> None:
        self._module = value

    def __repr__(self) -> str:  # the dataclass repr would load the members
        return f"FusedLoadedModel(name={self.name!r}, source={self.source!r}, serving={self.meta.get('serving')!r})"


def load_fused(path: Path, manifest: dict, views: Sequence[Preprocessing] | None = None,
               threads: int | None = None) -> LoadedModel | None:
    """The ensemble's fused graph when it is there and valid for this CPU, else None (one warning)."""
    entry = manifest.get("fused")
    if not entry:
        return None
    fused = Path(path) / entry.get("folder", FUSED_DIR)
    try:
        fm = read_manifest(fused)
        verify_folder(fused, fm)  # the nested folder checksums its own graphs
        file = fm["file"]
        cpu = cpu_flags()
        if saturation_warning(fused / file, int8_weight_check(fused / file), cpu):
            log.warning("fused ensemble %s: %s can saturate on this CPU; serving its fp32 graph", fused, file)
            file = fm["files"]["fp32"]
        loaded = load_onnx(fused / file, {**fm, "file": file}, "cpu", threads)
        if views is not None and list(loaded.views) != list(views):
            raise ModelLoadError(f"its views {[v.to_dict() for v in loaded.views]} are not the members'")
        if list(loaded.class_names) != list(manifest["class_names"]):
            raise ModelLoadError("its class names are not the ensemble's")
        return loaded
    except Exception as e:  # any broken fused graph: the members still serve
        log.warning("fused ensemble graph in %s not used (%s); serving the %d members instead", fused,
                    str(e).splitlines()[0] if str(e) else type(e).__name__, len(manifest.get("members") or []))
        return None


def _members_module(path: Path, manifest: dict, device: str,
                    threads: int | None = None) -> Callable[[], torch.nn.Module | None]:
    def make() -> torch.nn.Module | None:
        members = load_members(path, manifest, device, threads)
        if not all(m.module is not None for _, m in members):
            return None
        _, index = member_views([m.preprocessing for _, m in members])
        weights = manifest.get("weights") or [1.0] * len(members)
        return EnsembleModule([m.module for _, m in members], index, weights).eval()
    return make


def load_ensemble(path: Path, manifest: dict, device: str, threads: int | None = None,
                  fused: bool = True) -> LoadedModel:
    """Loader for manifest kind `ensemble` (`flowers.inference.predict.LOADERS`).

    On the CPU the fused graph serves when the folder has a valid one (`fused=False`: always the members)."""
    path = Path(path)
    if not manifest.get("members"):
        raise ModelLoadError(f"the ensemble manifest in {path} lists no members")
    meta = {k: v for k, v in manifest.items() if k not in ("file", "class_names", "preprocessing", "views")}
    views = [Preprocessing.from_dict(v) for v in manifest.get("views") or [manifest["preprocessing"]]]
    graph = load_fused(path, manifest, views, threads) if fused and device == "cpu" else None
    if graph is not None:
        meta["serving"] = f"fused-{manifest['fused'].get('variant')}"
        meta["fused_file"] = graph.source
        return FusedLoadedModel(graph.predict_proba, views[0], list(manifest["class_names"]),
                                manifest.get("name", REGISTERED_NAME), version=manifest.get("version"), meta=meta,
                                source=str(path), views=views, members_module=_members_module(path, manifest, device, threads))
    members = load_members(path, manifest, device, threads)
    weights = manifest.get("weights") or [1.0] * len(members)
    views, index = member_views([m.preprocessing for _, m in members])
    fns = [(m.predict_proba, v) for (_, m), v in zip(members, index)]

    def proba(x: Batch) -> np.ndarray:
        return soft_vote([fn(_view(x, v)) for fn, v in fns], weights)

    module = None
    if all(m.module is not None for _, m in members):
        module = EnsembleModule([m.module for _, m in members], index, weights).eval()
    meta["serving"] = "members"
    return LoadedModel(proba, views[0], list(manifest["class_names"]), manifest.get("name", REGISTERED_NAME),
                       version=manifest.get("version"), meta=meta, module=module, source=str(path), views=views)
