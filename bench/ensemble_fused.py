"""The L4 ensemble as one ONNX graph against its fp32 members: test top-1 and batch-1/batch-8 latency.

    FLOWERS_DATA=/path/to/flowers102 python bench/ensemble_fused.py \\
        --members l1=runs/l1 l2=runs/l2 l3=runs/l3 -c configs/level4.yaml -p study-cpu --out /tmp/fused

Builds the ensemble folder (`build_ensemble`), computes every member's and the vote's test
probabilities once, then runs what the L4 stage runs (`fuse_and_compare`): exports the fused fp32
and INT8 graphs, tests both, times members / fused fp32 / fused INT8 at batch 1 and 8, and picks the
served variant. Prints each member's test top-1, the three models' test top-1, latency and images/s
with the 1-minute load average next to each figure, the seconds the fusion added, peak memory, and
`lscpu`'s model and INT8-relevant flags. Single process, this machine's CPU share; other processes
inflate the latencies (see the load average). Tests never assert timing: this is the place for it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def lscpu_line() -> str:
    """`lscpu`'s model name and CPU count, and the SIMD flags that set CPU inference speed."""
    info = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    flags = [f for f in FLAGS if f in info.get("Flags", "").split()]
    return f"{info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPUs, flags: {' '.join(flags) or 'none'}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", nargs="+", required=True, metavar="KEY=URI", help="ensemble members (model URIs)")
    ap.add_argument("-c", "--config", default=str(REPO / "configs/level4.yaml"), help="the members' data config")
    ap.add_argument("-p", "--profile", default=None, help="profile the members were trained with (e.g. study-cpu)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", required=True, help="folder for the ensemble (and its fused graphs)")
    ap.add_argument("--iters", type=int, default=30, help="latency iterations per model and batch size")
    ap.add_argument("--json", default=None, help="also write the figures here")
    return ap.parse_args(argv)


def member_and_vote_probs(members, weights, test, batch_size: int):
    """Each member's and the weighted vote's test probabilities, one decode pass (members share views)."""
    from flowers.inference.ensemble_model import soft_vote
    from flowers.inference.predict import predict_dataset

    from flowers.inference.ensemble_model import member_views

    cols: dict[str, list[np.ndarray]] = {name: [] for name, _ in members}
    _, index = member_views([m.preprocessing for _, m in members])  # the dataset yields the ensemble's views

    def proba(x):
        ps = []
        for i, (name, m) in enumerate(members):
            p = m.predict_proba(x[index[i]] if isinstance(x, (tuple, list)) else x)
            cols[name].append(p)
            ps.append(p)
        return soft_vote(ps, weights)

    vote, labels = predict_dataset(proba, test, batch_size=batch_size)
    return {k: np.concatenate(v) for k, v in cols.items()}, vote, labels


def run(args: argparse.Namespace) -> dict:
    from flowers import config as C
    from flowers.data.bundle import build_data
    from flowers.inference.ensemble_model import load_ensemble, load_members
    from flowers.inference.fused_ensemble import fuse_and_compare
    from flowers.models.checkpoint import read_manifest
    from flowers.runtime import configure_torch_threads
    from flowers.training.ensemble import build_ensemble

    configure_torch_threads()
    cfg = C.load_config(args.config, args.profile, args.set)
    keys = [m.split("=", 1)[0] for m in args.members]
    uris = [m.split("=", 1)[1] for m in args.members]
    ens_dir = build_ensemble(uris, Path(args.out) / "model", member_names=keys)
    manifest = read_manifest(ens_dir)
    ens = load_ensemble(ens_dir, manifest, "cpu", fused=False)
    data = build_data(cfg.data, ens.preprocessing, seed=cfg.data.seed)
    test = data.eval_part("test", ens.transform(), ens.draft_size)
    calibration = data.eval_part("train", ens.transform(), ens.draft_size)
    t0 = time.perf_counter()
    with torch.inference_mode():
        member_probs, vote, labels = member_and_vote_probs(load_members(ens_dir, manifest), manifest["weights"], test,
                                                           cfg.data.eval_batch_size)
    members_seconds = time.perf_counter() - t0
    entry = fuse_and_compare(ens_dir, calibration, test, vote, labels, batch_size=cfg.data.eval_batch_size,
                             latency_iters=args.iters)
    return {"cpu": lscpu_line(), "data": f"{data.source}, test {len(labels)} images", "ensemble": str(ens_dir),
            "members": {k: {"uri": u, "test_top1": float((member_probs[k].argmax(1) == labels).mean())}
                        for k, u in zip(keys, uris)},
            "members_test_pass_seconds": members_seconds, "fused": entry,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loadavg_end": os.getloadavg()}


def report(res: dict) -> None:
    f = res["fused"]
    print(f"CPU: {res['cpu']}\ndata: {res['data']}\nensemble: {res['ensemble']}")
    for k, m in res["members"].items():
        print(f"  member {k}: test top-1 {100 * m['test_top1']:.2f} %  ({m['uri']})")
    print(f"\n{'model':<14}{'test top-1':>11}{'b1 p50 ms':>11}{'load':>6}{'b8 p50 ms':>11}{'b8 img/s':>10}{'load':>6}")
    for name, by_b in f["latency"].items():
        b1, b8 = by_b["1"], by_b["8"]
        print(f"{name:<14}{100 * f['test_top1'][name]:>10.2f}%{b1['p50_ms']:>11.1f}{b1['loadavg']:>6.1f}"
              f"{b8['p50_ms']:>11.1f}{b8['images_per_s']:>10.1f}{b8['loadavg']:>6.1f}")
    base = f["latency"]["members_fp32"]
    for name in ("fused_fp32", "fused_int8"):
        print(f"speed-up {name} vs members: batch 1 x{base['1']['p50_ms'] / f['latency'][name]['1']['p50_ms']:.2f}, "
              f"batch 8 x{base['8']['p50_ms'] / f['latency'][name]['8']['p50_ms']:.2f}")
    print(f"served: {f['variant']} ({f['why']}); fp32 graph vs members max |dp| {f['fp32_max_abs_prob_diff']:.2e}; "
          f"INT8 top-1 agreement with members {100 * f['int8_top1_agreement_with_members']:.2f} %")
    s = f["seconds"]
    print(f"seconds added by fusion: export {s['export']:.0f}, test both graphs {s['evaluate']:.0f}, latency "
          f"{s['latency']:.0f}, total {s['total']:.0f} (members' test pass here: {res['members_test_pass_seconds']:.0f}); "
          f"peak RSS {res['peak_rss_mib']:.0f} MiB; load average at the end {res['loadavg_end'][0]:.1f}")


def main(argv: list[str] | None = None) -> int:
    from flowers.errors import user_errors

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flowers.inference.fused_ensemble").setLevel(logging.INFO)
    args = parse_args(argv)
    try:
        res = run(args)
    except user_errors() as e:  # a missing or unreadable member: one line, exit 2
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
