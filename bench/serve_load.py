"""Bounded closed-loop HTTP load on the flowers Serve app (loopback only).

    python bench/serve_load.py --ensemble models:/flowers-ensemble@champion \\
        --student models:/flowers-student@champion [--seconds 10] [--proxy haproxy|serve]

Starts a local Ray + Serve on 127.0.0.1 (HTTP front as `flowers serve` has it: HAProxy by
default, see serve/ingress_env.py) with the batching of serve/config.yaml, then, for
concurrency 1, 4 and 16, keeps that many requests in flight (each client sends its next
request when the last one returns) for --seconds after a short warm-up, or until --requests
have completed. Concurrency 1 uses one keep-alive connection from a plain blocking client (the
lowest-overhead client, so its p50 is the server's latency plus loopback); higher levels use
an asyncio client. Images: Flowers-102 JPEGs from $FLOWERS_DATA/jpg, else synthetic JPEGs.
Prints:
  1. req/s and p50/p95/p99 per endpoint and concurrency, side by side with their ratio;
  2. the ensemble at concurrency 16 with batching off (max_batch_size=1), on (config), and on
     without the admission gate (Serve's batching alone, `admission_gate: false`), each applied
     live through user_config, in interleaved rounds (--rounds);
  3. the student's HTTP p50 at concurrency 1 vs its in-process Predictor latency, in
     alternating blocks while Serve runs;
  4. each endpoint's limits, measured in this process after Serve has stopped, with the replica's
     threads: decode-only img/s, model-only img/s at batch 1 and at the batch size the endpoint
     used most under load, the shared-CPU ceiling 1/(1/decode + 1/model); then the endpoint's best
     req/s as a share of each, and p99/p50 at concurrency 8 (targets: >= 80 % of model-only,
     p99 <= 2x p50).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path



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


class Samples:
    """Per-request figures of one load level: client latency, server latency, forward pass."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.server: list[float] = []  # the response's latency_ms (server side)
        self.model: list[float] = []  # batch_ms: the forward pass (decode included) it rode in
        self.errors = 0

    def record(self, response, t0: float) -> None:
        if response.status_code != 200:
            self.errors += 1
            return
        self.lat.append((time.perf_counter() - t0) * 1e3)
        body = response.json()
        self.server.append(body["latency_ms"])
        self.model.append(body["batch_ms"])

    def summary(self, concurrency: int, wall: float) -> dict:
        return {"concurrency": concurrency, "ok": len(self.lat), "errors": self.errors, "seconds": round(wall, 2),
                "rps": round(len(self.lat) / wall, 2) if wall else 0.0,
                **{f"p{q}": round(pct(self.lat, q), 2) for q in (50, 95, 99)},
                "server_p50": round(pct(self.server, 50), 2), "model_p50": round(pct(self.model, 50), 2)}


