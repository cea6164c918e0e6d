"""Batch-scoring throughput: the Ray Data pipeline vs decode-only and model-only, and 1 vs 2 worker nodes.

    python bench/score_throughput.py [--model URI] [--limit N] [--workers 1,2] [--batch-size 32]
    python bench/score_throughput.py --mode cluster [--node-cpus 1] [--inputs local|s3]
    python bench/score_throughput.py --mode all          # both, in one run

Data: every image of Flowers-102 (`$FLOWERS_DATA/jpg`, 8,189 files) or the first `--limit`.
Model: `--model` (the INT8 student when it exists); without it, a RANDOM-INIT
MobileNet-V3-Large checkpoint at the CPU-profile size (160 px) stands in, and every line
of output says so: speed does not depend on the weights, accuracy is meaningless.

Single node (`--mode single`), images/s:
- decode-only: `Predictor.load_image` (read + decode + resize/crop), one process per CPU;
- model-only: `predict_proba` on pre-decoded uint8 batches, one 1-thread process per CPU
  (on a shared CPU, one process with N OpenMP threads collapses: spinning threads wait
  on descheduled ones; N single-thread processes is the machine's best model rate);
- `flowers score` on 20 images in a fresh process: wall time vs the job's own time;
- pipeline: `score_folders` end to end (planning, model load, Ray start-up and actors
  included: the job's whole time), the time to its first scored batch, and its steady rate
  after the first batch, for each engine: in-process (`flowers.scoring.local`, run twice:
  first in this process, then again with the imports done) and Ray Data per worker count.
  Each run's phases (plan, connect, model load, decode, predict, ...) are printed below it;
- ratio = pipeline / min(decode, model); target >= 70 %. Decode and model compete for the
  same CPUs here, so the best a CPU-only pipeline can do is 1 / (1/decode + 1/model):
  that ceiling is printed next to it.

Cluster (`--mode cluster`): a local test cluster (jobs/localcluster/: a Ray head with 0 CPUs and
2 worker nodes of `--node-cpus` CPUs each, all on this machine) scores the same images into a
dataset folder of part files written by the workers, first with worker_b stopped (1 node), then
with both (2 nodes): wall time, images/s end to end and steady (rows between the first and the
last batch's `scored_at`), and the 2-vs-1 ratio (target >= 1.7x). With `--inputs local` (default)
the nodes read the images at the driver's paths (no folder masking, `--shared-fs`); `--inputs s3`
uploads them to the cluster's S3 (moto) first, and then moto's own speed is part of the figure.
Each worker node runs on a core of its own (`taskset`, `--no-pin` to turn off): Ray's "1 CPU" is
a scheduling count, not a limit, so an unpinned node's read and write tasks would also use the
other core and the 1-node run would get most of the machine. The driver and the cluster's services
(S3, MLflow, PostgreSQL, the head) still share the cores with the nodes: a 2-core machine cannot
give two 1-CPU nodes a core each plus everything else.
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


def cpu_line() -> str:
    """`lscpu`'s model name and CPU count, and the SIMD flags that set CPU inference speed."""
    import subprocess

    info = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
    flags = set(info.get("Flags", "").split())
    keep = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return (f"{info.get('Model name', '?')}, {info.get('CPU(s)', os.cpu_count())} CPUs, "
            f"flags: {' '.join(keep) or 'no avx2/avx512/vnni'}")


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def random_student(dst: Path) -> tuple[str, str]:
    """A random-init MobileNet-V3-Large checkpoint at the CPU profile size; returns (path, label)."""
    import torch

    from flowers.data import class_names
    from flowers.data.transforms import Preprocessing
    from flowers.models import build_model, model_spec
    from flowers.models.checkpoint import CHECKPOINT_FORMAT

    name, size = "mobilenet_v3_large", 160
    spec = model_spec(name)
    names = class_names()
    net = build_model(name, num_classes=len(names), pretrained=False, dropout=0.0)
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": name, "dropout": 0.0, "class_names": names,
                "preprocessing": Preprocessing.for_size(size, spec.mean, spec.std).to_dict(),
                "config": {"level": "bench-random-mobilenet_v3_large"}, "task": "classification",
                "model": net.state_dict()}, dst)
    return str(dst), f"RANDOM-INIT {name} fp32 @{size}px (no trained student given; speed only)"


