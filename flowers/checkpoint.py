"""The one checkpoint format and the one model manifest.

A training checkpoint (`best.pt`, `last.pt`) is a dict with the model state, optimizer,
scheduler, epoch, the resolved config, class names and preprocessing (torchvision
references style). A model folder (registered versions, ensembles, exported students)
holds `flowers_model.json`, the manifest that says which loader reads it:

    {"kind": "checkpoint" | "ensemble" | "onnx", "file": "...", "name": ..., ...}

Everything that writes or reads either of them goes through this module.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowers.models import build_model

CHECKPOINT_FORMAT = "flowers.checkpoint/1"
MANIFEST = "flowers_model.json"
MODEL_KINDS = ("checkpoint", "ensemble", "onnx")


class ModelLoadError(RuntimeError):
    """A model URI or file that cannot be resolved or loaded; the message says what to do."""


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write atomically so a crash mid-save never leaves a truncated checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a flowers checkpoint; FileNotFoundError / ValueError say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a flowers checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """Rebuild the network from a checkpoint dict (no pretrained download), in eval mode."""
    net = build_model(ckpt["model_name"], num_classes=len(ckpt["class_names"]), pretrained=False,
                      dropout=ckpt.get("dropout", 0.0))
    net.load_state_dict(ckpt["model"])
    return net.eval()


def checkpoint_fields(ckpt: dict) -> dict[str, Any]:
    """What a manifest records about a checkpoint, so the registry can describe it without loading it."""
    return {"name": ckpt["config"].get("level"), "model_name": ckpt["model_name"],
            "class_names": list(ckpt["class_names"]), "preprocessing": dict(ckpt["preprocessing"]),
            "test_accuracy": ckpt.get("test_metrics", {}).get("top1"), "config": ckpt["config"]}


# ----------------------------------------------------------------------------- manifest


def write_manifest(model_dir: str | Path, kind: str, file: str | None = None, **fields: Any) -> dict:
    """Write `model_dir/flowers_model.json` (atomically); the only writer of manifests."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind '{kind}' (known: {', '.join(MODEL_KINDS)})")
    manifest = {"kind": kind, **({"file": file} if file else {}), **fields}
    path = Path(model_dir) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)
    return manifest


def read_manifest(model_dir: str | Path) -> dict:
    """The manifest of a model folder; ModelLoadError when missing or unreadable."""
    path = Path(model_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{model_dir} holds no {MANIFEST}: not a flowers model folder") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return manifest


def update_manifest(model_dir: str | Path, **changes: Any) -> dict:
    """Rewrite some keys of a folder's manifest; returns the new manifest."""
    manifest = read_manifest(model_dir)
    manifest.update(changes)
    kind = manifest.pop("kind", "checkpoint")
    file = manifest.pop("file", None)
    return write_manifest(model_dir, kind, file, **manifest)


def find_manifest(root: str | Path, depth: int = 3) -> Path | None:
    """MLflow wraps artifacts in folders; look a few levels down for the manifest."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return root / MANIFEST
    if depth == 0 or not root.is_dir():
        return None
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        hit = find_manifest(child, depth - 1)
        if hit:
            return hit
    return None


def locate_model(path: str | Path) -> tuple[str, Path, dict]:
    """(kind, file or folder to load, manifest) for a model folder, checkpoint or .onnx file."""
    path = Path(path)
    manifest_path = find_manifest(path) if path.is_dir() else None
    if manifest_path:
        manifest = read_manifest(manifest_path.parent)
        return manifest.get("kind", "checkpoint"), manifest_path.parent / manifest.get("file", ""), manifest
    if path.is_dir() and (path / "best.pt").is_file():
        return "checkpoint", path / "best.pt", {}
    if path.is_file():
        return ("onnx" if path.suffix == ".onnx" else "checkpoint"), path, {}
    raise ModelLoadError(f"no model found in '{path}': expected {MANIFEST}, best.pt, a .pt or an .onnx file")