async def closed_loop(url: str, images: list[bytes], concurrency: int, requests: int, max_seconds: float) -> dict:
    import httpx

    samples = Samples()
    sent = 0
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < deadline:
                img = images[sent % len(images)]
                sent += 1
                t0 = time.perf_counter()
                samples.record(await client.post(url, content=img, headers={"content-type": "image/jpeg"}), t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return samples.summary(concurrency, wall)


def sequential(url: str, images: list[bytes], requests: int, max_seconds: float) -> dict:
    """Concurrency 1 without an event loop in the client: one blocking keep-alive connection."""
    import httpx

    samples = Samples()
    t_start = time.perf_counter()
    with httpx.Client(timeout=120) as client:
        n = 0
        while n < requests and time.perf_counter() - t_start < max_seconds:
            t0 = time.perf_counter()
            samples.record(client.post(url, content=images[n % len(images)], headers={"content-type": "image/jpeg"}), t0)
            n += 1
    return samples.summary(1, time.perf_counter() - t_start)


def run_level(base: str, route: str, images, c: int, args) -> dict:
    url = f"{base}/v1/predict/{route}"
    if c == 1:
        sequential(url, images, 20, 10)  # warm-up
        return sequential(url, images, args.requests, args.seconds)
    asyncio.run(closed_loop(url, images, c, c * 4, 10))  # warm-up: connections, first batches
    return asyncio.run(closed_loop(url, images, c, args.requests, args.seconds))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensemble", default="models:/flowers-ensemble@champion")
    p.add_argument("--student", default="models:/flowers-student@champion")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each load level (bounded)")
    p.add_argument("--requests", type=int, default=100_000, help="also stop a level after this many requests")
    p.add_argument("--rounds", type=int, default=2, help="off/on rounds for the batching comparison")
    p.add_argument("--overhead-rounds", type=int, default=12, help="HTTP/in-process block pairs for the overhead")
    p.add_argument("--cpus-per-model", type=float, default=1.0, help="num_cpus (= torch threads) per model replica")
    p.add_argument("--config", help="Serve config YAML (default serve/config.yaml); batching defaults come "
                                    "from each deployment's user_config there")
    p.add_argument("--max-batch-size", type=int, help="override max_batch_size for both models")
    p.add_argument("--ensemble-wait-s", type=float, help="override the ensemble's batch_wait_timeout_s")
    p.add_argument("--student-wait-s", type=float, help="override the student's batch_wait_timeout_s")
    p.add_argument("--proxy", choices=("haproxy", "serve"), default="haproxy",
                   help="HTTP front: HAProxy straight to the ingress replicas (default) or Ray Serve's Python proxy")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    from serve.ingress_env import LOCAL_DRAIN_S, ingress_env, resolve_proxy
    from raylink.ports import pick_port as free_port

    from _common import unresolvable

    why = unresolvable([args.ensemble, args.student])  # before Ray starts
    if why:
        print(why, file=sys.stderr)
        return 2
    proxy, warning = resolve_proxy(args.proxy)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    # before Ray starts: its processes read these at start-up (own ports: tests may run alongside)
    os.environ.update(ingress_env(proxy, 10 * 1024 * 1024, {"stats": free_port(), "metrics": free_port(), "fallback": free_port(),
                                   "fallback_grpc": free_port()}, LOCAL_DRAIN_S))

    import ray
    from ray import serve

    from flowers.runtime import worker_runtime_env
    from serve import config as serve_config
    from serve.app import make_app

    deployments = serve_config.read(args.config or serve_config.DEFAULT_CONFIG).deployments
    batching = {name: dict(d.get("user_config") or {}) for name, d in deployments.items()}
    for name, wait in (("Ensemble", args.ensemble_wait_s), ("Student", args.student_wait_s)):
        b = batching.setdefault(name, {})
        b.setdefault("max_batch_size", 16)
        b.setdefault("batch_wait_timeout_s", 0.0)
        if args.max_batch_size:
            b["max_batch_size"] = args.max_batch_size
        if wait is not None:
            b["batch_wait_timeout_s"] = wait

    images, source = load_images(64)
    renv = worker_runtime_env()
    need = 2 * args.cpus_per_model + 0.1
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need)), include_dashboard=False, runtime_env=renv,
             log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    app_args = {"ensemble_uri": args.ensemble, "student_uri": args.student}

    def deploy(ens_batch: int, gate: bool = True) -> None:
        model = {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": args.cpus_per_model}}
        opts = {"Ensemble": {**model, "user_config": {**batching["Ensemble"], "max_batch_size": ens_batch,
                                                      "admission_gate": gate}},
                "Student": {**model, "max_ongoing_requests": 128, "user_config": batching["Student"]}}
        serve.run(make_app(app_args, opts), name="bench", route_prefix="/")

    results: dict = {"images": source, "proxy": proxy, "cpus": os.cpu_count(), "cpu": cpu_info(),
                     "cpus_per_model": args.cpus_per_model,
                     "batching": {k: batching[k] for k in ("Ensemble", "Student")}, "levels": {}}
    try:
        t_start = time.time()
        deploy(batching["Ensemble"]["max_batch_size"])
        import httpx

        results["models"] = httpx.get(f"{base}/v1/models", timeout=30).json()["models"]
        def batches() -> dict[str, dict[str, int]]:
            return {m["route"]: m["batch_sizes_seen"] for m in httpx.get(f"{base}/v1/models", timeout=30).json()["models"]}

        for route in ("ensemble", "student"):
            results["levels"][route] = []
            for c in args.concurrency:
                before = batches()[route]
                level = run_level(base, route, images, c, args)
                after = batches()[route]  # this level's batches (warm-up included)
                level["batches"] = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}
                results["levels"][route].append(level)
        # batching off / on / on without the gate at the highest concurrency, interleaved so a
        # drift in machine speed hits all alike; Serve reconfigures the live replica each time
        c_hi = max(args.concurrency)
        rounds = []
        for _ in range(args.rounds):
            deploy(1)
            off = run_level(base, "ensemble", images, c_hi, args)
            deploy(batching["Ensemble"]["max_batch_size"])
            on = run_level(base, "ensemble", images, c_hi, args)
            deploy(batching["Ensemble"]["max_batch_size"], gate=False)
            serve_only = run_level(base, "ensemble", images, c_hi, args)
            rounds.append({"off": off, "on": on, "serve_only": serve_only})
        results["batching_rounds"] = rounds
        results["student_overhead"] = student_overhead(base, images, args)
        results["serve_seconds"] = round(time.time() - t_start, 1)
    finally:
        serve.shutdown()
        ray.shutdown()
    results["limits"] = {route: limits(uri, results["levels"][route], images, args)
                         for route, uri in (("ensemble", args.ensemble), ("student", args.student))}
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def student_overhead(base: str, images: list[bytes], args) -> dict:
    """Student at concurrency 1: HTTP p50 vs in-process p50, in alternating blocks of the same
    images, measured while Serve runs (idle between blocks), so both see the same machine state.

    In process uses the replica's thread counts (torch's and the ONNX Runtime session's). It is measured twice: back to back, and
    with a 3 ms pause before each call, about the idle time a concurrency-1 server has between
    requests; on this VM an idle core makes the next call slower (see docs/serving.md).
    """
    import httpx

    from flowers.inference.predict import Predictor
    from flowers.runtime import configure_torch_threads

    threads = max(1, int(args.cpus_per_model))
    pred = Predictor.from_uri(args.student, threads=threads)
    configure_torch_threads(threads)
    url = f"{base}/v1/predict/student"
    http, tight, paced, model = [], [], [], []
    block = 25
    with httpx.Client(timeout=120) as client:
        for img in images[:block]:  # warm both paths
            client.post(url, content=img, headers={"content-type": "image/jpeg"})
            pred.predict([img])
        for r in range(args.overhead_rounds):
            for i in range(block):
                img = images[(r * block + i) % len(images)]
                t0 = time.perf_counter()
                resp = client.post(url, content=img, headers={"content-type": "image/jpeg"})
                http.append((time.perf_counter() - t0) * 1e3)
                model.append(resp.json()["batch_ms"])
            for i in range(block):
                t0 = time.perf_counter()
                pred.predict([images[(r * block + i) % len(images)]])
                tight.append((time.perf_counter() - t0) * 1e3)
            for i in range(block):
                time.sleep(0.003)
                t0 = time.perf_counter()
                pred.predict([images[(r * block + i) % len(images)]])
                paced.append((time.perf_counter() - t0) * 1e3)
    return {"requests": len(http), "http_p50": round(pct(http, 50), 2), "http_p95": round(pct(http, 95), 2),
            "replica_forward_p50": round(pct(model, 50), 2), "in_process_p50": round(pct(tight, 50), 2),
            "in_process_paced_p50": round(pct(paced, 50), 2)}


