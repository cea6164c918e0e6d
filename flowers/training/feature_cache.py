"""Frozen-trunk feature cache: run the frozen part of a network once per image, train the rest.

With ``data.feature_cache: true`` a run freezes the backbone below its last
``model.trainable_units`` units (`flowers.models.TailNet`) and trains only those units and the
head. The trunk's output does not change during training, so it is computed once and stored
here as float16 arrays:

* ``eval``: every train and val image under the run's eval preprocessing (resize + centre crop);
* ``views``: ``data.cache_views`` augmented views of every training image under the
  ``data.augment`` preset, each drawn from a per-image seed, so the same seed gives the
  same views on every machine.

A training epoch gives each image one of its views or its clean (eval) version, chosen at
random per epoch: augmentation from a fixed bank of views rather than a fresh draw per step,
which is what makes it cacheable. Test images are never read from the cache: the final test
runs the whole network on the images (the one inference path).

Entries are keyed by a hash of everything that determines their content (the trunk's weights,
the cut, the preprocessing, the augmentation and its seed, the image files' paths, sizes and
mtimes), live under ``data.cache_dir`` (default ``$FLOWERS_CACHE/features``), are written to
a temporary file and renamed into place, and are built by one process at a time per entry
(``flock``): concurrent trials on one node wait for the first one instead of computing twice.
A cache is node-local and disposable; deleting it only costs the time to rebuild it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from flowers.data.decode import open_image
from flowers.data.folder import LabeledImages
from flowers.data.remote import cache_root
from flowers.data.transforms import Normalize
from flowers.models import TailNet
from flowers.runtime import progress_bar

log = logging.getLogger(__name__)

FORMAT = "flowers.features/1"


def default_cache_dir() -> Path:
    """Node-local feature cache: `$FLOWERS_CACHE/features`, else `~/.cache/flowers/features`
    (next to the dataset cache of `flowers.data.remote`)."""
    return cache_root().parent / "features"


# ----------------------------------------------------------------------------- keys


def trunk_fingerprint(tail: TailNet) -> str:
    """SHA-256 over the backbone name, the cut and every frozen tensor of the trunk (so `efficientnet_lite0`
    and `attention_efficientnet_lite0` with the same weights share entries)."""
    h = hashlib.sha256(f"{tail.model.spec.backbone}|cut={tail.cut}".encode())
    for name, t in tail.trunk_state():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def images_fingerprint(paths: Sequence[Path], labels: Sequence[int] | None) -> str:
    """SHA-256 over each file's path, size and mtime (a changed image invalidates the entry)."""
    h = hashlib.sha256()
    for i, p in enumerate(paths):
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}|{-1 if labels is None else int(labels[i])}\n".encode())
    return h.hexdigest()


