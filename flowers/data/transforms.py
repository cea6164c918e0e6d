"""Transform presets and the one eval preprocessing used everywhere.

Pipelines produce uint8 CHW tensors; normalization happens on the batch inside
the model wrapper (`Normalize`). Keeping uint8 until the last moment makes the
DataLoader hand-off 4x smaller and lets exported models take raw pixels.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing: resize the short side, centre crop, normalize with mean/std."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def for_size(cls, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_size: int | None = None) -> "Preprocessing":
        # 256 → 224 at the default size, the same ratio at others
        resize = resize_size or int(math.floor(image_size * 256 / 224 + 0.5))
        return cls(image_size, resize, tuple(mean), tuple(std))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["image_size"]), int(d["resize_size"]), tuple(d["mean"]), tuple(d["std"]))


class Normalize(nn.Module):
    """uint8 (or 0..255 float) NCHW → normalized float; part of every inference model."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale - self.shift

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float → uint8 pixels (for showing what a model saw)."""
        return ((x.float() + self.shift) / self.scale).round().clamp(0, 255).to(torch.uint8)


def resize_crop(pp: Preprocessing) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (N×)3×H×W → uint8 (N×)3×S×S: the one uint8 resize (short side) + centre crop."""
    return v2.Compose([v2.Resize(pp.resize_size, antialias=True), v2.CenterCrop(pp.image_size)])


def eval_transform(pp: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """PIL → uint8 3×S×S: the single eval preprocessing (training eval, serving, scoring)."""
    return v2.Compose([v2.PILToTensor(), resize_crop(pp)])


class RandomRot90:
    """Rotate by a random multiple of 90°: flowers have no canonical orientation."""

    def __repr__(self) -> str:  # stable: the feature cache keys entries by the transform's repr
        return "RandomRot90()"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(x, k, dims=(-2, -1)) if k else x


class RandomLowRes:
    """A small photo: shrink the short side to a random size in [low, high] pixels, then back up."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def __repr__(self) -> str:
        return f"RandomLowRes({self.low}, {self.high})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        side = int(torch.randint(self.low, self.high + 1, ()).item())
        if side >= min(h, w):
            return x
        small = v2.functional.resize(x, [max(1, round(h * side / min(h, w))), max(1, round(w * side / min(h, w)))],
                                     antialias=True)
        return v2.functional.resize(small, [h, w], antialias=False)


class RandomNoise:
    """Sensor noise on uint8: additive Gaussian with a sigma drawn in [0, `sigma`] (fraction of 255)."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __repr__(self) -> str:
        return f"RandomNoise({self.sigma})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = float(torch.rand(())) * self.sigma * 255.0
        return (x.float() + torch.randn(x.shape) * s).round().clamp(0, 255).to(torch.uint8)


class RandomCast:
    """A warm or cool colour cast: red x (1 + s), blue x (1 - s), s uniform in [-`strength`, `strength`]."""

    def __init__(self, strength: float) -> None:
        self.strength = strength

    def __repr__(self) -> str:
        return f"RandomCast({self.strength})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = (float(torch.rand(())) * 2 - 1) * self.strength
        gain = torch.tensor([1 + s, 1.0, 1 - s]).view(3, 1, 1)
        return (x.float() * gain).round().clamp(0, 255).to(torch.uint8)


def shift_ops(image_size: int) -> list:
    """The `shifts` preset: the photometric and geometric changes of other people's photos, each
    applied with some probability (matched to the shift suite, flowers/evaluation/shifts.py): zoomed
    out, tight/off-centre/squashed framing, tilt, exposure, contrast, colour casts, grey, low resolution,
    blur, JPEG and sensor noise."""
    grey_fill = [124, 116, 104]  # the ImageNet mean, in pixels
    return [
        v2.PILToTensor(),
        v2.RandomApply([v2.RandomRotation(20, fill=grey_fill)], p=0.25),
        v2.RandomResizedCrop(image_size, scale=(0.15, 1.0), ratio=(0.5, 2.0), antialias=True),
        # zoomed out after the crop, so the crop never lands on the frame alone; then back to size
        v2.RandomZoomOut(fill=grey_fill, side_range=(1.0, 2.2), p=0.2),
        v2.Resize((image_size, image_size), antialias=True),
        v2.RandomHorizontalFlip(),
        RandomRot90(),
        v2.ColorJitter(brightness=0.45, contrast=0.55, saturation=0.4),  # no hue: 5x the cost on uint8
        v2.RandomApply([RandomCast(0.2)], p=0.3),
        v2.RandomGrayscale(p=0.1),
        v2.RandomApply([RandomLowRes(40, 160)], p=0.3),
        v2.RandomApply([v2.GaussianBlur(9, sigma=(0.5, 2.5))], p=0.2),
        v2.RandomApply([v2.JPEG((8, 60))], p=0.3),
        v2.RandomApply([RandomNoise(0.1)], p=0.2),
    ]


def train_transform(preset: str, image_size: int, cutout_frac: float = 0.25) -> Callable[[Image.Image], torch.Tensor]:
    """Training augmentation presets: none | light | strong | shifts (see README, docs/robustness.md)."""
    if preset == "none":
        return eval_transform(Preprocessing.for_size(image_size))
    if preset == "shifts":
        return v2.Compose(shift_ops(image_size))
    ops: list = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if preset == "light":
        ops.append(v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1))
    elif preset == "strong":
        ops += [
            RandomRot90(),
            v2.ColorJitter(brightness=0.3, contrast=0.2, saturation=0.3, hue=0.05),
            # value=0 fills black; erasing on uint8 keeps the pipeline integer-only
            v2.RandomErasing(p=0.5, scale=(cutout_frac**2 * 0.5, cutout_frac**2 * 1.5), ratio=(0.5, 2.0), value=0),
        ]
    else:
        raise ValueError(f"unknown augmentation preset '{preset}' (choose none, light, strong or shifts)")
    return v2.Compose(ops)

