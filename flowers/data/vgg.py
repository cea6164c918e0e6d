"""Reader for the Oxford Flowers-102 release in its original VGG layout.

``root/jpg/image_00001.jpg ...``, ``root/imagelabels.mat`` (``labels``: 1 x N, values 1..K) and
``root/setid.mat`` (``trnid``/``valid``/``tstid``: 1-based image ids). Everything is checked
once here, at the boundary, so training code can trust the arrays it gets.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from .decode import DataError
from .folder import ImageSet

log = logging.getLogger(__name__)

LABELS_FILE = "imagelabels.mat"
SETID_FILE = "setid.mat"
CLASS_NAMES_FILE = "class_names.json"
SETID_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}
DEFAULT_DATA_ROOT = Path("~/.cache/flowers/flowers102")
ENV_DATA_ROOT = "FLOWERS_DATA"


@lru_cache(maxsize=1)
def _packaged_class_names() -> tuple[str, ...]:
    text = resources.files("flowers.data").joinpath("class_names.json").read_text(encoding="utf-8")
    return tuple(json.loads(text))


def class_names() -> list[str]:
    """The 102 Flowers-102 species names, in label order 0..101."""
    return list(_packaged_class_names())


def image_path(root: Path, index: int) -> Path:
    """Path of the image with 0-based ``index`` (VGG ids are 1-based)."""
    return root / "jpg" / f"image_{index + 1:05d}.jpg"


@dataclass(frozen=True)
class VGGFlowers(ImageSet):
    """A verified Flowers-102 (or synthetic look-alike) dataset."""

    root: Path
    paths: list[Path]  # index i -> root/jpg/image_{i+1:05d}.jpg
    labels: np.ndarray  # int64, 0-based
    setid: dict[str, np.ndarray]  # 'train'/'val'/'test' -> sorted 0-based indices
    class_names: list[str]


def loadmat(path: Path, key: str) -> np.ndarray:
    """One array from a .mat file, flattened; DataError naming the file on any problem."""
    import scipy.io  # deferred: scipy is slow to import and only needed here

    if not path.is_file():
        raise DataError(f"missing {path}; run `flowers data download` or check the dataset root")
    try:
        mat = scipy.io.loadmat(str(path))
    except (ValueError, TypeError, OSError, KeyError, IndexError, zipfile.BadZipFile, NotImplementedError) as e:
        raise DataError(f"cannot read {path} (corrupt or not a MATLAB file: {e}); re-download it") from e
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path} has no '{key}' array (found {found}); is this the right file?")
    arr = np.asarray(mat[key])
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{path}: '{key}' is empty or not numeric ({arr.dtype}, shape {arr.shape})")
    flat = arr.reshape(-1)
    if not np.all(np.isfinite(flat)) or not np.all(flat == np.round(flat)):
        raise DataError(f"{path}: '{key}' holds non-integer values; re-download the file")
    return flat.astype(np.int64)


def _read_class_names(root: Path, num_classes: int) -> list[str]:
    path = root / CLASS_NAMES_FILE
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}; fix or delete it") from e
        # accept the VGG-style mapping {"1": name, ...} as well as a plain list in label order
        if isinstance(raw, dict):
            try:
                names = [str(raw[str(i)]) for i in range(1, num_classes + 1)]
            except KeyError as e:
                raise DataError(f"{path} lacks a name for label {e.args[0]} (labels go 1..{num_classes})") from None
        elif isinstance(raw, list):
            names = [str(n) for n in raw]
        else:
            raise DataError(f"{path} must hold a list of names or a {{'1': name, ...}} mapping")
        if len(names) != num_classes:
            raise DataError(f"{path} names {len(names)} classes but {LABELS_FILE} uses {num_classes}")
        return names
    if num_classes == len(_packaged_class_names()):
        return class_names()
    return [f"class_{i}" for i in range(num_classes)]


def load_vgg(root: str | os.PathLike, check_files: bool = True) -> VGGFlowers:
    """Read and verify a VGG-layout dataset; any inconsistency raises DataError naming the file.

    ``check_files`` also lists ``jpg/`` and requires exactly the expected images
    (one listdir, cheap even for 8,189 files); turn it off to skip touching the image folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}; run `flowers data download` or set {ENV_DATA_ROOT}")
    labels_path = root / LABELS_FILE
    raw = loadmat(labels_path, "labels")
    if raw.min() < 1:
        bad = np.flatnonzero(raw < 1)
        raise DataError(
            f"{labels_path}: labels must be >= 1 (1-based), but image(s) {(bad[:5] + 1).tolist()} "
            f"have {raw[bad[:5]].tolist()}; re-download the file"
        )
    num_classes = int(raw.max())
    labels = raw - 1
    n = len(labels)
    paths = [image_path(root, i) for i in range(n)]

    if check_files:
        jpg_dir = root / "jpg"
        if not jpg_dir.is_dir():
            raise DataError(f"image folder not found: {jpg_dir}; run `flowers data download`")
        present = {e.name for e in os.scandir(jpg_dir) if e.name.startswith("image_") and e.name.endswith(".jpg")}
        missing = [p.name for p in paths if p.name not in present]
        if missing:
            raise DataError(
                f"{len(missing)} of {n} images listed in {labels_path} are missing from {jpg_dir} "
                f"(first: {', '.join(missing[:5])}); re-download the dataset"
            )
        if len(present) != n:
            raise DataError(
                f"{labels_path} has {n} labels but {jpg_dir} holds {len(present)} images; "
                "the label file and the images do not belong together"
            )

    setid_path = root / SETID_FILE
    setid: dict[str, np.ndarray] = {}
    for name, key in SETID_KEYS.items():
        ids = loadmat(setid_path, key)
        if ids.min() < 1 or ids.max() > n:
            raise DataError(f"{setid_path}: '{key}' has ids outside 1..{n} (the number of labels in {LABELS_FILE})")
        if len(np.unique(ids)) != len(ids):
            raise DataError(f"{setid_path}: '{key}' lists some image ids twice")
        setid[name] = np.sort(ids - 1)
    seen = np.concatenate(list(setid.values()))
    if len(np.unique(seen)) != len(seen):
        raise DataError(f"{setid_path}: trnid/valid/tstid overlap; the official split must be disjoint")

    names = _read_class_names(root, num_classes)
    log.debug("loaded %s: %d images, %d classes", root, n, num_classes)
    return VGGFlowers(root=root, paths=paths, labels=labels, setid=setid, class_names=names)


