"""Users' own images: folder listing, class-per-subfolder datasets, and the torch Dataset."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .decode import IMAGE_EXTENSIONS, DataError, open_image

log = logging.getLogger(__name__)


def _is_image(p: Path) -> bool:
    # hidden files are skipped: macOS "._x.jpg" resource forks look like images but are not
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def list_images(dirs: Sequence[str | os.PathLike] | str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Sorted image files (by extension, any case) under ``dirs``; DataError for a missing folder."""
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    found: set[Path] = set()
    for d in dirs:
        d = Path(d).expanduser()
        if not d.is_dir():
            raise DataError(f"folder not found: {d}")
        candidates = d.rglob("*") if recursive else d.iterdir()
        found.update(p for p in candidates if _is_image(p) and p.is_file())
    return sorted(found)


class ImageSet:
    """Shared behaviour of labelled image collections (needs `paths` and `class_names`)."""

    paths: list[Path]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ImageFolder(ImageSet):
    """Images laid out as ``root/<class name>/**/<image>``; class ids follow sorted folder names."""

    root: Path
    paths: list[Path]
    labels: np.ndarray  # int64, index into class_names
    class_names: list[str]


def load_image_folder(root: str | os.PathLike) -> ImageFolder:
    """Read a one-subfolder-per-class tree; DataError if there are no classes or a class is empty."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"no class subfolders in {root}; expected one folder per class holding its images")
    paths: list[Path] = []
    labels: list[int] = []
    for c, d in enumerate(class_dirs):
        imgs = list_images([d])
        if not imgs:
            raise DataError(
                f"class folder {d} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add some or remove it"
            )
        paths += imgs
        labels += [c] * len(imgs)
    return ImageFolder(root=root, paths=paths, labels=np.asarray(labels, dtype=np.int64), class_names=[d.name for d in class_dirs])


class LabeledImages(torch.utils.data.Dataset):
    """Decode + transform images by index; yields ``(tensor, label or -1, index)``.

    The index comes back so evaluation and scoring can map outputs to files after shuffling
    or batching without keeping a second list in sync.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | np.ndarray | None,
        transform: Callable[[Image.Image], torch.Tensor],
        draft_size: int | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        if labels is not None and len(labels) != len(self.paths):
            raise ValueError(f"{len(labels)} labels for {len(self.paths)} images")
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        img = open_image(self.paths[i], draft_size=self.draft_size)
        label = -1 if self.labels is None else int(self.labels[i])
        return self.transform(img), label, int(i)
