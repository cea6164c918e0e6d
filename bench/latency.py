"""Latency of every serving candidate, in one run on one machine: members, fp32 ensemble, student
fp32 (PyTorch and ONNX Runtime), student dynamic INT8 (Linear only, the seed's method) and student
static INT8 (ORT QDQ). Batch 1 p50/p95 and batch 32 throughput, then the ratios.

    python bench/latency.py                                   # random-init models (architecture-only latency)
    python bench/latency.py --members l1=models:/flowers-l1@champion ... --student runs/l5/model
    python bench/latency.py --member-arch resnet50 --member-size 224   # the GPU-profile (seed) members

Without trained models it builds random-init networks at the CPU-profile sizes: the numbers are
then ARCHITECTURE-ONLY latency (weights do not change the cost of a dense conv net, but accuracy
is meaningless). Run it on an otherwise idle machine; other processes inflate p95 first.
It prints the CPU's INT8-relevant flags (AVX2, AVX-512, VNNI, AMX) and the student's INT8 recipe:
INT8 speed depends on them. `bench/int8_recipes.py` compares the recipes' accuracy and latency.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from flowers import config as C
from flowers.models.checkpoint import save_checkpoint
from flowers.data.transforms import Preprocessing
from flowers.inference.export import export_student
from flowers.inference.onnx_models import cpu_flags, describe_cpu, latency, load_variant
from flowers.models import build_model, model_spec
from flowers.inference.predict import LoadedModel, load_model
from flowers.runtime import configure_torch_threads, cpu_share

log = logging.getLogger("bench.latency")


def random_checkpoint(arch: str, size: int, classes: int, path: Path) -> Path:
    """A flowers checkpoint of a random-init network (architecture-only latency)."""
    spec = model_spec(arch)
    pp = Preprocessing.for_size(size, spec.mean, spec.std)
    net = build_model(arch, classes, pretrained=False, dropout=0.0).eval()
    cfg = C.replace(C.Config(), {"model.arch": spec.backbone, "model.attention": spec.attention,
                                 "model.pretrained": None, "data.image_size": size})
    save_checkpoint(path, {"model_name": arch, "dropout": 0.0,
                           "class_names": [f"class {i}" for i in range(classes)], "preprocessing": pp.to_dict(),
                           "config": C.to_dict(cfg), "task": "classification", "model": net.state_dict()})
    return path


def torch_fn(model: LoadedModel):
    mod = model.module

    @torch.inference_mode()
    def fn(x):
        return mod(x)

    return fn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", nargs="*", default=[], metavar="[NAME=]URI", help="trained members (default: random-init)")
    ap.add_argument("--student", help="exported student folder (flowers export / flowers distill output)")
    ap.add_argument("--member-arch", nargs="+", default=None,
                    help="random-init member architectures (default: the CPU profile's L1, L2, L3)")
    ap.add_argument("--member-size", type=int, default=None, help="random-init member image size (default: CPU profile)")
    ap.add_argument("--student-arch", default="mobilenet_v3_large")
    ap.add_argument("--student-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=102)
    ap.add_argument("--iters", type=int, default=100, help="batch-1 iterations per model")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3,
                    help="measure every model this many times, interleaved; report the best round (robust to "
                         "other processes on a shared machine)")
    ap.add_argument("--threads", type=int, default=None, help="torch/ORT threads (default: this process's CPU share)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    threads = configure_torch_threads(args.threads)
    if args.threads:
        import os

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # cpu_share() → ORT intra-op threads
    tmp = Path(tempfile.mkdtemp(prefix="flowers-bench-"))
    notes = []

    # ---------------------------------------------------------------- members and the ensemble
    from flowers.cli.commands.ensemble import parse_members
    from flowers.training.ensemble import build_ensemble

    if args.members:
        uris = parse_members(args.members)
        notes.append("members: trained models " + ", ".join(f"{k}={v}" for k, v in uris.items()))
    else:
        cpu = C.load_config(Path(__file__).resolve().parents[1] / "configs/level1.yaml", "cpu")
        archs = args.member_arch or [cpu.model.arch, cpu.model.arch, f"attention_{cpu.model.arch}"]
        size = args.member_size or cpu.data.image_size
        uris = {f"l{i + 1}": str(random_checkpoint(a, size, args.classes, tmp / f"l{i + 1}.pt")) for i, a in enumerate(archs)}
        notes.append(f"members: RANDOM-INIT {', '.join(archs)} at {size}px (architecture-only latency)")
    ens_dir = build_ensemble(list(uris.values()), tmp / "ensemble", member_names=list(uris))
    ensemble = load_model(ens_dir)
    members = {k: load_model(v) for k, v in uris.items()}

    # ---------------------------------------------------------------- the student
    if args.student:
        from flowers.inference.predict import find_manifest, resolve_uri

        local, _ = resolve_uri(args.student)  # a folder or a models:/ URI of an exported student
        student_dir = find_manifest(local).parent
        manifest = json.loads((student_dir / "flowers_model.json").read_text())
        ckpt = Path(manifest.get("source_checkpoint", ""))
        student_torch = load_model(ckpt) if ckpt.is_file() else None
        notes.append(f"student: exported {student_dir} ({manifest.get('model_name')})")
    else:
        ckpt = random_checkpoint(args.student_arch, args.student_size, args.classes, tmp / "student.pt")
        calib = [torch.randint(0, 256, (16, 3, args.student_size, args.student_size), dtype=torch.uint8) for _ in range(4)]
        student_dir = export_student(ckpt, tmp / "student", calib, torchscript=False)
        student_torch = load_model(ckpt)
        notes.append(f"student: RANDOM-INIT {args.student_arch} at {args.student_size}px, INT8 calibrated on noise "
                     "(architecture-only latency)")
    variants = {k: load_variant(student_dir, k) for k in ("fp32", "dynamic_int8", "int8")}
    q = json.loads((student_dir / "flowers_model.json").read_text()).get("quantization") or {}
    check = variants["int8"].meta.get("int8_check") or {}
    notes.append(f"student INT8 recipe {q.get('recipe', 'u8s8 (exported before recipes were recorded)')}, "
                 f"max |weight| {check.get('max_abs_weight')}, saturation-safe {check.get('saturation_safe')}")

    rows: list[tuple[str, object, int]] = [(f"member {k} fp32 (torch)", torch_fn(m), m.preprocessing.image_size)
                                          for k, m in members.items()]
    rows.append(("ensemble fp32 (torch)", torch_fn(ensemble) if ensemble.module is not None else ensemble.predict_proba,
                 ensemble.preprocessing.image_size))
    ssize = variants["int8"].preprocessing.image_size
    if student_torch is not None:
        rows.append(("student fp32 (torch)", torch_fn(student_torch), ssize))
    rows += [("student fp32 (ORT)", variants["fp32"].predict_proba, ssize),
             ("student dynamic INT8 (ORT, Linear only)", variants["dynamic_int8"].predict_proba, ssize),
             ("student static INT8 (ORT QDQ)", variants["int8"].predict_proba, ssize)]

    results: dict[str, dict] = {}
    cpu = cpu_flags()
    print(f"\nCPU: {describe_cpu(cpu)}")
    print(f"threads: torch {threads}, ORT {cpu_share()}; best of {args.rounds} interleaved rounds; " + "; ".join(notes))
    for r in range(args.rounds):
        for name, fn, size in rows:
            x1 = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
            xb = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
            b1 = latency(fn, x1, iters=args.iters, warmup=5, max_seconds=30)
            bb = latency(fn, xb, iters=max(3, args.iters // 10), warmup=1, max_seconds=30)
            prev = results.get(name)
            if prev is None or b1["p50_ms"] < prev["b1_p50_ms"]:
                results[name] = {"size": size, "b1_p50_ms": b1["p50_ms"], "b1_p95_ms": b1["p95_ms"],
                                 "batch_images_per_s": max(bb["images_per_s"], (prev or {}).get("batch_images_per_s", 0))}
            elif prev is not None:
                prev["batch_images_per_s"] = max(prev["batch_images_per_s"], bb["images_per_s"])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"{'model':44s} {'size':>5s} {'b1 p50 ms':>10s} {'b1 p95 ms':>10s} {'b{} img/s'.format(args.batch):>11s}")
    for name, res in results.items():
        print(f"{name:44s} {res['size']:5d} {res['b1_p50_ms']:10.2f} {res['b1_p95_ms']:10.2f} {res['batch_images_per_s']:11.1f}")

    int8 = results["student static INT8 (ORT QDQ)"]["b1_p50_ms"]
    print("\nratios (batch-1 p50, higher = static INT8 faster):")
    for name in results:
        if name != "student static INT8 (ORT QDQ)":
            print(f"  {name:44s} / static INT8 = {results[name]['b1_p50_ms'] / int8:6.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "notes": notes, "threads": threads, "results": results},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
