"""Bounded closed-loop HTTP load on the flowers Serve app (loopback only).

    python bench/serve_load.py --ensemble models:/flowers-ensemble@champion \\
        --student models:/flowers-student@champion [--requests 64] [--max-seconds 30]

Starts a local Ray + Serve on 127.0.0.1, then, for concurrency 1, 4 and 16, keeps that many
requests in flight (each client sends its next request when the last one returns) until
--requests have completed or --max-seconds have passed. Images: Flowers-102 JPEGs from
$FLOWERS_DATA/jpg, else synthetic JPEGs. Prints:
  1. req/s and p50/p95/p99 per endpoint and concurrency, side by side with their ratio;
  2. the ensemble at concurrency 16 with batching on (config) vs off (max_batch_size=1,
     applied live through user_config);
  3. the student's HTTP p50 at concurrency 1 vs its in-process Predictor latency.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_images(n: int) -> tuple[list[bytes], str]:
    root = os.environ.get("FLOWERS_DATA")
    if root and (Path(root) / "jpg").is_dir():
        files = sorted((Path(root) / "jpg").glob("*.jpg"))[:n]
        if files:
            return [f.read_bytes() for f in files], f"Flowers-102 JPEGs from {root}/jpg"
    from flowers.data import write_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="serve_load_")) / "synth"
    write_synthetic(tmp, num_classes=5, per_class=max(3, n // 5 + 1), size=500, seed=0)
    return [f.read_bytes() for f in sorted((tmp / "jpg").glob("*.jpg"))[:n]], "synthetic 500 px JPEGs"


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


async def closed_loop(url: str, images: list[bytes], concurrency: int, requests: int, max_seconds: float) -> dict:
    import httpx

    lat: list[float] = []
    server: list[float] = []  # ingress-side latency_ms
    model: list[float] = []  # batch_ms: the forward pass (decode included) this request rode in
    errors = 0
    sent = 0
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker(wid: int) -> None:
            nonlocal sent, errors
            while sent < requests and time.perf_counter() < deadline:
                img = images[sent % len(images)]
                sent += 1
                t0 = time.perf_counter()
                r = await client.post(url, content=img, headers={"content-type": "image/jpeg"})
                if r.status_code == 200:
                    lat.append((time.perf_counter() - t0) * 1e3)
                    body = r.json()
                    server.append(body["latency_ms"])
                    model.append(body["batch_ms"])
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "ok": len(lat), "errors": errors, "seconds": round(wall, 2),
            "rps": round(len(lat) / wall, 2) if wall else 0.0,
            "p50": round(pct(lat, 50), 1), "p95": round(pct(lat, 95), 1), "p99": round(pct(lat, 99), 1),
            "server_p50": round(pct(server, 50), 1), "model_p50": round(pct(model, 50), 1)}


def run_level(base: str, route: str, images, c: int, args) -> dict:
    url = f"{base}/v1/predict/{route}"
    asyncio.run(closed_loop(url, images, c, min(c * 2, 8), 10))  # warm-up: connections, first batches
    return asyncio.run(closed_loop(url, images, c, max(args.requests, c * 2), args.max_seconds))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensemble", default="models:/flowers-ensemble@champion")
    p.add_argument("--student", default="models:/flowers-student@champion")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=64, help="completed requests per level (bounded)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="time cap per level")
    p.add_argument("--cpus-per-model", type=float, default=1.0, help="num_cpus (= torch threads) per model replica")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-s", type=float, default=0.002)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from flowers.predict import Predictor
    from flowers.runtime import configure_torch_threads, worker_runtime_env
    from serve.app import build_app

    images, source = load_images(64)
    renv = worker_runtime_env({"PYTHONPATH": str(REPO)})
    need = 2 * args.cpus_per_model + 0.1
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need)), include_dashboard=False, runtime_env=renv,
             log_to_driver=False, configure_logging=False)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    app_args = {"ensemble_uri": args.ensemble, "student_uri": args.student}

    def deploy(ens_batch: int) -> None:
        model = {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": args.cpus_per_model}}
        opts = {"Ensemble": {**model, "user_config": {"max_batch_size": ens_batch, "batch_wait_timeout_s": args.batch_wait_s}},
                "Student": {**model, "user_config": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s}},
                "Ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}}
        serve.run(build_app(app_args, opts), name="bench", route_prefix="/")

    results: dict = {"images": source, "cpus": os.cpu_count(), "cpus_per_model": args.cpus_per_model,
                     "max_batch_size": args.max_batch_size, "batch_wait_s": args.batch_wait_s, "levels": {}}
    try:
        t_start = time.time()
        deploy(args.max_batch_size)
        import httpx

        results["models"] = httpx.get(f"{base}/v1/models", timeout=30).json()["models"]
        for route in ("ensemble", "student"):
            results["levels"][route] = [run_level(base, route, images, c, args) for c in args.concurrency]
        c_hi = max(args.concurrency)
        deploy(1)  # same code and args: Serve reconfigures the live replica (batching off)
        results["ensemble_no_batching"] = run_level(base, "ensemble", images, c_hi, args)
        seen = httpx.get(f"{base}/v1/models", timeout=30).json()["models"]
        results["batch_sizes_seen"] = {m["route"]: m["batch_sizes_seen"] for m in seen}
        results["serve_seconds"] = round(time.time() - t_start, 1)
    finally:
        serve.shutdown()
        ray.shutdown()

    # in-process student latency with the replica's thread count, for the HTTP overhead figure
    configure_torch_threads(max(1, int(args.cpus_per_model)))
    pred = Predictor.from_uri(args.student)
    for img in images[:5]:
        pred.predict([img])
    lat = []
    for i in range(min(100, max(30, args.requests))):
        t0 = time.perf_counter()
        pred.predict([images[i % len(images)]])
        lat.append((time.perf_counter() - t0) * 1e3)
    results["student_in_process_p50_ms"] = round(statistics.median(lat), 2)
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def print_report(r: dict) -> None:
    print(f"\nimages: {r['images']}; {r['cpus']} CPUs; {r['cpus_per_model']} CPU(s)/model replica; "
          f"batch {r['max_batch_size']}, wait {r['batch_wait_s']} s")
    for m in r.get("models", []):
        print(f"  {m['route']}: {m['name']} v{m['version']} ({m['kind']}, {m['uri']})")
    ens, stu = r["levels"]["ensemble"], r["levels"]["student"]
    print("\n| conc | ensemble req/s | p50 | p95 | p99 ms | student req/s | p50 | p95 | p99 ms | student/ensemble req/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for e, s in zip(ens, stu):
        ratio = s["rps"] / e["rps"] if e["rps"] else float("nan")
        print(f"| {e['concurrency']} | {e['rps']} | {e['p50']} | {e['p95']} | {e['p99']} | {s['rps']} | {s['p50']} | "
              f"{s['p95']} | {s['p99']} | {ratio:.2f}x |")
    errs = sum(x["errors"] for x in ens + stu)
    on, off = ens[-1], r["ensemble_no_batching"]
    print(f"\nensemble @ concurrency {on['concurrency']}: batching on {on['rps']} req/s (p50 {on['p50']} ms) vs off "
          f"{off['rps']} req/s (p50 {off['p50']} ms) → {on['rps'] / off['rps'] if off['rps'] else float('nan'):.2f}x "
          f"(target ≥ 1.5x)")
    print(f"batch sizes seen (size: batches): {r['batch_sizes_seen']}")
    http_p50 = stu[0]["p50"]
    print(f"student @ concurrency 1: HTTP p50 {http_p50} ms vs in-process {r['student_in_process_p50_ms']} ms → "
          f"overhead {http_p50 - r['student_in_process_p50_ms']:.2f} ms (target ≤ 3 ms)")
    print(f"  where it goes (p50s): forward pass in the replica {stu[0]['model_p50']} ms; ingress→replica→ingress "
          f"{stu[0]['server_p50']} ms (adds the batch wait and one Ray hop); client→proxy→ingress→client "
          f"{http_p50} ms (adds HTTP and the proxy hop)")
    print(f"errors: {errs + off['errors']}")


if __name__ == "__main__":
    sys.exit(main())
