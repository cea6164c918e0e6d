"""The cost of Ray Serve's HTTP path itself, with no model: HAProxy front vs Ray's Python proxy.

    python bench/serve_floor.py [--requests 400]

For each front (each in a fresh local Ray, since Ray reads the mode when it starts) deploys
two FastAPI apps that do nothing but read the body: `one` answers in its ingress replica,
`two` forwards to a second deployment first (the ensemble route's shape). Sends --requests
sequential POSTs of a 22 KB Flowers-102-sized body over one keep-alive connection and prints
the p50/p90 latency per app: the floor any endpoint pays on this machine before its model runs.
"""
# no `from __future__ import annotations`: FastAPI must see the real Request type of the handlers

import argparse
import json
import math
import os
import subprocess
import sys
import time


def _free_port() -> int:
    from raylink.ports import pick_port

    return pick_port()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def measure(proxy: str, requests: int) -> dict:
    """Runs in a child process: start Ray with `proxy` in front, time both apps."""
    from serve.ingress_env import LOCAL_DRAIN_S, ingress_env

    os.environ.update(ingress_env(proxy, 10 * 1024 * 1024, {k: _free_port() for k in
                                                            ("stats", "metrics", "fallback", "fallback_grpc")},
                                  LOCAL_DRAIN_S))
    import httpx
    import ray
    from fastapi import FastAPI, Request
    from ray import serve

    one_api, two_api = FastAPI(), FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Inner:
        async def f(self, body: bytes) -> dict:
            return {"n": len(body)}

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(two_api)
    class Two:
        def __init__(self, inner) -> None:
            self.inner = inner

        @two_api.post("/x")
        async def x(self, request: Request) -> dict:
            return await self.inner.f.remote(await request.body())

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(one_api)
    class One:
        @one_api.post("/x")
        async def x(self, request: Request) -> dict:
            return {"n": len(await request.body())}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(One.bind(), name="one", route_prefix="/one")
        serve.run(Two.bind(Inner.bind()), name="two", route_prefix="/two")
        body = os.urandom(22_000)
        out = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for app in ("one", "two"):
                lat = []
                for i in range(requests + 50):
                    t0 = time.perf_counter()
                    r = c.post(f"/{app}/x", content=body, headers={"content-type": "application/octet-stream"})
                    lat.append((time.perf_counter() - t0) * 1e3)
                    r.raise_for_status()
                lat = lat[50:]  # warm-up
                out[app] = {"p50": round(_pct(lat, 50), 2), "p90": round(_pct(lat, 90), 2)}
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--child", choices=("haproxy", "serve"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args.requests)), flush=True)
        return 0
    from serve.ingress_env import resolve_proxy

    results = {}
    for proxy in ("serve", "haproxy"):
        if resolve_proxy(proxy)[0] != proxy:
            print(f"skip {proxy}: no HAProxy binary", file=sys.stderr)
            continue
        done = subprocess.run([sys.executable, __file__, "--child", proxy, "--requests", str(args.requests)],
                              capture_output=True, text=True, timeout=600)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            print(f"{proxy}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        results[proxy] = json.loads(line[-1][7:])
    print(f"\nno-op FastAPI deployments, {args.requests} sequential POSTs of 22 KB, one keep-alive connection")
    print("| front | one hop p50 | p90 ms | two hops p50 | p90 ms |\n|---|---:|---:|---:|---:|")
    names = {"serve": "Ray Serve Python proxy", "haproxy": "HAProxy + gRPC (throughput-optimized)"}
    for proxy, r in results.items():
        print(f"| {names[proxy]} | {r['one']['p50']} | {r['one']['p90']} | {r['two']['p50']} | {r['two']['p90']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
