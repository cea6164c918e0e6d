"""The one checkpoint format and the one model manifest.

A training checkpoint (`best.pt`, `last.pt`) is a dict with the model state, optimizer,
scheduler, epoch, the resolved config, class names and preprocessing (torchvision
references style). It is what `--resume` reads, and it is loaded with
`torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary objects.

A model folder (registered versions, ensembles, exported students) holds
`flowers_model.json`, the manifest that says which loader reads it:

    {"kind": "checkpoint" | "ensemble" | "onnx", "file": "...", "name": ..., ...,
     "format": "flowers.model/2", "sha256": {"model.safetensors": "...", ...}}

A checkpoint model folder stores only the weights, as `model.safetensors` (no pickle, no
optimizer state), next to the manifest's JSON metadata (class names, preprocessing, model
name, config, lineage). `sha256` lists every file of the folder (a sub-folder with its own
manifest, such as an ensemble member, by that manifest only, which in turn lists its files),
and loaders verify them before reading anything. `test_per_image.json` holds the model's
per-image test results (image ids, labels, predictions): the registry gate compares two
versions on it.

Everything that writes or reads either of them goes through this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # torch is imported where weights are read or written: the manifest helpers need none
    import torch
    from torch import nn

CHECKPOINT_FORMAT = "flowers.models.checkpoint/1"
MANIFEST = "flowers_model.json"
FOLDER_FORMAT = "flowers.model/2"  # manifests with per-file SHA-256 checksums
MODEL_KINDS = ("checkpoint", "ensemble", "onnx")
WEIGHTS = "model.safetensors"
PER_IMAGE = "test_per_image.json"
PER_IMAGE_FORMAT = "flowers.per_image/1"


class ModelLoadError(RuntimeError):
    """A model URI or file that cannot be resolved or loaded; the message says what to do."""


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write atomically so a crash mid-save never leaves a truncated checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    import torch

    torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a flowers checkpoint; FileNotFoundError / ValueError say what is wrong.

    `weights_only=True`: torch's restricted unpickler builds tensors and plain containers
    only, so a file carrying a pickle payload is refused instead of run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    import torch

    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(f"refusing to load {path}: it is not a plain flowers checkpoint (loading it would "
                             f"need to run code: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a flowers checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """Rebuild the network from a checkpoint dict (no pretrained download), in eval mode."""
    from flowers.models.nets import build_model

    net = build_model(ckpt["model_name"], num_classes=len(ckpt["class_names"]), pretrained=False,
                      dropout=ckpt.get("dropout", 0.0))
    net.load_state_dict(ckpt["model"])
    return net.eval()


def checkpoint_fields(ckpt: dict) -> dict[str, Any]:
    """What a manifest records about a checkpoint, so the registry can describe it without loading it."""
    return {"name": ckpt["config"].get("level"), "model_name": ckpt["model_name"],
            "class_names": list(ckpt["class_names"]), "preprocessing": dict(ckpt["preprocessing"]),
            "test_accuracy": ckpt.get("test_metrics", {}).get("top1"), "config": ckpt["config"],
            "dropout": ckpt.get("dropout", 0.0), "task": ckpt.get("task"),
            "test_metrics": dict(ckpt.get("test_metrics", {})), "lineage": dict(ckpt.get("lineage") or {}),
            "uncertainty_threshold": ckpt.get("uncertainty_threshold")}


def write_checkpoint_folder(ckpt: dict, out_dir: str | Path, **fields: Any) -> Path:
    """A training checkpoint → a model folder: `model.safetensors` (weights only), its per-image
    test results, and the manifest (metadata + checksums). Returns the folder."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage; loading re-ties nothing we rely on
    state = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt["model"].items()}
    tmp = out_dir / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": FOLDER_FORMAT, "model_name": str(ckpt["model_name"])})
    os.replace(tmp, out_dir / WEIGHTS)
    if ckpt.get("test_per_image"):
        write_json(out_dir / PER_IMAGE, ckpt["test_per_image"])
    write_manifest(out_dir, "checkpoint", WEIGHTS, **{**checkpoint_fields(ckpt), **fields})
    return out_dir


