"""Does batching pay on this CPU? Model-only img/s at batch 1..16, what start-up calibration chooses,
and (with --serve) Serve over HTTP with batching per the calibration vs off.

    python bench/serve_batching.py [--student URI] [--ensemble URI] [--threads 1] [--serve]

Models: `--student` / `--ensemble` (any model URI or path). Without them, STAND-INS are built
once under --work-dir and every line says so (speed only, accuracy meaningless):
  - student: a random-init MobileNet-V3-Large at 224 px exported as the study exports its student
    (`export_student`: ONNX, static INT8, default 7-bit recipe, calibrated on random images);
  - ensemble: three random-init EfficientNet-Lite0 checkpoints at 224 px (the study-cpu profile's
    members) written as an L4 ensemble folder (`build_ensemble`): fp32 torch, soft voting.

1. Model-only, in this process, with the threads a Serve replica gets (--threads, its num_cpus:
   OMP_NUM_THREADS for ONNX Runtime, torch's intra-op threads): each size's median over
   interleaved rounds (`flowers.inference.calibration.measure_sizes` with a long budget).
2. What the start-up calibration (`calibrate_batching`; budget 3 s for the student, 8 s for the
   ensemble, as the deployments are meant to get) chooses, run --calibrations times, so its
   stability on this machine shows.
3. --serve: a local Ray + Serve (HAProxy front as `flowers serve`), both models deployed with one
   replica of --threads CPUs; each route at each --concurrency with batching off
   (max_batch_size 1), per the calibration, and per today's fixed config (max 16), in interleaved
   rounds; req/s, p50/p99 and req/s over the model-only rate at the best batch size (the ceiling
   one replica can reach).
The machine may be shared (other jobs running): the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lscpu_line() -> str:
    """`lscpu`'s model name, CPU count, and the SIMD flags that set CPU inference speed."""
    info = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
    flags = set(info.get("Flags", "").split())
    keep = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
                        "amx_int8", "amx_bf16") if f in flags]
    return (f"{info.get('Model name', '?')}, {info.get('CPU(s)', os.cpu_count())} CPUs, "
            f"flags: {' '.join(keep) or 'no avx2/avx512/vnni/amx'}")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def random_checkpoint(arch: str, size: int, dst: Path) -> Path:
    """A random-init checkpoint of `arch` at `size` px with the 102 Flowers classes (speed only)."""
    import torch

    from flowers.data import class_names
    from flowers.data.transforms import Preprocessing
    from flowers.models import build_model, model_spec
    from flowers.models.checkpoint import CHECKPOINT_FORMAT

    spec = model_spec(arch)
    names = class_names()
    net = build_model(arch, num_classes=len(names), pretrained=False, dropout=0.0)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": arch, "dropout": 0.0, "class_names": names,
                "preprocessing": Preprocessing.for_size(size, spec.mean, spec.std).to_dict(),
                "config": {"level": f"bench-random-{arch}"}, "task": "classification", "model": net.state_dict()}, dst)
    return dst


def stand_in_student(work: Path) -> tuple[str, str]:
    label = "STAND-IN student: random-init mobilenet_v3_large @224 px, INT8 ONNX (export_student); speed only"
    out = work / "student"
    if not (out / "flowers_model.json").is_file():
        import torch

        from flowers.inference.export import export_student

        ckpt = random_checkpoint("mobilenet_v3_large", 224, work / "random_mnv3l.pt")
        g = torch.Generator().manual_seed(0)
        calib = [torch.randint(0, 256, (16, 3, 224, 224), generator=g, dtype=torch.uint8) for _ in range(4)]
        export_student(ckpt, out, calib, calibration_size=64, torchscript=False, dynamic=False)
    return str(out), label


def stand_in_ensemble(work: Path) -> tuple[str, str]:
    label = ("STAND-IN ensemble: 3 random-init efficientnet_lite0 @224 px, fp32 torch, soft voting "
             "(build_ensemble); speed only")
    out = work / "ensemble"
    if not (out / "flowers_model.json").is_file():
        from flowers.training.ensemble import build_ensemble

        members = [str(random_checkpoint("efficientnet_lite0", 224, work / f"random_lite0_{i}.pt")) for i in range(3)]
        build_ensemble(members, out)
    return str(out), label


