"""What makes the CPU study fast, measured in one run on one machine (speed only: random tensors).

    python bench/train_speedups.py                # 1 thread (a study trial's share), all rows
    python bench/train_speedups.py --threads 2

Rows (images per second, higher is better), each against its baseline in the same run:

* training step of the whole EfficientNet-Lite0 at 224 px and at 128 px (the old study-cpu profile),
  vs the frozen-trunk step on cached features (`model.trainable_units` 1 and 2, the study-cpu profile);
* the trunk forward that builds the cache: NCHW vs channels_last, and bf16 autocast where the CPU
  has native bf16 (avx512_bf16 / amx_bf16), otherwise reported as not applicable;
* `torch.compile` of the frozen-trunk step: compile seconds and the step rate after it;
* the study's two hot paths again with torch's kernels limited to AVX2 (`ATEN_CPU_CAPABILITY`,
  `ONEDNN_MAX_CPU_ISA`, `MKL_ENABLE_INSTRUCTIONS`, in a child process): how much of the gap to an
  AVX2-only CPU the instruction set alone explains (clock, caches and memory are still this machine's).

Allocator settings matter a lot on this machine type (README): run it the way the project runs
everything, with `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` set (make does; `flowers`
re-execs itself with them). The script prints whether they are set, and the CPU flags.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from flowers.inference.onnx_models import cpu_flags, describe_cpu
from flowers.models import TailNet, build_model


def rate(step, batch: int, warmup: int = 2, iters: int = 6) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - t0)


def full_step(size: int, batch: int):
    model = build_model("efficientnet_lite0", num_classes=102, pretrained=False).train()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 102, (batch,))

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def tail_step(units: int, batch: int, compiled: bool = False):
    model = build_model("efficientnet_lite0", num_classes=102, pretrained=False)
    net = TailNet(model, units).train()
    with torch.no_grad():
        feats = net.trunk(torch.randn(2, 3, 224, 224))
    x = torch.randn(batch, *feats.shape[1:]).half()  # the cache stores float16
    y = torch.randint(0, 102, (batch,))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    fwd = torch.compile(net) if compiled else net

    def step():
        loss = F.cross_entropy(fwd(x.float()), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def trunk_rate(batch: int, channels_last: bool, bf16: bool) -> float:
    model = build_model("efficientnet_lite0", num_classes=102, pretrained=False).eval()
    net = TailNet(model, 2)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net.trunk(x)
    return rate(step, batch)


# what torch reads at start-up to pick its kernels: ATen's vectorized ops, oneDNN (convolutions), MKL (GEMM)
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def hot_paths(batch: int) -> dict[str, float]:
    """The study's two hot paths: the cache build's trunk forward and the frozen-trunk training step."""
    return {"trunk": trunk_rate(batch, True, False), "tail2": rate(tail_step(2, batch), batch)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--no-isa", action="store_true", help="skip the AVX2-kernels-only rows")
    ap.add_argument("--hot-paths-json", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.hot_paths_json:
        torch.manual_seed(0)
        print(json.dumps(hot_paths(args.batch)))
        return
    torch.manual_seed(0)
    info = cpu_flags()
    try:
        flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        flags = set()
    alloc = all(os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    print(f"CPU: {describe_cpu(info)}; bf16: {' '.join(sorted(f for f in flags if 'bf16' in f)) or 'none'}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, "
          f"allocator env {'set' if alloc else 'NOT set (figures will be lower)'}")
    rows: list[tuple[str, float, str]] = []
    b = args.batch
    full224 = rate(full_step(224, 32), 32, iters=3)
    full128 = rate(full_step(128, 32), 32, iters=3)
    t1 = rate(tail_step(1, b), b)
    t2 = rate(tail_step(2, b), b)
    rows += [("train step, whole Lite0 at 224 px", full224, "1.00x"),
             ("train step, whole Lite0 at 128 px (old study-cpu)", full128, f"{full128 / full224:.2f}x vs 224"),
             ("train step, cached trunk, trainable_units=2 (study-cpu)", t2, f"{t2 / full224:.1f}x vs whole 224, "
              f"{t2 / full128:.1f}x vs whole 128"),
             ("train step, cached trunk, trainable_units=1", t1, f"{t1 / full224:.1f}x vs whole 224")]
    nchw = trunk_rate(b, False, False)
    cl = trunk_rate(b, True, False)
    rows += [("cache build: trunk forward at 224, NCHW", nchw, "1.00x"),
             ("cache build: trunk forward at 224, channels_last (used)", cl, f"{cl / nchw:.2f}x vs NCHW")]
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & set(flags))
    if native_bf16:
        bf = trunk_rate(b, True, True)
        rows.append(("cache build: channels_last + bf16 autocast (not used: features would differ by CPU)", bf,
                     f"{bf / cl:.2f}x vs fp32"))
    else:
        rows.append(("cache build: bf16 autocast", float("nan"), "n/a: no native bf16 on this CPU"))
    if not args.no_compile:
        t0 = time.perf_counter()
        step = tail_step(2, b, compiled=True)
        step()  # compiles
        compile_s = time.perf_counter() - t0
        tc = rate(step, b)
        rows.append((f"train step, cached trunk units=2, torch.compile ({compile_s:.0f} s to compile)", tc,
                     f"{tc / t2:.2f}x vs eager; pays off after {compile_s / max(1e-9, 1 / t2 - 1 / tc) / 6551:.1f} "
                     "epochs of 6551 images" if tc > t2 else f"{tc / t2:.2f}x vs eager: does not pay off"))
    if not args.no_isa:
        here = hot_paths(b)
        out = subprocess.run([sys.executable, __file__, "--hot-paths-json", "--threads", str(args.threads),
                              "--batch", str(b)], env={**os.environ, **AVX2_ONLY}, capture_output=True, text=True,
                             check=True).stdout
        avx2 = json.loads(out.strip().splitlines()[-1])
        for key, name in (("trunk", "cache build: trunk forward, channels_last"),
                          ("tail2", "train step, cached trunk, trainable_units=2")):
            rows.append((f"{name}, torch kernels limited to AVX2", avx2[key],
                         f"{here[key] / avx2[key]:.2f}x slower than this CPU's own kernels ({here[key]:.1f} img/s "
                         "in this pass)"))
    width = max(len(r[0]) for r in rows)
    for name, r, note in rows:
        print(f"{name:<{width}}  {r:8.1f} img/s  {note}")


if __name__ == "__main__":
    main()