def stand_in_student(dst: Path, paths: list[str]) -> tuple[str, str]:
    """The random-init MobileNet-V3-Large exported as the study exports its student (`export_student`:
    ONNX, static INT8, calibrated here on 64 real images); returns (folder, label). Speed only."""
    import torch

    from flowers.inference.export import export_student
    from flowers.inference.predict import Predictor

    ckpt, _ = random_student(dst.parent / "random_mnv3l.pt")
    pred = Predictor.from_ref(ckpt)
    calib = [torch.stack([pred.load_image(p) for p in paths[i:i + 16]]) for i in range(0, 64, 16)]
    export_student(Path(ckpt), dst, calib, calibration_size=64, torchscript=False, dynamic=False)
    return str(dst), ("STAND-IN: RANDOM-INIT mobilenet_v3_large @160px exported as an INT8 ONNX student "
                      "(export_student, static INT8, 64 calibration images); speed only, accuracy meaningless")


_PRED = None
_BATCH = None


def _worker_init(uri: str, paths: list[str]) -> None:
    """Each pool process: one torch thread, the model, and a batch of decoded real images."""
    global _PRED, _BATCH
    import torch

    from flowers.inference.predict import Predictor

    torch.set_num_threads(1)
    # one ONNX Runtime thread per process, as Ray gives a 1-CPU actor; by default each process would
    # run one per CPU (2 x 2 threads on 2 cores) and collapse on a shared CPU
    _PRED = Predictor.from_uri(uri, threads=1)
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


def steady_rate(table) -> tuple[float, float]:
    """(images/s between the first and the last batch, seconds that took) from `scored_at`
    (one timestamp per batch): start-up and the first batch are off the clock."""
    import pyarrow.compute as pc

    t = table.column("scored_at")
    first, last = pc.min(t).as_py(), pc.max(t).as_py()
    span = (last - first).total_seconds()
    in_first = pc.sum(pc.equal(t, pc.min(t))).as_py()
    return ((table.num_rows - in_first) / span if span > 0 else 0.0), span


def single_node(args, uri: str, paths: list[str], src: Path, tmp: Path) -> dict:
    from flowers.config import ScoreConfig
    import pyarrow.parquet as pq
    from jobs.score import phase_line, score_folders

    import ray

    dec = pool_rate(uri, paths, args.cpus, args.batch_size, "decode")
    print(f"decode-only ({args.cpus} procs x 1 thread) {dec:8.1f} img/s")
    mod = pool_rate(uri, paths, args.cpus, args.batch_size, "model")
    print(f"model-only  ({args.cpus} procs x 1 thread) {mod:8.1f} img/s")
    floor = min(dec, mod)
    ceiling = 1.0 / (1.0 / dec + 1.0 / mod)
    print(f"min(decode, model)                {floor:8.1f} img/s; shared-CPU ceiling 1/(1/d+1/m) = "
          f"{ceiling:.1f} img/s ({ceiling / floor:.0%} of min)")
    results = {"decode_only": dec, "model_only": mod, "ceiling": ceiling, "ceiling_share": ceiling / floor,
               "pipeline": {}}
    runs = [("local", None, "first in this process"), ("local", None, "again (warm process)")]
    if "ray" in args.engines.split(","):
        runs += [("ray", int(w), "") for w in args.workers.split(",")]
    if "local" not in args.engines.split(","):
        runs = [r for r in runs if r[0] != "local"]
    for i, (engine, w, note) in enumerate(runs):
        s = score_folders([src], uri, tmp / f"out-{i}.parquet",
                          ScoreConfig(batch_size=args.batch_size, workers=w, overwrite=True, progress=False,
                                      dataset_threshold=len(paths), engine=engine))
        ph = s.extra["phases"]
        first = ph.get("first_batch_s", 0.0)
        # from the rows' `scored_at` (when each batch left the model): the driver receives Ray Data's
        # first batch only after several are done, so its arrival times would flatter the Ray engine
        steady, _ = steady_rate(pq.read_table(tmp / f"out-{i}.parquet", columns=["scored_at"]))
        e2e = s.scored / ph["total_s"]
        key = f"{engine}-{w or 'x'}-{i}"
        results["pipeline"][key] = {"engine": engine, "note": note, "end_to_end": e2e, "steady": steady,
                                    "total_s": ph["total_s"], "first_batch_s": first, "errors": s.errors,
                                    "workers": s.workers, "cpus_per_worker": s.extra["cpus_per_worker"],
                                    "end_to_end_share": e2e / floor, "steady_share": steady / floor,
                                    "phases": ph, "load": os.getloadavg()[0]}
        how = (f"in-process, {s.workers} lanes x 1 thread ({note})" if engine == "local"
               else f"Ray Data, {s.workers} worker(s) x {s.extra['cpus_per_worker']:g} CPU")
        print(f"{how}: {e2e:7.1f} img/s end to end = {e2e / floor:.0%} of min(decode, model) "
              f"({ph['total_s']:.1f} s, first batch {first:.2f} s after the job's start); steady {steady:7.1f} img/s "
              f"= {steady / floor:.0%}; shared-CPU ceiling {ceiling / floor:.0%}; {s.errors} errors; "
              f"load {os.getloadavg()[0]:.1f}")
        print(f"    phases: {phase_line(ph)}")
    ray.shutdown()
    # the machine may be shared: decode-only and model-only again, to bracket the runs above
    dec2 = pool_rate(uri, paths, args.cpus, args.batch_size, "decode")
    mod2 = pool_rate(uri, paths, args.cpus, args.batch_size, "model")
    results.update(decode_only_after=dec2, model_only_after=mod2)
    print(f"again after the runs: decode-only {dec2:.1f} img/s, model-only {mod2:.1f} img/s, min {min(dec2, mod2):.1f} "
          f"(before: {floor:.1f}); ratios above are to the min before; load {os.getloadavg()[0]:.1f}")
    return results