def model_only(route: str, uri: str, label: str, args) -> dict:
    """The long model-only table and --calibrations start-up calibrations of one model, in this process."""
    from flowers.inference.calibration import DEFAULT_BUDGET_S, batch_sizes, choose_batching, measure_sizes, timing_table
    from flowers.inference.predict import load_model

    model = load_model(uri)
    model.predict_proba(model.example_batch(1))
    samples = measure_sizes(model, batch_sizes(args.max_batch), args.table_s, reps=args.table_reps)
    table = timing_table(samples)
    budget = args.budget_s or (args.ensemble_budget_s if route == "ensemble" else DEFAULT_BUDGET_S)
    # as a replica does it: the config's values (max 16, its wait) when calibration cannot run
    wait = 0.03 if route == "ensemble" else 0.0
    choices = [choose_batching(model, args.max_batch, wait, budget_s=budget, label=route)
               for _ in range(args.calibrations)]
    return {"uri": uri, "label": label, "kind": model.meta.get("kind"), "table": [t.__dict__ for t in table],
            "skipped": samples.skipped, "calibrations": [c.as_dict() for c in choices]}


def print_model(name: str, r: dict) -> None:
    print(f"\n## {name}: {r['label']}")
    print(f"   {r['uri']} (kind {r['kind']})")
    base = r["table"][0]
    print("| batch | fastest ms/pass | ms/image | img/s | vs batch 1 | median ms/pass | passes | paired gain (pairs) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in r["table"]:
        print(f"| {t['size']} | {t['ms_per_batch']:.2f} | {t['ms_per_image']:.2f} | {t['images_per_s']:.1f} | "
              f"{t['images_per_s'] / base['images_per_s']:.2f}x | {t['ms_median']:.2f} | {t['reps']} | "
              f"{t['gain']:.2f}x ({t['pairs']}) |")
    if r["skipped"]:
        print(f"   not measured within --table-s: batch {r['skipped']}")
    for i, c in enumerate(r["calibrations"], 1):
        print(f"   calibration {i} ({c['source']}, {c['elapsed_s']:.2f} s of a {c['budget_s']:g} s budget, {c['threads']} thread(s)): "
              f"max_batch_size {c['max_batch_size']}, wait {c['batch_wait_timeout_s'] * 1e3:.1f} ms, "
              f"{c['speedup']:.2f}x; {c['reason']}")


def serve_compare(models: dict[str, dict], args) -> dict:
    """Both models on Serve; each route at each concurrency with batching off vs the calibrated choice."""
    sys.path.insert(0, str(REPO / "bench"))
    from serve_load import closed_loop, load_images  # the existing load client

    from serve.ingress_env import LOCAL_DRAIN_S, ingress_env, resolve_proxy
    from raylink.ports import pick_port as free_port

    proxy, warning = resolve_proxy("haproxy")
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    os.environ.update(ingress_env(proxy, 10 * 1024 * 1024, {"stats": free_port(), "metrics": free_port(),
                                  "fallback": free_port(), "fallback_grpc": free_port()}, LOCAL_DRAIN_S))
    import asyncio

    import ray
    from ray import serve

    from flowers.runtime import worker_runtime_env
    from serve.app import make_app

    images, source = load_images(64)
    chosen = {route: r["calibrations"][0] for route, r in models.items()}
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(2 * args.threads + 0.1)), include_dashboard=False,
             runtime_env=worker_runtime_env(), log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"

    # today's fixed config (serve/config.yaml): max 16, the ensemble waits 30 ms, the student 0
    fixed = {"ensemble": {"max_batch_size": 16, "batch_wait_timeout_s": 0.03},
             "student": {"max_batch_size": 16, "batch_wait_timeout_s": 0.0}}

    def deploy(setting: str) -> None:
        def opts(route: str, ongoing: int) -> dict:
            c = chosen[route]
            user = {"off": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}, "fixed": fixed[route],
                    "calibrated": {"max_batch_size": c["max_batch_size"],
                                   "batch_wait_timeout_s": c["batch_wait_timeout_s"]}}[setting]
            return {"num_replicas": 1, "max_ongoing_requests": ongoing, "ray_actor_options": {"num_cpus": args.threads},
                    "user_config": user}
        serve.run(make_app({"ensemble_uri": models["ensemble"]["uri"], "student_uri": models["student"]["uri"]},
                           {"Ensemble": opts("ensemble", 64), "Student": opts("student", 128)}),
                  name="bench", route_prefix="/")

    out: dict = {"images": source, "chosen": {k: {"max_batch_size": v["max_batch_size"],
                                                  "batch_wait_timeout_s": v["batch_wait_timeout_s"]}
                                              for k, v in chosen.items()}, "runs": []}
    try:
        for rnd in range(args.rounds):
            for setting in ("off", "calibrated", "fixed"):  # interleaved: a drift in machine speed hits all alike
                deploy(setting)
                for route in ("student", "ensemble"):
                    url = f"{base}/v1/predict/{route}"
                    for c in args.concurrency:
                        asyncio.run(closed_loop(url, images, c, c * 3, 10))  # warm-up
                        level = asyncio.run(closed_loop(url, images, c, 10**6, args.seconds))
                        out["runs"].append({"round": rnd, "route": route, "setting": setting, **level})
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def print_serve(s: dict, models: dict[str, dict]) -> None:
    print(f"\n## Serve over HTTP (images: {s['images']}); calibrated = the first calibration's choice: {s['chosen']}; "
          "fixed = max 16, wait 30 ms (ensemble) / 0 (student), today's serve/config.yaml")
    print("| route | conc | off req/s | p50 / p99 ms | calibrated req/s | p50 / p99 ms | fixed req/s | p50 / p99 ms "
          "| calibrated/off | fixed/off | calibrated / model-only best |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for route in ("student", "ensemble"):
        best = max(t["images_per_s"] for t in models[route]["table"])
        for c in sorted({r["concurrency"] for r in s["runs"]}):
            cells, rates = [], {}
            for setting in ("off", "calibrated", "fixed"):
                runs = [r for r in s["runs"] if (r["route"], r["concurrency"], r["setting"]) == (route, c, setting)]
                rates[setting] = sum(r["ok"] for r in runs) / max(1e-9, sum(r["seconds"] for r in runs))
                cells.append(f"{rates[setting]:.1f} | {runs[-1]['p50']} / {runs[-1]['p99']}")
            off = rates["off"] or float("nan")
            print(f"| {route} | {c} | {' | '.join(cells)} | {rates['calibrated'] / off:.2f}x | "
                  f"{rates['fixed'] / off:.2f}x | {rates['calibrated'] / best:.0%} |")
    errors = sum(r["errors"] for r in s["runs"])
    print(f"errors: {errors}; model-only best = the best img/s of the table above (same threads, no decode, no HTTP)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", help="student model URI/path (default: a stand-in built under --work-dir)")
    p.add_argument("--ensemble", help="ensemble model URI/path (default: a stand-in built under --work-dir)")
    p.add_argument("--threads", type=int, default=1, help="threads per model = a Serve replica's num_cpus")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--table-s", type=float, default=20.0, help="time budget of each model's long table")
    p.add_argument("--table-reps", type=int, default=9, help="rounds (passes per size) in the long table")
    p.add_argument("--budget-s", type=float, default=None,
                   help="the start-up calibration's budget for both models (default: 3 s student, --ensemble-budget-s)")
    p.add_argument("--ensemble-budget-s", type=float, default=8.0,
                   help="the ensemble's calibration budget (a slow model needs longer for 2 rounds up to batch 16)")
    p.add_argument("--calibrations", type=int, default=3, help="start-up calibrations per model (stability)")
    p.add_argument("--serve", action="store_true", help="also compare batching off/on over HTTP")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 16])
    p.add_argument("--seconds", type=float, default=8.0, help="duration of each HTTP load level")
    p.add_argument("--rounds", type=int, default=1, help="off/on rounds over HTTP")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "serve-batching-bench"))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    # before any model loads: ONNX Runtime sessions take OMP_NUM_THREADS as their intra-op threads
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from flowers.runtime import allocator_active, configure_torch_threads

    configure_torch_threads(args.threads)
    work = Path(args.work_dir)
    print(f"CPU: {lscpu_line()}")
    print(f"load before: {loadavg()} (this machine may be shared with other jobs: figures vary with them)")
    print(f"threads per model: {args.threads}; allocator settings active: {allocator_active()}")
    models = {}
    for route, uri, build in (("student", args.student, stand_in_student), ("ensemble", args.ensemble, stand_in_ensemble)):
        uri, label = (uri, f"{route} {uri}") if uri else build(work)
        models[route] = model_only(route, uri, label, args)
        print_model(route, models[route])
    result: dict = {"cpu": lscpu_line(), "threads": args.threads, "models": models}
    if args.serve:
        result["serve"] = serve_compare(models, args)
        print_serve(result["serve"], models)
    print(f"\nload after: {loadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    from flowers.errors import user_errors

    try:
        sys.exit(main())
    except user_errors() as e:  # a missing or unreadable model: one line, exit 2
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
