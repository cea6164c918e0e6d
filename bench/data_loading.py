"""Images/s of the train and eval input pipelines on real images, draft-mode vs full JPEG decode.

    FLOWERS_DATA=../shared/flowers102 python bench/data_loading.py [--images 2000] [--workers 2] [--size 224]

Measures the DataLoader alone (decode + transform + collate), no model, so the figure is the
ceiling the input pipeline puts on training and scoring throughput.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.data import DataLoader

from flowers.data import LabeledImages, load_vgg, resolve_data_root
from flowers.data.transforms import Preprocessing, eval_transform, train_transform


def rate(ds, workers: int, batch: int) -> float:
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False)
    t0 = time.perf_counter()
    n = sum(x.shape[0] for x, _, _ in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="Flowers-102 root (default $FLOWERS_DATA)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_vgg(resolve_data_root(args.data))
    paths, labels = ds.paths[: args.images], ds.labels[: args.images]
    pp = Preprocessing.for_size(args.size)
    pipelines = {"train (light aug)": train_transform("light", args.size), "eval": eval_transform(pp)}
    print(f"data: {ds.root} ({len(paths)} of {len(ds.paths)} images), size {args.size}, "
          f"{args.workers} workers, batch {args.batch}, {os.cpu_count()} CPUs")
    print(f"{'pipeline':<20}{'full decode img/s':>20}{'draft decode img/s':>20}{'speed-up':>10}")
    for name, tf in pipelines.items():
        full = rate(LabeledImages(paths, labels, tf, draft_size=None), args.workers, args.batch)
        draft = rate(LabeledImages(paths, labels, tf, draft_size=pp.resize_size), args.workers, args.batch)
        print(f"{name:<20}{full:>20.1f}{draft:>20.1f}{draft / full:>9.2f}x")


if __name__ == "__main__":
    main()