def limits(uri: str, levels: list[dict], images: list[bytes], args) -> dict:
    """An endpoint's ceilings on this machine, in this process, with the replica's threads: decode-only,
    model-only at batch 1 and at the batch size the endpoint used most, and the shared-CPU ceiling."""
    from flowers.inference.loaded import collate
    from flowers.inference.predict import Predictor
    from flowers.runtime import configure_torch_threads

    threads = max(1, int(args.cpus_per_model))
    configure_torch_threads(threads)
    pred = Predictor.from_uri(uri, threads=threads)
    decoded = [pred.load_image(img) for img in images]

    def rate(fn, n_items: int, seconds: float = 4.0) -> float:
        fn()  # warm-up
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            done += n_items
        return done / (time.perf_counter() - t0)

    seen: dict[int, int] = {}
    for lv in levels:
        for k, v in lv["batches"].items():
            seen[int(k)] = seen.get(int(k), 0) + int(k) * v  # weighted by images, not batches
    top = max(seen, key=seen.get) if seen else 1
    batch = collate([decoded[i % len(decoded)] for i in range(top)])
    one = collate([decoded[0]])
    out = {"threads": threads, "decode": rate(lambda: [pred.load_image(img) for img in images[:16]], 16),
           "model_b1": rate(lambda: pred.predict_proba(one), 1), "batch": top}
    # batch 1 most used: the same figure, not a second sample of it
    out["model_batch"] = out["model_b1"] if top == 1 else rate(lambda: pred.predict_proba(batch), top)
    out["model"] = max(out["model_b1"], out["model_batch"])
    out["ceiling"] = 1 / (1 / out["decode"] + 1 / out["model"])
    best = max(levels, key=lambda lv: lv["rps"])
    out.update(best_rps=best["rps"], best_concurrency=best["concurrency"],
               of_model=best["rps"] / out["model"], of_ceiling=best["rps"] / out["ceiling"])
    c8 = [lv for lv in levels if lv["concurrency"] == 8]
    if c8:
        out["p99_over_p50_c8"] = c8[0]["p99"] / c8[0]["p50"] if c8[0]["p50"] else float("nan")
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def cpu_info() -> str:
    """CPU model and the vector-instruction flags that decide INT8/fp32 speed."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")
    return f"{model}; flags: {' '.join(f for f in wanted if f in flags) or 'none of ' + ' '.join(wanted)}"


def print_report(r: dict) -> None:
    print(f"\nCPU: {r['cpu']}")
    print(f"images: {r['images']}; {r['cpus']} CPUs; {r['cpus_per_model']} CPU(s)/model replica; "
          f"HTTP front: {r['proxy']}")
    for name, b in r["batching"].items():
        print(f"  {name}: max_batch_size {b['max_batch_size']}, batch_wait_timeout_s {b['batch_wait_timeout_s']}")
    for m in r.get("models", []):
        print(f"  {m['route']}: {m['name']} v{m['version']} ({m['kind']}, {m['uri']})")
    ens, stu = r["levels"]["ensemble"], r["levels"]["student"]
    print("\n| conc | ensemble req/s | p50 | p95 | p99 ms | student req/s | p50 | p95 | p99 ms | student/ensemble req/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for e, s in zip(ens, stu):
        ratio = s["rps"] / e["rps"] if e["rps"] else float("nan")
        print(f"| {e['concurrency']} | {e['rps']} | {e['p50']} | {e['p95']} | {e['p99']} | {s['rps']} | {s['p50']} | "
              f"{s['p95']} | {s['p99']} | {ratio:.2f}x |")
    for route, levels in r["levels"].items():
        for lv in levels:
            b = lv["batches"]
            n = sum(b.values())
            mean = sum(int(k) * v for k, v in b.items()) / n if n else float("nan")
            print(f"  {route} @ {lv['concurrency']}: mean batch {mean:.1f} over {n} batches; forward pass p50 "
                  f"{lv['model_p50']} ms; server-side p50 {lv['server_p50']} ms")

    rounds = r["batching_rounds"]

    def rate(key: str) -> float:
        return sum(x[key]["ok"] for x in rounds) / sum(x[key]["seconds"] for x in rounds)

    on, off, serve_only = rate("on"), rate("off"), rate("serve_only")
    c_hi = rounds[0]["on"]["concurrency"]
    chosen = next((m.get("batching") for m in r.get("models", []) if m["route"] == "ensemble"), None) or {}
    what = (f"calibration chose max_batch_size {chosen.get('max_batch_size')}" if chosen else "config batching")
    print(f"\nensemble @ concurrency {c_hi}, batching as deployed ({what}) vs forced off ({len(rounds)} interleaved "
          f"rounds of off, deployed, deployed without the gate): {on:.2f} vs {off:.2f} req/s → {on / off:.2f}x "
          f"(when the calibration chose 1, both are the same deployment and the ratio is run-to-run noise)")
    print(f"  without the admission gate (Serve's batching alone): {serve_only:.2f} req/s → "
          f"{serve_only / off:.2f}x")
    for i, x in enumerate(rounds, 1):
        print(f"  round {i}: on {x['on']['rps']} req/s (p50 {x['on']['p50']} ms) / off {x['off']['rps']} req/s "
              f"(p50 {x['off']['p50']} ms) = {x['on']['rps'] / x['off']['rps']:.2f}x; no gate "
              f"{x['serve_only']['rps']} req/s (p50 {x['serve_only']['p50']} ms) = "
              f"{x['serve_only']['rps'] / x['off']['rps']:.2f}x")
    o = r["student_overhead"]
    print(f"student @ concurrency 1 ({o['requests']} requests in blocks alternating with in-process calls): "
          f"HTTP p50 {o['http_p50']} ms vs in-process {o['in_process_p50']} ms → overhead "
          f"{o['http_p50'] - o['in_process_p50']:.2f} ms (target ≤ 3 ms)")
    print(f"  the replica's own forward pass (decode included) p50 {o['replica_forward_p50']} ms; in process with "
          f"a 3 ms idle gap before each call {o['in_process_paced_p50']} ms (overhead vs that: "
          f"{o['http_p50'] - o['in_process_paced_p50']:.2f} ms)")
    print("\nlimits (this process, after Serve stopped, the replica's threads; img/s) and each endpoint's best req/s:")
    print("| endpoint | decode-only | model-only b1 | model-only b(most used) | shared-CPU ceiling | best req/s (conc) "
          "| of model-only | of ceiling | p99/p50 @ 8 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for route, x in r.get("limits", {}).items():
        print(f"| {route} | {x['decode']:.1f} | {x['model_b1']:.1f} | {x['model_batch']:.1f} (b{x['batch']}) | "
              f"{x['ceiling']:.1f} | {x['best_rps']} ({x['best_concurrency']}) | {100 * x['of_model']:.0f} % | "
              f"{100 * x['of_ceiling']:.0f} % | {x.get('p99_over_p50_c8', float('nan')):.2f} |")
    print("targets: >= 80 % of model-only, p99/p50 <= 2 at concurrency 8")
    errs = sum(x["errors"] for x in ens + stu) + sum(v["errors"] for x in rounds for v in x.values())
    print(f"errors: {errs}")


if __name__ == "__main__":
    sys.exit(main())
