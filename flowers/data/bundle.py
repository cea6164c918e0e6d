"""One run's data: the split parts with their transforms, and the loaders over them."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from flowers import config as C
from flowers.storage import is_remote

from .folder import LabeledImages, load_image_folder
from .splits import make_split
from .transforms import Preprocessing, eval_transform, train_transform
from .remote import materialize
from .vgg import ENV_DATA_ROOT, load_vgg, resolve_data_root


@dataclass
class DataBundle:
    """Datasets for one run plus what a checkpoint must remember about them."""

    train: LabeledImages
    val: LabeledImages
    test: LabeledImages
    class_names: list[str]
    split: dict[str, list[int]]
    preprocessing: Preprocessing
    source: str  # human description for reports

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def eval_part(self, name: str, transform: Callable | None = None, draft_size: int | None = None) -> LabeledImages:
        """A split (train included, unaugmented) under an eval transform: this run's own by default,
        or another model's (`flowers.inference.predict.model_transform`) so every model sees its own preprocessing."""
        part = {"train": self.train, "val": self.val, "test": self.test}[name]
        if transform is None and name != "train":
            return part
        return LabeledImages(part.paths, part.labels, transform or self.val.transform, draft_size or self.val.draft_size)


def build_data(cfg: C.DataConfig, pp: Preprocessing, seed: int = 0) -> DataBundle:
    """Read the dataset named by `cfg`, split it, and wrap each part with its transform."""
    given = cfg.root or os.environ.get(ENV_DATA_ROOT)
    # a dataset URI (s3://, https://) is materialised once per node into its local cache
    root = materialize(given) if is_remote(given) else resolve_data_root(cfg.root)
    if cfg.format == "vgg":
        ds = load_vgg(root)
        paths, labels, names, setid = ds.paths, ds.labels, ds.class_names, ds.setid
    else:
        folder = load_image_folder(root)
        paths, labels, names, setid = folder.paths, folder.labels, folder.class_names, None
        if cfg.split == "official":
            raise C.ConfigError("data.split: 'official' needs the Flowers-102 release; use 'random' for an image folder")
    split = make_split(labels, cfg.split, seed=cfg.seed, setid=setid)
    if cfg.classes is not None:
        # keep the first N classes: quick real-data runs that still mean something
        keep = labels < cfg.classes
        split = {k: v[keep[v]] for k, v in split.items()}
        names = names[: cfg.classes]
    draft = pp.resize_size
    train_tf = train_transform(cfg.augment, cfg.image_size, cfg.cutout_frac)
    eval_tf = eval_transform(pp)

    def part(name: str, tf) -> LabeledImages:
        idx = split[name]
        return LabeledImages([paths[i] for i in idx], labels[idx], tf, draft_size=draft)

    return DataBundle(
        train=part("train", train_tf),
        val=part("val", eval_tf),
        test=part("test", eval_tf),
        class_names=list(names),
        split={k: [int(i) for i in v] for k, v in split.items()},
        preprocessing=pp,
        source=f"{cfg.format}:{given if is_remote(given) else root} split={cfg.split} seed={cfg.seed}"
        + (f" classes={cfg.classes}" if cfg.classes else ""),
    )


def make_loader(ds, batch_size: int, shuffle: bool, workers: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        drop_last=shuffle and len(ds) > batch_size,  # avoid a size-1 last batch breaking BatchNorm
        persistent_workers=workers > 0,
        generator=g,
        worker_init_fn=_seed_worker,
        pin_memory=torch.cuda.is_available(),
    )


def _seed_worker(worker_id: int) -> None:
    # each loader worker gets a distinct, reproducible augmentation stream
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
    # decode threads compete with the training process on small machines
    torch.set_num_threads(1)