def cli_small(uri: str, paths: list[str], tmp: Path, n: int = 20) -> dict:
    """`flowers score` on `n` images as a user runs it: a fresh process (imports, the allocator
    re-exec, the model load and all), its wall time, and the job's phases from the summary file."""
    import subprocess

    src = tmp / f"cli-{n}"
    src.mkdir()
    for p in paths[:n]:
        (src / Path(p).name).symlink_to(p)
    out = tmp / f"cli-{n}.parquet"
    exe = Path(sys.executable).with_name("flowers")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "flowers.cli.main"]),
           "score", str(src), "--model", uri, "--out", str(out), "--no-progress"]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"flowers score failed:\n{r.stderr[-2000:]}")
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    ph = summary["extra"]["phases"]
    from jobs.score import phase_line

    print(f"flowers score on {n} images (a fresh process, {summary['extra']['engine']} engine): {wall:.1f} s wall, "
          f"of which the job {ph['total_s']:.2f} s (first batch {ph.get('first_batch_s', 0):.2f} s after its start) "
          f"and {wall - ph['total_s']:.1f} s interpreter start, imports and exit; load {os.getloadavg()[0]:.1f}")
    print(f"    phases: {phase_line(ph)}")
    return {"images": n, "wall_s": wall, "job_s": ph["total_s"], "phases": ph, "load": os.getloadavg()[0]}


