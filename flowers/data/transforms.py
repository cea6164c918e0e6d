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


def train_transform(preset: str, image_size: int, cutout_frac: float = 0.25) -> Callable[[Image.Image], torch.Tensor]:
    """Training augmentation presets: none | light | strong (see README)."""
    if preset == "none":
        return eval_transform(Preprocessing.for_size(image_size))
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
        raise ValueError(f"unknown augmentation preset '{preset}' (choose none, light or strong)")
    return v2.Compose(ops)