def model_from_folder(weights: str | Path, manifest: dict) -> nn.Module:
    """Rebuild the network of a checkpoint model folder from `model.safetensors` + manifest, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read weights {weights}: {e}") from None
    from flowers.models.nets import build_model

    net = build_model(manifest["model_name"], num_classes=len(manifest["class_names"]), pretrained=False,
                      dropout=manifest.get("dropout", 0.0))
    net.load_state_dict(state)
    return net.eval()


# ----------------------------------------------------------------------------- per-image test results


def image_id(path: str | Path) -> str:
    """A stable id for a dataset image: its folder and file name (the same on every node and cache)."""
    return "/".join(Path(path).parts[-2:])


def split_hash(ids: Sequence[str]) -> str:
    """Hash of the sorted test image ids: two models with equal hashes were tested on the same images."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def dataset_checksum(paths: Sequence[str | Path], labels: Sequence[int]) -> str:
    """Cheap dataset fingerprint: SHA-256 of the sorted (image id, file size, label) of every image.

    File sizes instead of contents: stat-only, milliseconds for Flowers-102, and the same on
    every node whatever its cache folder is called.
    """
    rows = sorted(f"{image_id(p)}\t{os.path.getsize(p)}\t{int(y)}" for p, y in zip(paths, labels))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def per_image_record(paths: Sequence[str | Path], labels: Sequence[int], preds: Sequence[int]) -> dict[str, Any]:
    """Per-image test results as plain data: ids, true labels, predicted labels (and the split hash)."""
    ids = [image_id(p) for p in paths]
    if not (len(ids) == len(labels) == len(preds)):
        raise ValueError(f"per-image results: {len(ids)} ids, {len(labels)} labels, {len(preds)} predictions")
    return {"format": PER_IMAGE_FORMAT, "split_hash": split_hash(ids), "ids": ids,
            "labels": [int(x) for x in labels], "preds": [int(x) for x in preds]}


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def read_json(path: str | Path, missing: str) -> dict[str, Any]:
    """A JSON object from `path`; ModelLoadError saying `missing` when there is no file, or what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(missing) from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def read_per_image(where: str | Path) -> dict[str, Any]:
    """Per-image test results from a model folder (its PER_IMAGE file) or a record file (`*.json`);
    ModelLoadError when there are none."""
    path = Path(where) if str(where).endswith(".json") else Path(where) / PER_IMAGE
    rec = read_json(path, f"{where}: no {path.name}, so no per-image test results")
    if rec.get("format") != PER_IMAGE_FORMAT or not (len(rec["ids"]) == len(rec["labels"]) == len(rec["preds"])):
        raise ModelLoadError(f"{path} is not a flowers per-image record ({PER_IMAGE_FORMAT})")
    return rec


# ----------------------------------------------------------------------------- manifest


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksums(model_dir: str | Path) -> dict[str, str]:
    """SHA-256 of every file in a model folder (a sub-folder with its own manifest: that manifest only)."""
    root = Path(model_dir)
    out: dict[str, str] = {}

    def walk(d: Path) -> None:
        for p in sorted(d.iterdir()):
            if p.is_dir():
                if (p / MANIFEST).is_file():  # a nested model: its manifest checksums its own files
                    out[(p / MANIFEST).relative_to(root).as_posix()] = sha256_file(p / MANIFEST)
                else:
                    walk(p)
            elif p.is_file() and not (d == root and p.name == MANIFEST) and not p.name.endswith(".tmp"):
                out[p.relative_to(root).as_posix()] = sha256_file(p)

    walk(root)
    return out


def write_manifest(model_dir: str | Path, kind: str, file: str | None = None, **fields: Any) -> dict:
    """Write `model_dir/flowers_model.json` (atomically) with the checksums of the folder's files as
    they are now; the only writer of manifests. Write the manifest after the files it describes."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind '{kind}' (known: {', '.join(MODEL_KINDS)})")
    fields = {k: v for k, v in fields.items() if k not in ("format", "sha256")}
    manifest = {"kind": kind, **({"file": file} if file else {}), **fields,
                "format": FOLDER_FORMAT, "sha256": checksums(model_dir)}
    path = Path(model_dir) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)
    return manifest


def verify_folder(model_dir: str | Path, manifest: dict) -> None:
    """Check every file the manifest lists against its SHA-256 before anything is read.

    ModelLoadError when the manifest has no checksums, a listed file is missing or changed, a
    path leaves the folder, or the model file itself is not covered.
    """
    root = Path(model_dir).resolve()
    sums = manifest.get("sha256")
    if not isinstance(sums, dict) or not sums:
        raise ModelLoadError(f"{model_dir}: the model manifest lists no SHA-256 checksums (written before "
                             f"{FOLDER_FORMAT}); export or register the model again")
    for rel, want in sums.items():
        path = (root / rel).resolve()
        if root not in path.parents:
            raise ModelLoadError(f"{model_dir}: the manifest names '{rel}', outside the model folder; refusing it")
        if not path.is_file():
            raise ModelLoadError(f"{model_dir}: '{rel}' is listed in the manifest but missing")
        got = sha256_file(path)
        if got != want:
            raise ModelLoadError(f"{model_dir}: checksum mismatch for '{rel}' (SHA-256 {got[:12]}..., the manifest "
                                 f"says {str(want)[:12]}...): the artifact was changed after it was written; "
                                 "refusing to load it")
    file = manifest.get("file")
    covered = set(sums)
    if file and file not in covered and f"{file.rstrip('/')}/{MANIFEST}" not in covered:
        raise ModelLoadError(f"{model_dir}: the model file '{file}' has no checksum in the manifest; refusing it")


def read_manifest(model_dir: str | Path) -> dict:
    """The manifest of a model folder; ModelLoadError when missing or unreadable."""
    return read_json(Path(model_dir) / MANIFEST, f"{model_dir} holds no {MANIFEST}: not a flowers model folder")


def update_manifest(model_dir: str | Path, **changes: Any) -> dict:
    """Rewrite some keys of a folder's manifest (checksums recomputed); returns the new manifest."""
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


def locate_model(path: str | Path, verify: bool = True, manifest: dict | None = None) -> tuple[str, Path, dict]:
    """(kind, file or folder to load, manifest) for a model folder, checkpoint or .onnx file.

    A model folder's checksums are verified first (`verify=False` only for callers that read
    nothing but the manifest itself). `manifest`: the one already read when the model's
    reference was resolved (`flowers.registry.uris.ModelRef`), so it is not read again.
    """
    path = Path(path)
    manifest_path = find_manifest(path) if path.is_dir() else None
    if manifest_path:
        manifest = manifest if manifest is not None else read_manifest(manifest_path.parent)
        if verify:
            verify_folder(manifest_path.parent, manifest)
        return manifest.get("kind", "checkpoint"), manifest_path.parent / manifest.get("file", ""), manifest
    if path.is_dir() and (path / "best.pt").is_file():
        return "checkpoint", path / "best.pt", {}
    if path.is_file():
        return ("onnx" if path.suffix == ".onnx" else "checkpoint"), path, {}
    raise ModelLoadError(f"no model found in '{path}': expected {MANIFEST}, best.pt, a .pt or an .onnx file")
