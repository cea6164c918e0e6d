"""Tiny synthetic datasets in the VGG layout, for tests and laptop smoke runs.

Classes are learnable on purpose (distinct colour + shape per class, random position, size and
noise), so a tiny CNN beats chance within a couple of epochs and a training test means something.
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .decode import DataError
from .vgg import VGGFlowers, load_vgg

log = logging.getLogger(__name__)

_SHAPES = ("disc", "square", "triangle", "stripes")


def _draw(rng: np.random.Generator, label: int, num_classes: int, size: int) -> Image.Image:
    """One image of class ``label``: noisy background, a jittered shape in the class colour."""
    # background: dim random colour, so the object colour stays the most useful cue
    bg = rng.integers(0, 90, size=3)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    hue = label / num_classes
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, 0.95)
    colour = tuple(int(255 * v) for v in (r, g, b))
    shape = _SHAPES[label % len(_SHAPES)]
    half = int(size * rng.uniform(0.25, 0.4))
    cx, cy = (int(v) for v in rng.integers(half, size - half + 1, size=2))
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    else:
        step = max(2, size // 12)
        for x in range(0, size, 2 * step):
            draw.rectangle((x, 0, x + step - 1, size), fill=colour)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0, 12, size=arr.shape)  # pixel noise so no two images are identical
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_synthetic(
    root: str | os.PathLike, num_classes: int = 5, per_class: int = 12, size: int = 96, seed: int = 0
) -> VGGFlowers:
    """Write a VGG-layout dataset to ``root`` (which must not exist or be empty) and load it.

    Per class, ``per_class // 3`` images go to train, as many to val, the rest to test.
    Built in a temporary folder next to ``root`` and renamed into place, so a crash never
    leaves a half-written dataset.
    """
    import scipy.io  # deferred: only needed when writing .mat files

    root = Path(root).expanduser()
    if num_classes < 2 or per_class < 3:
        raise ValueError(f"need num_classes >= 2 and per_class >= 3, got {num_classes}, {per_class}")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} already exists and is not empty; choose another folder or delete it")
    root.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # shuffled so image ids do not encode labels, as in the original release
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".tmp-{root.name}-"))
    try:
        (tmp / "jpg").mkdir()
        for i, c in enumerate(labels):
            _draw(rng, int(c), num_classes, size).save(tmp / "jpg" / f"image_{i + 1:05d}.jpg", quality=90)
        parts: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
        k = per_class // 3
        for c in range(num_classes):
            ids = rng.permutation(np.flatnonzero(labels == c) + 1)  # 1-based, as in the original
            parts["trnid"] += ids[:k].tolist()
            parts["valid"] += ids[k : 2 * k].tolist()
            parts["tstid"] += ids[2 * k :].tolist()
        # same keys, shapes (1 x N) and integer dtypes as the original release
        label_dtype = np.uint8 if num_classes < 256 else np.uint16
        scipy.io.savemat(tmp / "imagelabels.mat", {"labels": (labels + 1).astype(label_dtype)[None, :]})
        id_dtype = np.uint16 if len(labels) < 65536 else np.uint32
        scipy.io.savemat(tmp / "setid.mat", {k: np.asarray(v, dtype=id_dtype)[None, :] for k, v in parts.items()})
        names = {str(c + 1): f"synthetic {_SHAPES[c % len(_SHAPES)]} {c}" for c in range(num_classes)}
        (tmp / "class_names.json").write_text(json.dumps(names, indent=1), encoding="utf-8")
        if root.exists():
            root.rmdir()  # empty (checked above); rename cannot replace a directory portably
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("wrote synthetic dataset %s (%d classes x %d)", root, num_classes, per_class)
    return load_vgg(root)
