"""A frozen trunk and a trainable tail: what CPU training on cached features trains (docs/training.md)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flowers.models.backbones import ModelError
from flowers.models.nets import FlowerNet


def backbone_units(model: FlowerNet) -> list[tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Module]]]:
    """The backbone as an ordered list of ``(function, modules)`` whose composition is ``backbone(x)``.

    A unit is a block (an EfficientNet-Lite MBConv block, a ResNet bottleneck, a MobileNet
    stage) or the stem / 1x1 head conv. The functions call the model's own modules, so a
    split network shares its parameters with ``model`` and saves as the whole model.
    """
    bb = model.backbone
    if callable(getattr(bb, "units", None)):  # EfficientNet-Lite lists its own
        return bb.units()
    units: list[tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Module]]] = []
    for name, child in bb.named_children():
        if name.startswith("layer") and isinstance(child, nn.Sequential):
            units += [(b, [b]) for b in child]  # ResNet stages split into bottlenecks
        else:
            units.append((child, [child]))
    return units


class TailNet(nn.Module):
    """The trainable top of a :class:`FlowerNet` over a frozen trunk: trunk features -> logits.

    ``trainable_units`` backbone units (see :func:`backbone_units`) plus the head train; every
    unit below them is frozen (``requires_grad=False``) and is what :meth:`trunk` computes, so
    its output can be cached once per image (`flowers.training.feature_cache`). The parameters are the
    model's own: ``model.state_dict()`` is the whole trained network, in the one checkpoint format.
    """

    def __init__(self, model: FlowerNet, trainable_units: int) -> None:
        super().__init__()
        units = backbone_units(model)
        if not 0 <= trainable_units < len(units):
            raise ModelError(f"model.trainable_units must be in [0, {len(units) - 1}] for {model.spec.name}, "
                             f"got {trainable_units}")
        self.model = model
        self.cut = len(units) - trainable_units
        self._trunk = [fn for fn, _ in units[: self.cut]]
        self._tail = [fn for fn, _ in units[self.cut:]]
        self._trunk_modules = [m for _, mods in units[: self.cut] for m in mods]
        for m in self._trunk_modules:
            m.requires_grad_(False)

    @property
    def trainable_units(self) -> int:
        """How many backbone units sit above the cut (and train)."""
        return len(self._tail)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images -> the frozen trunk's feature map (run it in eval mode)."""
        for fn in self._trunk:
            x = fn(x)
        return x

    def trunk_state(self) -> list[tuple[str, torch.Tensor]]:
        """Every frozen trunk parameter and buffer, in order (what the cache key hashes)."""
        return [(f"{i}.{k}", t) for i, m in enumerate(self._trunk_modules) for k, t in m.state_dict().items()]

    def train(self, mode: bool = True) -> "TailNet":
        super().train(mode)
        # the trunk never runs while training, but keep its BatchNorm statistics out of train mode anyway
        for m in self._trunk_modules:
            m.eval()
        return self

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        for fn in self._tail:
            feats = fn(feats)
        return self.model.head(feats)

