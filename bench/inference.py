"""Inference at the machine's limit, in one command: scoring and Serve next to their ceilings.

    python bench/inference.py [--student URI] [--ensemble URI] [--limits 2000,8189] [--isa avx2]

Runs, one after the other on this machine, `bench/score_throughput.py` (the INT8 student on the
first N Flowers-102 images, for each N in --limits: decode-only, model-only, the in-process and Ray
Data engines end to end, time to the first scored batch) and `bench/serve_load.py` (both endpoints
over HTTP at concurrency 1/4/8/16, then their limits measured in-process with the replica's threads),
then prints one table: each figure, its limit (decode-only, model-only, the shared-CPU ceiling
1/(1/decode + 1/model)) and the ratio, with `lscpu`'s model name and SIMD flags and the load average.

`--isa avx2` runs both with `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`: torch's oneDNN and ATen
kernels (the fp32 checkpoints, a members-served ensemble) stop at AVX2, as on an AVX2-only EPYC. ONNX Runtime (the INT8 student, the
fused ensemble) has no such switch: its figures in that run are still this CPU's own, and say so.

Models: `--student`/`--ensemble` (default the registered champions of the store MLflow points at:
MLFLOW_TRACKING_URI, else ./.flowers). A model that cannot be resolved exits 2 with one line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import cpu_line, unresolvable  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict[str, str], log: Path) -> int:
    """A bench as a child process; its output goes to `log` and, line by line, to ours."""
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            fh.write(line)
            if not line.startswith(("Downloading artifacts", "(")):
                sys.stdout.write("  " + line)
        return proc.wait()


def pct(x: float | None) -> str:
    return f"{100 * x:.0f} %" if x is not None else "–"


def score_rows(d: dict) -> list[tuple[str, str, str, str]]:
    """(figure, value, limit, ratio) rows of one score_throughput result."""
    s, n = d["single"], d["images"]
    m, dec, ceil = s["model_only"], s["decode_only"], s["ceiling"]
    rows = [(f"scoring {n} images: decode-only / model-only (2 x 1 thread)", f"{dec:.0f} / {m:.0f} img/s",
             f"ceiling {ceil:.0f} img/s", f"{pct(s['ceiling_share'])} of min")]
    cli = d.get("cli_20") or {}
    if cli:
        rows.append(("`flowers score` on 20 images, fresh process", f"{cli['wall_s']:.1f} s wall",
                     f"job {cli['job_s']:.2f} s", f"first batch {cli['phases'].get('first_batch_s', 0):.2f} s"))
    for run_ in s["pipeline"].values():
        name = f"{run_['engine']} engine ({run_.get('note') or str(run_.get('workers')) + ' workers'})"
        rows.append((f"scoring {n}: {name}, end to end", f"{run_['end_to_end']:.0f} img/s ({run_['total_s']:.1f} s)",
                     f"min {min(m, dec):.0f}; ceiling {ceil:.0f}", f"{pct(run_['end_to_end_share'])} of min"))
        rows.append((f"scoring {n}: {name}, steady / first batch", f"{run_['steady']:.0f} img/s / "
                     f"{run_['first_batch_s']:.2f} s", "first batch ≤ 2 s", f"{pct(run_['steady_share'])} of min"))
    return rows


def serve_rows(d: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for route, x in d.get("limits", {}).items():
        rows.append((f"Serve {route}: best req/s (concurrency {x['best_concurrency']})", f"{x['best_rps']:.1f} req/s",
                     f"model-only {x['model']:.1f} img/s (b{x['batch']}: {x['model_batch']:.1f}, b1: "
                     f"{x['model_b1']:.1f}); ceiling {x['ceiling']:.1f}",
                     f"{pct(x['of_model'])} of model-only, {pct(x['of_ceiling'])} of ceiling"))
        c8 = [lv for lv in d["levels"][route] if lv["concurrency"] == 8]
        if c8:
            rows.append((f"Serve {route} @ concurrency 8: p50 / p99", f"{c8[0]['p50']} / {c8[0]['p99']} ms",
                         "p99 ≤ 2 x p50", f"{x.get('p99_over_p50_c8', float('nan')):.2f}x"))
    for m in d.get("models", []):
        b = m.get("batching") or {}
        if b:
            rows.append((f"Serve {m['route']}: batching chosen at start-up", f"max_batch_size {b.get('max_batch_size')}, "
                         f"wait {b.get('batch_wait_timeout_s')} s", b.get("source", ""), b.get("reason", "")[:60]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="models:/flowers-student@champion")
    ap.add_argument("--ensemble", default="models:/flowers-ensemble@champion")
    ap.add_argument("--limits", default="2000,8189", help="image counts for the scoring runs (comma-separated)")
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each Serve load level")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: cap torch's oneDNN at AVX2 (ONEDNN_MAX_CPU_ISA); ONNX Runtime is not capped")
    ap.add_argument("--skip", choices=["score", "serve"], action="append", default=[])
    ap.add_argument("--json", help="also write every figure here")
    args = ap.parse_args(argv)

    why = unresolvable([args.student, args.ensemble])
    if why:
        print(why, file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.isa == "avx2":  # oneDNN (convolutions) and ATen's own vectorized kernels (softmax, elementwise)
        env.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    tmp = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    print(f"machine: {cpu_line()}; load average {os.getloadavg()[0]:.1f} at the start; ISA: {args.isa}"
          + ("" if args.isa == "native" else " (torch/oneDNN capped; ONNX Runtime paths run at this CPU's own ISA)"))
    out: dict = {"machine": cpu_line(), "isa": args.isa, "score": {}, "serve": None}
    if "score" not in args.skip:
        for n in [int(x) for x in args.limits.split(",") if x]:
            js = tmp / f"score-{n}.json"
            print(f"\n== bench/score_throughput.py --limit {n}")
            rc = run([sys.executable, "bench/score_throughput.py", "--model", args.student, "--limit", str(n),
                      "--engines", args.engines, "--json", str(js)], env, tmp / f"score-{n}.log")
            if rc or not js.is_file():
                print(f"error: score_throughput --limit {n} failed (exit {rc}); log: {tmp / f'score-{n}.log'}",
                      file=sys.stderr)
                return 1
            out["score"][n] = json.loads(js.read_text())
    if "serve" not in args.skip:
        js = tmp / "serve.json"
        print("\n== bench/serve_load.py")
        rc = run([sys.executable, "bench/serve_load.py", "--ensemble", args.ensemble, "--student", args.student,
                  "--seconds", str(args.seconds), "--rounds", "1", "--json", str(js)], env, tmp / "serve.log")
        if rc or not js.is_file():
            print(f"error: serve_load failed (exit {rc}); log: {tmp / 'serve.log'}", file=sys.stderr)
            return 1
        out["serve"] = json.loads(js.read_text())
    rows = [r for d in out["score"].values() for r in score_rows(d)] + (serve_rows(out["serve"]) if out["serve"] else [])
    print(f"\nmachine: {cpu_line()}; ISA {args.isa}; load average {os.getloadavg()[0]:.1f} at the end")
    print("| figure | measured | limit | ratio |\n|---|---:|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
