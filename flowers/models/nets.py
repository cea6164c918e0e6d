"""The networks: `FlowerNet` (backbone -> pooling head) and `AttentionNet`, built by name with `build_model`."""
from __future__ import annotations

import logging

import torch
from torch import nn

from flowers.models.backbones import BACKBONES, ModelSpec, ModelError, model_spec
from flowers.models.weights import build_backbone

logger = logging.getLogger(__name__)


class PoolHead(nn.Module):
    """Global average pooling -> dropout -> Linear."""

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(feats), 1)))


class AttentionHead(nn.Module):
    """Spatial attention pooling: A = sigmoid(1x1 conv(F)), pooled = sum(A*F) / sum(A)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.Conv2d(in_features, 1, kernel_size=1)
        # Zero init gives A = 0.5 everywhere, i.e. exactly average pooling at the start, so a
        # pretrained backbone is not disturbed before the map has learnt anything.
        nn.init.zeros_(self.attention.weight)
        nn.init.zeros_(self.attention.bias)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def attend(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (pooled B x C, attention map B x 1 x h x w in [0, 1])."""
        attn = torch.sigmoid(self.attention(feats))
        # clamp: sigmoid can underflow to 0 everywhere in float16/float32 for extreme logits.
        pooled = (attn * feats).sum(dim=(2, 3)) / attn.sum(dim=(2, 3)).clamp_min(1e-6)
        return pooled, attn

    def forward(
        self, feats: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        pooled, attn = self.attend(feats)
        logits = self.fc(self.dropout(pooled))
        return (logits, attn) if return_attention else logits


class FlowerNet(nn.Module):
    """Backbone feature map -> head logits.

    Attributes: ``spec`` (:class:`ModelSpec`), ``num_classes``, ``num_features`` (C of the
    feature map) and ``pretrained`` (where the backbone weights came from, for logging).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        spec: ModelSpec,
        num_classes: int,
        num_features: int,
        gradcam_path: str,
        pretrained: str = "none",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.num_classes = num_classes
        self.num_features = num_features
        self.pretrained = pretrained
        # A path, not a module attribute: registering the layer twice would duplicate its
        # keys in state_dict().
        self._gradcam_path = gradcam_path

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def gradcam_layer(self) -> nn.Module:
        """The last conv block of the backbone: the target layer for Grad-CAM (flowers.inference.explain)."""
        return self.backbone.get_submodule(self._gradcam_path)


class AttentionNet(FlowerNet):
    """FlowerNet with an :class:`AttentionHead`; can also return the attention map."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.backbone(x), return_attention=return_attention)


def build_model(
    name: str,
    num_classes: int = 102,
    pretrained: str | bool | None = None,
    dropout: float = 0.2,
) -> FlowerNet:
    """Build model ``name`` (see :func:`list_models`) with a fresh ``num_classes``-way head."""
    spec = model_spec(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive int, got {num_classes!r}")
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {dropout!r}")
    backbone, channels, source = build_backbone(spec.backbone, pretrained)
    layer = BACKBONES[spec.backbone].gradcam(backbone)
    gradcam_path = next(n for n, m in backbone.named_modules() if m is layer)
    head_cls, net_cls = (AttentionHead, AttentionNet) if spec.attention else (PoolHead, FlowerNet)
    model = net_cls(
        backbone,
        head_cls(channels, num_classes, dropout),
        spec=spec,
        num_classes=num_classes,
        num_features=channels,
        gradcam_path=gradcam_path,
        pretrained=source,
    )
    logger.info("Built %s: %d classes, %.1fM parameters, backbone weights %s",
                spec.name, num_classes, count_parameters(model) / 1e6, source)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