def cluster_nodes(args, uri: str, paths: list[str], src: Path, tmp: Path) -> dict:
    """The same images on 1 and on 2 worker nodes of the local test cluster (see the docstring)."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    import subprocess

    from flowers import storage
    from flowers.scoring.sinks import read_dataset
    from jobs import localcluster as TC

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still stops the cluster below
    t0 = time.perf_counter()
    cluster = TC.up(Path(tempfile.mkdtemp(prefix="bsc-", dir="/tmp")), workers=2, cpus_per_worker=args.node_cpus,
                    masks=[] if args.inputs == "local" else None, workdir=REPO, pin_cpus=args.pin)
    results: dict = {"node_cpus": args.node_cpus, "inputs": args.inputs, "pinned": args.pin, "nodes": {}}
    try:
        os.environ.update(cluster.env())
        print(f"cluster: head (0 CPUs) + 2 worker nodes x {args.node_cpus} CPU, up in {time.perf_counter() - t0:.0f} s; "
              + ("each worker node pinned to a core of its own (taskset), driver and services unpinned" if args.pin
                 else "nodes NOT pinned: a node's readers and writers also use the other node's core"))
        if args.inputs == "s3":
            t1 = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda p: storage.write_bytes(f"s3://flowers/bench-score/in/{Path(p).name}",
                                                            Path(p).read_bytes()), paths))
            inputs, base = ["s3://flowers/bench-score/in"], "s3://flowers/bench-score"
            print(f"inputs: {len(paths)} images uploaded to the cluster's S3 (moto) in {time.perf_counter() - t1:.0f} s")
        else:
            inputs, base = [str(src)], str(tmp)
            print("inputs: the images at the driver's paths (nodes unmasked, --shared-fs)")
        for nodes in (1, 2):
            if nodes == 1:
                cluster.kill_worker("worker_b")
            else:
                cluster.restart_worker("worker_b")
            out = f"{base}/cluster-{nodes}node"
            # a driver of its own, as `flowers submit score` runs one (this process already ran a local Ray);
            # one 1-CPU actor per node CPU, set explicitly: Ray counts a killed node's CPUs for a while
            cmd = [sys.executable, "-m", "jobs.score", *inputs, "--model", uri, "--out", out, "--batch-size",
                   str(args.batch_size), "--workers", str(nodes * args.node_cpus), "--cpus-per-worker", "1",
                   "--dataset-threshold", "0", "--shared-fs", "--overwrite", "--no-progress"]
            r = subprocess.run(cmd, cwd=REPO, env={**os.environ, **cluster.env()}, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"scoring on {nodes} node(s) failed:\n{r.stderr[-3000:]}")
            s = json.loads(storage.read_bytes(f"{out}/_summary.json"))
            steady, span = steady_rate(read_dataset(out, ["scored_at"]))
            results["nodes"][nodes] = {"end_to_end": s["images_per_s"], "steady": steady, "wall_s": s["wall_s"],
                                       "workers": s["workers"], "errors": s["errors"]}
            print(f"{nodes} worker node(s), {s['workers']} actor(s) x {s['extra']['cpus_per_worker']:g} CPU: "
                  f"{s['images_per_s']:7.1f} img/s end to end ({s['wall_s']:.1f} s), steady {steady:7.1f} img/s "
                  f"({span:.1f} s between first and last batch), {s['errors']} errors")
        one, two = results["nodes"][1], results["nodes"][2]
        results["ratio_end_to_end"] = two["end_to_end"] / one["end_to_end"]
        results["ratio_steady"] = two["steady"] / one["steady"] if one["steady"] else 0.0
        print(f"2 vs 1 worker node: {results['ratio_end_to_end']:.2f}x end to end, "
              f"{results['ratio_steady']:.2f}x steady (target 1.7x)")
    finally:
        cluster.down()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model URI (default: a stand-in, clearly labelled: see --stand-in)")
    ap.add_argument("--stand-in", choices=["int8", "fp32"], default="int8",
                    help="without --model: a random-init MobileNet-V3-Large exported as an INT8 ONNX student "
                         "(default), or the fp32 torch checkpoint")
    ap.add_argument("--data", default=os.environ.get("FLOWERS_DATA"), help="Flowers-102 root (default $FLOWERS_DATA)")
    ap.add_argument("--limit", type=int, default=None, help="first N images only")
    ap.add_argument("--mode", choices=["single", "cluster", "all"], default="single",
                    help="single node (default), 1 vs 2 worker nodes on a local test cluster, or both")
    ap.add_argument("--workers", default="2", help="single node: Ray Data worker counts to compare (default 2)")
    ap.add_argument("--engines", default="local,ray",
                    help="single node: the scoring engines to time, in-process (local) and Ray Data (default both)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="single node: CPUs (default: all)")
    ap.add_argument("--node-cpus", type=int, default=1, help="cluster: CPUs of each worker node (default 1)")
    ap.add_argument("--inputs", choices=["local", "s3"], default="local",
                    help="cluster: read the images at the driver's paths (default) or from the cluster's S3")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="cluster: do not pin each worker node to its own core (by default they are: otherwise a "
                         "1-CPU node's read and write tasks also run on the other node's core)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    import logging

    from flowers.data import list_images
    from flowers.runtime import allocator_env

    logging.basicConfig(level=logging.WARNING)
    if not args.data or not Path(args.data, "jpg").is_dir():
        print("error: set FLOWERS_DATA (or --data) to a Flowers-102 copy with jpg/", file=sys.stderr)
        return 2
    os.environ.update(allocator_env())  # decode pool processes and Ray workers inherit it
    paths = [str(p) for p in list_images(Path(args.data, "jpg"))][: args.limit]
    tmp = Path(tempfile.mkdtemp(prefix="score-bench-"))
    if args.model:
        from _common import unresolvable

        why = unresolvable([args.model])
        if why:
            print(why, file=sys.stderr)
            return 2
        uri, label = args.model, args.model
    elif args.stand_in == "int8":
        uri, label = stand_in_student(tmp / "student", paths)
    else:
        uri, label = random_student(tmp / "random_mnv3l.pt")
    # the pipeline scores a folder: link the subset into one so --limit needs no copy
    src = tmp / "images"
    src.mkdir()
    for p in paths:
        (src / Path(p).name).symlink_to(p)

    print(f"machine: {cpu_line()}")
    print(f"load: {load_line()} at the start (other work shares these CPUs: figures are contended)")
    print(f"model: {label}")
    print(f"data: {len(paths)} images from {args.data}/jpg, batch {args.batch_size}")
    results = {"model": label, "images": len(paths), "batch_size": args.batch_size, "machine": cpu_line(),
               "load_at_start": os.getloadavg()}
    if args.mode in ("single", "all"):
        results["cli_20"] = cli_small(uri, paths, tmp)
        results["single"] = single_node(args, uri, paths, src, tmp)
    if args.mode in ("cluster", "all"):
        results["cluster"] = cluster_nodes(args, uri, paths, src, tmp)
    print(f"load: {load_line()} at the end")
    results["load_at_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
