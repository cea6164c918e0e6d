"""Batch-scoring throughput: Ray Data pipeline vs decode-only and model-only, same run.

    python bench/score_throughput.py [--model URI] [--limit N] [--workers 1,2] [--batch-size 32]

Data: every image of Flowers-102 (`$FLOWERS_DATA/jpg`, 8,189 files) or the first `--limit`.
Model: `--model` (the INT8 student when it exists); without it, a RANDOM-INIT
MobileNet-V3-Large checkpoint at the CPU-profile size (160 px) stands in, and every line
of output says so: speed does not depend on the weights, accuracy is meaningless.

Printed figures (images/s):
- decode-only: `Predictor.load_image` (read + decode + resize/crop), one process per CPU;
- model-only: `predict_proba` on pre-decoded uint8 batches, one 1-thread process per CPU
  (on a shared CPU, one process with N OpenMP threads collapses: spinning threads wait
  on descheduled ones; N single-thread processes is the machine's best model rate);
- pipeline: `score_folders` end to end (actor start-up and model load included), and its
  steady rate after the first batch, for each worker count;
- ratio = pipeline / min(decode, model); target >= 70 %. Decode and model compete for the
  same CPUs here, so the best a CPU-only pipeline can do is 1 / (1/decode + 1/model):
  that ceiling is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def random_student(dst: Path) -> tuple[str, str]:
    """A random-init MobileNet-V3-Large checkpoint at the CPU profile size; returns (path, label)."""
    import torch

    from flowers.data import class_names
    from flowers.data.transforms import Preprocessing
    from flowers.models import build_model, model_spec
    from flowers.train import CHECKPOINT_FORMAT

    name, size = "mobilenet_v3_large", 160
    spec = model_spec(name)
    names = class_names()
    net = build_model(name, num_classes=len(names), pretrained=False, dropout=0.0)
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": name, "dropout": 0.0, "class_names": names,
                "preprocessing": Preprocessing.for_size(size, spec.mean, spec.std).to_dict(),
                "config": {"level": "bench-random-mobilenet_v3_large"}, "task": "classification",
                "model": net.state_dict()}, dst)
    return str(dst), f"RANDOM-INIT {name} fp32 @{size}px (no trained student given; speed only)"


_PRED = None
_BATCH = None


def _worker_init(uri: str, paths: list[str]) -> None:
    """Each pool process: one torch thread, the model, and a batch of decoded real images."""
    global _PRED, _BATCH
    import torch

    from flowers.predict import Predictor

    torch.set_num_threads(1)
    _PRED = Predictor.from_uri(uri)
    _BATCH = torch.stack([_PRED.load_image(p) for p in paths])
    _PRED.predict_proba(_BATCH)  # warm-up: first call allocates


def _decode_chunk(paths: list[str]) -> int:
    ok = 0
    for p in paths:
        try:
            _PRED.load_image(p)
            ok += 1
        except Exception:
            pass
    return ok


def _model_chunk(n: int) -> int:
    _PRED.predict_proba(_BATCH[:n])
    return n


def pool_rate(uri: str, paths: list[str], procs: int, batch_size: int, what: str) -> float:
    """Images/s over `paths` with `procs` fresh processes (spawned, so the allocator env applies)
    of one thread each: decode-only (read + decode + eval preprocessing) or model-only
    (predict_proba on pre-decoded uint8 batches). Start-up and model load are off the clock."""
    import multiprocessing as mp

    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(uri, paths[:batch_size])) as pool:
        list(pool.map(_model_chunk, [1] * procs * 2))  # wait until every process is up
        t = time.perf_counter()
        if what == "decode":
            n = sum(pool.map(_decode_chunk, [paths[i:i + 64] for i in range(0, len(paths), 64)]))
        else:
            sizes = [min(batch_size, len(paths) - i) for i in range(0, len(paths), batch_size)]
            n = sum(pool.map(_model_chunk, sizes))
        return n / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model URI (default: random-init MobileNet-V3-Large, clearly labelled)")
    ap.add_argument("--data", default=os.environ.get("FLOWERS_DATA"), help="Flowers-102 root (default $FLOWERS_DATA)")
    ap.add_argument("--limit", type=int, default=None, help="first N images only")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    import logging

    from flowers.data import list_images
    from flowers.runtime import allocator_env
    from flowers.config import ScoreConfig
    from jobs.score import score_folders

    logging.basicConfig(level=logging.WARNING)
    if not args.data or not Path(args.data, "jpg").is_dir():
        print("error: set FLOWERS_DATA (or --data) to a Flowers-102 copy with jpg/", file=sys.stderr)
        return 2
    os.environ.update(allocator_env())  # decode pool processes and Ray workers inherit it
    paths = [str(p) for p in list_images(Path(args.data, "jpg"))][: args.limit]
    tmp = Path(tempfile.mkdtemp(prefix="score-bench-"))
    if args.model:
        uri, label = args.model, args.model
    else:
        uri, label = random_student(tmp / "random_mnv3l.pt")
    # the pipeline scores a folder: link the subset into one so --limit needs no copy
    src = tmp / "images"
    src.mkdir()
    for p in paths:
        (src / Path(p).name).symlink_to(p)

    print(f"model: {label}")
    print(f"data: {len(paths)} images from {args.data}/jpg, batch {args.batch_size}, {args.cpus} CPUs "
          f"(shared with other work: figures are contended)")
    dec = pool_rate(uri, paths, args.cpus, args.batch_size, "decode")
    print(f"decode-only ({args.cpus} procs x 1 thread) {dec:8.1f} img/s")
    mod = pool_rate(uri, paths, args.cpus, args.batch_size, "model")
    print(f"model-only  ({args.cpus} procs x 1 thread) {mod:8.1f} img/s")
    floor = min(dec, mod)
    ceiling = 1.0 / (1.0 / dec + 1.0 / mod)
    print(f"min(decode, model)                {floor:8.1f} img/s; shared-CPU ceiling 1/(1/d+1/m) = "
          f"{ceiling:.1f} img/s ({ceiling / floor:.0%} of min)")

    import ray

    from jobs.cluster import connect

    connect(num_cpus=args.cpus, log_to_driver=False)
    results = {"model": label, "images": len(paths), "batch_size": args.batch_size, "cpus": args.cpus,
               "decode_only": dec, "model_only": mod, "ceiling": ceiling, "pipeline": {}}
    for w in [int(x) for x in args.workers.split(",")]:
        s = score_folders([src], uri, tmp / f"out-{w}.parquet",
                          ScoreConfig(batch_size=args.batch_size, workers=w, overwrite=True, progress=False))
        fb, fr = s.extra.get("first_batch_s") or 0.0, s.extra.get("first_batch_rows") or 0
        steady = (s.scored - fr) / max(s.wall_s - fb, 1e-9)
        results["pipeline"][w] = {"end_to_end": s.images_per_s, "steady": steady, "wall_s": s.wall_s,
                                  "startup_s": fb, "errors": s.errors, "cpus_per_worker": s.extra["cpus_per_worker"]}
        print(f"pipeline {w} worker(s) x {s.extra['cpus_per_worker']:g} CPU: {s.images_per_s:7.1f} img/s end to end "
              f"({s.wall_s:.1f} s, {fb:.1f} s to first batch), steady {steady:7.1f} img/s = "
              f"{steady / floor:.0%} of min(decode, model) [end to end {s.images_per_s / floor:.0%}], "
              f"{s.errors} errors")
    ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
