"""INT8 recipes side by side on one trained checkpoint: accuracy and latency cost of each.

    python bench/int8_recipes.py --checkpoint runs/l5/train/best.pt [--data DIR] [--recipes u8s8_7bit_bc u8s8]

Exports the checkpoint once per recipe (`flowers.inference.export.INT8_RECIPES`, calibrated on the same
training images), then evaluates ONNX fp32 and every INT8 file on the checkpoint's own test
split (same images, paired: difference to fp32 with a 95 % bootstrap interval and McNemar's p)
and times batch-1 p50/p95 and batch-32 throughput, interleaved over rounds. Prints this CPU's
flags: the `u8s8` recipe (full 8-bit weights) is exact only where VNNI/AMX is present, so its
accuracy here says nothing about an AVX2-only CPU; the 7-bit recipes cannot saturate on any x86 CPU.

`--emulate-cpu Haswell` (needs `qemu-x86_64`, e.g. the Debian package qemu-user) also runs every
INT8 file under QEMU's model of that CPU (AVX2, no AVX-512/VNNI), plainly and with ONNX
Runtime's `session.x64quantprecision`: what a CPU without VNNI predicts, on a VNNI machine.
Emulation is slow (minutes for 819 images at 128 px; `--emulate-limit N` takes the first N test
images) and says nothing about latency. Each emulated run is also compared with the same file run
natively on the same images: agreement of top-1 and the largest probability difference, so
"exact" means the same outputs, not just a similar accuracy.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch

from flowers import config as C
from flowers.evaluation import stats
from flowers.models.checkpoint import load_checkpoint
from flowers.data.bundle import build_data
from flowers.data.transforms import Preprocessing
from flowers.inference.export import DEFAULT_INT8_RECIPE, INT8_RECIPES, export_student
from flowers.inference.onnx_models import cpu_flags, describe_cpu, latency, load_variant
from flowers.inference.predict import predict_dataset
from flowers.runtime import configure_torch_threads, cpu_share


def emulate(cpu_model: str, models: dict, data, tmp: Path, limit: int | None = None) -> dict[str, dict]:
    """Predictions and probabilities of every INT8 file on the first `limit` test images (all by
    default) under `qemu-x86_64 -cpu cpu_model`, plain and with session.x64quantprecision; the
    images are the native eval pipeline's, saved once."""
    int8 = {name: m for name, m in models.items() if "INT8" in name}
    m0 = next(iter(int8.values()))
    ds = data.eval_part("test", m0.transform(), m0.draft_size)
    n = len(ds) if limit is None else min(limit, len(ds))
    images = tmp / "test_uint8.npz"
    np.savez(images, x=np.stack([ds[i][0].numpy() for i in range(n)]).astype(np.uint8))
    worker = Path(__file__).with_name("ort_eval_worker.py")
    # the emulated interpreter is the real binary behind this venv's python, with the venv's packages
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    out = {}
    for precise in (False, True):
        cmd = ["qemu-x86_64", "-cpu", cpu_model, os.path.realpath(sys.executable), str(worker), str(images)]
        cmd += (["--precise"] if precise else []) + [m.source for m in int8.values()]
        print(f"emulating {cpu_model}{' with session.x64quantprecision' if precise else ''} (slow)...", file=sys.stderr,
              flush=True)
        got = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        for name, m in int8.items():
            label = f"{name} on {cpu_model}" + (" +x64quantprecision" if precise else "")
            out[label] = {"native": name, "preds": np.asarray(got[m.source]["preds"]),
                          "probs": np.asarray(got[m.source]["probs"], dtype=np.float32)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a flowers training checkpoint (best.pt)")
    ap.add_argument("--data", help="dataset root (default: the checkpoint's, else $FLOWERS_DATA)")
    ap.add_argument("--recipes", nargs="+", default=list(INT8_RECIPES), choices=list(INT8_RECIPES))
    ap.add_argument("--calibration-size", type=int, default=256)
    ap.add_argument("--iters", type=int, default=100, help="batch-1 iterations per model and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds; the best is reported")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--emulate-cpu", metavar="QEMU_CPU",
                    help="also evaluate the INT8 files under qemu-x86_64 -cpu QEMU_CPU (e.g. Haswell: AVX2, no VNNI)")
    ap.add_argument("--emulate-limit", type=int, metavar="N", help="emulate on the first N test images only")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.emulate_cpu and not shutil.which("qemu-x86_64"):
        ap.error("--emulate-cpu needs qemu-x86_64 on PATH (Debian/Ubuntu: apt-get install qemu-user)")
    logging.basicConfig(level=logging.WARNING)
    configure_torch_threads(args.threads)

    cpu = cpu_flags()
    print(f"CPU: {describe_cpu(cpu)}")
    ckpt = load_checkpoint(args.checkpoint)
    pp = Preprocessing.from_dict(ckpt["preprocessing"])
    data_cfg = C.build(C.Config, ckpt["config"]).data
    if args.data:
        data_cfg = C.replace(C.Config(data=data_cfg), {"data.root": args.data}).data
    data = build_data(data_cfg, pp, seed=data_cfg.seed)
    print(f"data: {data.source}, test {len(data.test)} images, {pp.image_size} px; model {ckpt['model_name']}")

    tmp = Path(tempfile.mkdtemp(prefix="flowers-int8-"))
    models = {}
    for recipe in args.recipes:
        out = export_student(Path(args.checkpoint), tmp / recipe, data.eval_part("train"),
                             calibration_size=args.calibration_size, torchscript=False, dynamic=False,
                             int8_recipe=recipe)
        if "ONNX fp32" not in models:
            models["ONNX fp32"] = load_variant(out, "fp32")
        models[f"static INT8 {recipe}"] = load_variant(out, "int8")

    results: dict[str, dict] = {}
    labels = None
    correct, native_probs = {}, {}
    for name, m in models.items():
        ds = data.eval_part("test", m.transform(), m.draft_size)
        probs, labels = predict_dataset(m.predict_proba, ds, batch_size=64, workers=data_cfg.workers)
        correct[name], native_probs[name] = probs.argmax(1) == labels, probs
        results[name] = {"test_top1": float(correct[name].mean()), "preds": probs.argmax(1)}
    emulated_rows = []
    if args.emulate_cpu:
        for label, e in emulate(args.emulate_cpu, models, data, tmp, args.emulate_limit).items():
            n = len(e["preds"])
            native = native_probs[e["native"]][:n]
            emulated_rows.append({
                "model": label, "images": n, "top1": float((e["preds"] == labels[:n]).mean()),
                "native_top1": float((native.argmax(1) == labels[:n]).mean()),
                "fp32_top1": float(correct["ONNX fp32"][:n].mean()),
                "agreement_with_native": float((e["preds"] == native.argmax(1)).mean()),
                "max_abs_prob_diff": float(np.abs(e["probs"] - native).max())})
    base = "ONNX fp32"
    for name in results:
        if name == base:
            continue
        diff = stats.paired_bootstrap(correct[name], correct[base])
        mc = stats.mcnemar_exact(correct[name], correct[base])
        results[name].update({"vs_fp32_points": 100 * diff.estimate, "vs_fp32_low": 100 * diff.low,
                              "vs_fp32_high": 100 * diff.high, "mcnemar_p": mc.p_value,
                              "agreement_with_fp32": float((results[name]["preds"] == results[base]["preds"]).mean()),
                              "saturation_safe": (models[name].meta.get("int8_check", {}).get("saturation_safe")
                                                  if name in models else None)})

    size = pp.image_size
    x1 = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    xb = torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8)
    for _ in range(args.rounds):
        for name, m in models.items():
            b1 = latency(m.predict_proba, x1, iters=args.iters, warmup=5, max_seconds=30)
            bb = latency(m.predict_proba, xb, iters=max(3, args.iters // 10), warmup=1, max_seconds=30)
            r = results[name]
            if b1["p50_ms"] < r.get("b1_p50_ms", float("inf")):
                r.update({"b1_p50_ms": b1["p50_ms"], "b1_p95_ms": b1["p95_ms"]})
            r["b32_images_per_s"] = max(r.get("b32_images_per_s", 0.0), bb["images_per_s"])

    print(f"threads: ORT {cpu_share()}; best of {args.rounds} interleaved rounds; default recipe {DEFAULT_INT8_RECIPE}")
    print(f"{'model':40s} {'test top-1':>10s} {'vs fp32 (points, 95% CI)':>28s} {'McNemar p':>10s} {'agree':>6s} "
          f"{'b1 p50 ms':>10s} {'b1 p95 ms':>10s} {'b32 img/s':>10s}")
    for name, r in results.items():
        vs = (f"{r['vs_fp32_points']:+.2f} [{r['vs_fp32_low']:+.2f}, {r['vs_fp32_high']:+.2f}]"
              if "vs_fp32_points" in r else "–")
        p = f"{r['mcnemar_p']:.3g}" if "mcnemar_p" in r else "–"
        agree = f"{100 * r['agreement_with_fp32']:.1f}%" if "agreement_with_fp32" in r else "–"
        lat = (f"{r['b1_p50_ms']:10.3f} {r['b1_p95_ms']:10.3f} {r['b32_images_per_s']:10.1f}" if "b1_p50_ms" in r
               else f"{'–':>10s} {'–':>10s} {'–':>10s}")
        print(f"{name:40s} {100 * r['test_top1']:10.2f} {vs:>28s} {p:>10s} {agree:>6s} {lat}")
    if emulated_rows:
        print(f"\nemulated (qemu-x86_64 -cpu {args.emulate_cpu}) vs the same file run natively here, first "
              f"{emulated_rows[0]['images']} test images:")
        print(f"{'model':60s} {'top-1':>7s} {'native':>7s} {'fp32':>7s} {'agree':>7s} {'max |dp|':>9s}")
        for r in emulated_rows:
            print(f"{r['model']:60s} {100 * r['top1']:7.2f} {100 * r['native_top1']:7.2f} {100 * r['fp32_top1']:7.2f} "
                  f"{100 * r['agreement_with_native']:6.1f}% {r['max_abs_prob_diff']:9.2e}")
    if args.json:
        out = {"cpu": cpu, "data": data.source, "results": {k: {kk: vv for kk, vv in v.items() if kk != "preds"}
                                                             for k, v in results.items()},
               "emulated": emulated_rows}
        Path(args.json).write_text(json.dumps(out, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