def verify_report(ds: VGGFlowers, split: dict[str, np.ndarray] | None = None) -> str:
    """Human-readable summary: totals, split sizes and a per-class count table per split."""
    split = ds.setid if split is None else split
    parts = list(split)
    lines = [
        f"dataset: {ds.root}",
        f"images: {len(ds.labels)}",
        f"classes: {ds.num_classes}",
        "split: " + ", ".join(f"{k}={len(v)}" for k, v in split.items()),
        "",
    ]
    counts = {k: np.bincount(ds.labels[np.asarray(v, dtype=np.int64)], minlength=ds.num_classes) for k, v in split.items()}
    total = np.bincount(ds.labels, minlength=ds.num_classes)
    width = max([len("class")] + [len(n) for n in ds.class_names])
    head = f"{'id':>4}  {'class':<{width}}  {'all':>5}" + "".join(f"  {p:>6}" for p in parts)
    lines += [head, "-" * len(head)]
    for c, cname in enumerate(ds.class_names):
        lines.append(f"{c:>4}  {cname:<{width}}  {total[c]:>5}" + "".join(f"  {counts[p][c]:>6}" for p in parts))
    empty = [p for p in parts if (counts[p] == 0).any()]
    if empty:
        lines += ["", "warning: some classes have no images in: " + ", ".join(empty)]
    return "\n".join(lines)


def resolve_data_root(path: str | os.PathLike | None) -> Path:
    """``path`` if given, else ``$FLOWERS_DATA``, else ``~/.cache/flowers/flowers102``; must exist."""
    if path:
        source, root = "the given path", Path(path)
    elif os.environ.get(ENV_DATA_ROOT):
        source, root = f"${ENV_DATA_ROOT}", Path(os.environ[ENV_DATA_ROOT])
    else:
        source, root = "the default location", DEFAULT_DATA_ROOT
    root = root.expanduser()
    if not root.is_dir():
        raise DataError(
            f"Flowers-102 not found at {root} ({source}); run `flowers data download` or set {ENV_DATA_ROOT}"
        )
    return root