def _stable_repr(obj: object) -> str:
    """repr without memory addresses (an object without its own __repr__ would change the key every run)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------- building


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ViewImages(Dataset):
    """Image i -> its `views` transforms (V x 3 x H x W uint8), drawn from a per-image seed."""

    def __init__(self, ds: LabeledImages, transform: Callable, views: int, seed: int) -> None:
        self.ds, self.transform, self.views, self.seed = ds, transform, views, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = open_image(self.ds.paths[i], draft_size=self.ds.draft_size)
        # one seed per image: view v of image i is the same whatever order or process built it
        threads = torch.get_num_threads()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + i)
            # single-image ops on one thread: on a busy machine a multi-threaded ColorJitter took 1.3 s, not 20 ms
            torch.set_num_threads(1)
            try:
                return torch.stack([self.transform(img) for _ in range(self.views)]), i
            finally:
                torch.set_num_threads(threads)


def _compute(trunk: Callable[[torch.Tensor], torch.Tensor], norm: Normalize, ds: LabeledImages,
             transform: Callable, views: int, seed: int, out: np.ndarray, batch_size: int,
             progress: bool, desc: str, device: torch.device) -> None:
    """Fill ``out`` (views x N x C x h x w) with trunk features of ``views`` transforms of each image."""
    # decoding in this process: a loader worker overlapping it with the forward passes was slower on
    # 2 cores (light views 109 s vs 92 s), since it takes a core from the trunk's 2 threads
    loader = DataLoader(ViewImages(ds, transform, views, seed), batch_size=max(1, batch_size // views), num_workers=0)
    for x, idx in progress_bar(loader, progress, total=len(loader), desc=desc):
        b = x.shape[0]
        x = norm(x.flatten(0, 1).to(device)).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            f = trunk(x).float().cpu().numpy().astype(np.float16)
        f = f.reshape(b, views, *f.shape[1:])
        for v in range(views):
            out[v, idx.numpy()] = f[:, v]


def _entry(root: Path, key: str, meta: dict, shape: tuple[int, ...], build: Callable[[np.ndarray], None]) -> np.ndarray:
    """Open entry ``key`` read-only, building it first (once, under a lock) when absent."""
    path = root / f"{key}.npy"
    meta_path = root / f"{key}.json"

    def ready() -> bool:
        return path.is_file() and meta_path.is_file()

    if not ready():
        with _locked(root / f"{key}.lock"):
            if not ready():  # another process may have built it while we waited
                t0 = time.perf_counter()
                tmp = root / f".{key}.{os.getpid()}.npy"
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
                try:
                    build(arr)
                    arr.flush()
                    del arr
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
                meta = {**meta, "format": FORMAT, "shape": list(shape), "seconds": time.perf_counter() - t0}
                tmp_meta = meta_path.with_suffix(f".{os.getpid()}.tmp")
                tmp_meta.write_text(json.dumps(meta, indent=1))
                os.replace(tmp_meta, meta_path)
                log.info("feature cache %s: built %s in %.1fs", meta.get("what"), shape, meta["seconds"])
    arr = np.load(path, mmap_mode="r")
    if tuple(arr.shape) != tuple(shape):
        raise RuntimeError(f"feature cache entry {path} has shape {arr.shape}, expected {shape}; delete it to rebuild")
    return arr


class ViewBank:
    """Several view entries (each V_k x N x ...) read as one V x N x ... array, without copying:
    the level's own augmented views followed by the shift-matched ones (``data.shift_views``)."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = [p for p in parts if p is not None and len(p)]
        self._where = [(k, v) for k, p in enumerate(self.parts) for v in range(p.shape[0])]
        self.shape = (len(self._where), *self.parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        v, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        k, j = self._where[v]
        return self.parts[k][(j, *rest)]


@dataclass
class CachedParts:
    """What a run trains on: trunk features of the train views and of clean train/val images."""

    train_clean: np.ndarray  # N_train x C x h x w
    val_clean: np.ndarray  # N_val x C x h x w
    train_views: np.ndarray | ViewBank | None  # V x N_train x C x h x w (None: no augmentation)
    root: Path
    seconds: float  # time spent building or opening


def prepare(tail: TailNet, train: LabeledImages, val: LabeledImages, norm: Normalize,
            eval_transform: Callable, train_transform: Callable | None, views: int, seed: int,
            root: str | Path | None = None, batch_size: int = 64, progress: bool = False,
            eval_desc: dict | None = None, view_desc: dict | None = None,
            shift_transform: Callable | None = None, shift_views: int = 0) -> CachedParts:
    """Open (or build) the entries a run needs. ``train_transform=None`` or ``views=0``: no views.
    ``shift_views`` more views under ``shift_transform`` (the `shifts` preset) go after them.

    ``eval_desc``/``view_desc`` name the settings behind the transforms (preprocessing; augmentation
    preset and sizes): they go into the entries' keys, since a transform's repr may not show them all."""
    t0 = time.perf_counter()
    root = Path(root).expanduser() if root else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    model = tail.model
    was_training = model.training
    model.eval()
    trunk = tail.trunk
    device = next(model.parameters()).device
    norm = norm.to(device)
    fp_trunk = trunk_fingerprint(tail)
    probe = norm(eval_transform(open_image(train.paths[0], draft_size=train.draft_size))[None].to(device))
    with torch.inference_mode():
        feat_shape = tuple(trunk(probe).shape[1:])
    base = {"trunk": fp_trunk, **(eval_desc or {})}

    train_fp = images_fingerprint(train.paths, train.labels)  # stat every file once, for both train entries

    def clean(ds: LabeledImages, part: str) -> np.ndarray:
        fp = train_fp if ds is train else images_fingerprint(ds.paths, ds.labels)
        meta = {**base, "what": f"{part} eval", "images": fp, "eval_transform": _stable_repr(eval_transform)}
        return _entry(root, _key(meta), meta, (1, len(ds), *feat_shape),
                      lambda out: _compute(trunk, norm, ds, eval_transform, 1, seed, out, batch_size, progress,
                                           f"cache {part}", device))[0]

    train_clean, val_clean = clean(train, "train"), clean(val, "val")
    def view_entry(transform: Callable, n: int, what: str, desc: dict) -> np.ndarray:
        meta = {**base, **desc, "what": f"{what} x{n}", "images": train_fp, "views": n, "seed": seed,
                "train_transform": _stable_repr(transform)}
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):  # the probe leaves the RNG as it was
            first = transform(open_image(train.paths[0], draft_size=train.draft_size))[None].to(device)
            vshape = tuple(trunk(norm(first)).shape[1:])
        if vshape != feat_shape:  # an epoch mixes views and clean images in one batch
            raise ValueError(f"augmented views give trunk features {vshape} but eval images {feat_shape}: the "
                             "feature cache needs the training and eval crops at the same size (data.image_size)")
        return _entry(root, _key(meta), meta, (n, len(train), *vshape),
                      lambda out: _compute(trunk, norm, train, transform, n, seed, out, batch_size,
                                           progress, f"cache {what} x{n}", device))

    banks = []
    if train_transform is not None and views > 0:
        banks.append(view_entry(train_transform, views, "train views", view_desc or {}))
    if shift_transform is not None and shift_views > 0:
        banks.append(view_entry(shift_transform, shift_views, "shift views",
                                {**(view_desc or {}), "augment": "shifts"}))
    train_views = None if not banks else banks[0] if len(banks) == 1 else ViewBank(banks)
    model.train(was_training)
    return CachedParts(train_clean, val_clean, train_views, root, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- datasets


def sample_key(index: int | np.ndarray, slot: int | np.ndarray, n: int) -> int | np.ndarray:
    """Which cached input a training sample is: image `index` (of `n`) as its clean version
    (`slot` 0) or as augmented view ``slot - 1``. Slot 0 keeps the key equal to the image index, so
    per-image tables (a teacher's clean-image probabilities) serve image loaders unchanged."""
    return index + n * slot


class CachedFeatures(Dataset):
    """Cached trunk features as ``(features, label, key)``, like `LabeledImages` yields
    ``(image, label, index)``; `key` is :func:`sample_key`: the image index for a clean
    version, ``index + N * (v + 1)`` for view ``v``, so a task can look up per-input targets
    (the distillation teacher on that very view).

    With views, each epoch (:meth:`set_epoch`) gives every image one of its ``V`` augmented views
    or its clean version, uniformly at random from a seeded generator.
    """

    def __init__(self, clean: np.ndarray, labels: Sequence[int], views: np.ndarray | None = None,
                 seed: int = 0) -> None:
        self.clean, self.views = clean, views
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(clean) or (views is not None and views.shape[1] != len(clean)):
            raise ValueError(f"{len(self.labels)} labels for {len(clean)} cached images")
        self.seed = seed
        self._choice: np.ndarray | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if self.views is None:
            self._choice = None
            return
        v = self.views.shape[0]
        self._choice = np.random.default_rng([self.seed, epoch]).integers(0, v + 1, size=len(self.clean))

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        v = -1 if self._choice is None else int(self._choice[i])
        if v < 0 or v == self.views.shape[0]:
            return torch.from_numpy(np.array(self.clean[i])), int(self.labels[i]), int(i)
        return torch.from_numpy(np.array(self.views[v, i])), int(self.labels[i]), int(sample_key(i, v + 1, len(self)))


class ToFloat(torch.nn.Module):
    """The 'normalization' of cached features: float16 storage -> float32 compute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def feature_loader(ds: CachedFeatures, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """In-process loader (the features are already in memory or the page cache)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=0,
                      drop_last=shuffle and len(ds) > batch_size, generator=g)
