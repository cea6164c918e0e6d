"""A promotion and a rollback under closed-loop load: failed requests, latency before/during/after, switch time.

    python bench/rollout.py [--model PATH] [--clients 8] [--phase-s 15] [--interval-s 2]

Registers the model at PATH (a checkpoint `.pt` or a model folder; default: a 2-epoch smoke model
trained here on synthetic data) twice in a temporary MLflow SQLite store, serves
`models:/<name>@champion` on the student route with `flowers serve`'s settings (HAProxy front,
the Follower polling every --interval-s), and keeps --clients requests in flight on
`/v1/predict/student` (each client sends its next request when the last one returns). Then:

  before   --phase-s seconds on v1;
  promote  `champion` moves to v2 (through the gate, as `flowers models promote` does);
  during   from the alias move until every live replica answers with v2;
  after    --phase-s seconds more; then the same for a rollback to v1.

Prints requests sent and failed (non-200 or connection error) per phase, p50/p99 client latency
per phase, and the time from the alias move to the first answer from the new version and to the
last replica on it, with the `lscpu` model and flags and the load average.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from _common import cpu_line  # noqa: E402  (bench/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))




def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def smoke_model(tmp: Path) -> tuple[Path, str]:
    from flowers.config import load_config
    from flowers.data import write_synthetic
    from flowers.training.loop import fit
    from flowers.training.tasks import make_task

    root = tmp / "synth" / "flowers"
    write_synthetic(root, num_classes=5, per_class=12, size=96, seed=0)
    cfg = load_config(REPO / "configs/level1.yaml", str(REPO / "configs/profiles/smoke.yaml"),
                      [f"data.root={root}", "data.split=official"])
    run = fit(cfg, make_task(cfg), run_dir=tmp / "run")
    return Path(run.best_checkpoint), "2-epoch smoke model on synthetic data (5 classes, 96 px)"


def register(model: Path, tmp: Path) -> tuple[str, str, str, str]:
    """(tracking URI, name, v1, v2): the model registered twice in a new SQLite store; v1 champion."""
    import mlflow

    from flowers.registry import governance as G
    from flowers.registry import tracking as T
    from flowers.registry import uris as R

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    target = R.resolve_target(uri)
    T.configure(target)
    tr = T.StudyTracker("rollout-bench", target)
    name = f"rollout-{uuid.uuid4().hex[:6]}"
    folder = model.parent if model.suffix == ".pt" else model
    versions = []
    for _ in range(2):
        run = tr.child(uuid.uuid4().hex[:8], "trial")
        versions.append(tr.log_model_dir(run, folder, "model", name))
        tr.finish(run)
    G.decide(name, versions[0], uri)
    mlflow.set_tracking_uri(uri)
    return uri, name, versions[0], versions[1]


class Load:
    """Closed-loop clients recording (time, seconds, status, version) per request."""

    def __init__(self, base: str, image: bytes, clients: int) -> None:
        self.base, self.image, self.clients = base, image, clients
        self.stop = threading.Event()
        self.seen: list[tuple[float, float, int, str | None]] = []

    def client(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base, timeout=60) as c:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/predict/student", content=self.image, headers={"content-type": "image/jpeg"})
                    v = r.json().get("version") if r.status_code == 200 else None
                    self.seen.append((time.time(), time.perf_counter() - t0, r.status_code, v))
                except httpx.HTTPError:
                    self.seen.append((time.time(), time.perf_counter() - t0, -1, None))

    def start(self) -> None:
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(self.clients)]
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def switch(base: str, load: Load, move, new: str, phase_s: float) -> dict:
    """Move the alias under load; time the first answer and the last replica on `new`."""
    import httpx

    t_move = time.time()
    move()
    first = last = None
    with httpx.Client(base_url=base, timeout=30) as c:
        while time.time() - t_move < 120:
            if first is None:
                first = next((ts for ts, _, _, v in load.seen if ts > t_move and v == new), None)
            r = c.get("/v1/models").json()["models"][1]["rollout"]
            if r["serving_version"] == new and set(r["replicas"]) == {new}:
                last = time.time()
                break
            time.sleep(0.1)
    time.sleep(phase_s)
    return {"t_move": t_move, "t_first": first, "t_last": last, "t_end": time.time()}


def phase_rows(load: Load, marks: list[tuple[str, float, float]]) -> list[str]:
    rows = []
    for label, a, b in marks:
        xs = [s for s in load.seen if a <= s[0] < b]
        ok = [d * 1e3 for _, d, code, _ in xs if code == 200]
        failed = sum(1 for s in xs if s[2] != 200)
        versions = sorted({str(v) for *_, v in xs if v})
        rows.append(f"  {label:<18} {len(xs):>7} {failed:>7} {pct(ok, 50):>9.1f} {pct(ok, 99):>9.1f}  "
                    f"{','.join(versions)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint .pt or model folder (default: train a smoke model here)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--phase-s", type=float, default=15.0)
    p.add_argument("--interval-s", type=float, default=2.0, help="the Follower's registry poll interval")
    args = p.parse_args(argv)

    from serve.ingress_env import LOCAL_DRAIN_S, ingress_env
    from raylink.ports import pick_port as free_port

    os.environ.update(ingress_env("haproxy", 10 * 1024 * 1024, {k: free_port() for k in
                                  ("stats", "metrics", "fallback", "fallback_grpc")}, LOCAL_DRAIN_S))
    tmp = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    model, what = (Path(args.model), f"{args.model}") if args.model else smoke_model(tmp)
    uri, name, v1, v2 = register(model, tmp)

    import ray
    from ray import serve

    from flowers.data import write_synthetic
    from flowers.registry import governance as G
    from flowers.registry import lifecycle
    from flowers.registry import uris as R
    from flowers.runtime import worker_runtime_env
    from serve.app import make_app

    write_synthetic(tmp / "img", num_classes=2, per_class=3, size=500, seed=1)
    image = next((tmp / "img" / "jpg").glob("*.jpg")).read_bytes()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=worker_runtime_env(), log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    opts = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}
    app = make_app({"ensemble_uri": str(model), "student_uri": f"models:/{name}@champion", "tracking_uri": uri,
                    "follow_interval_s": args.interval_s}, {"Ensemble": opts, "Student": opts})
    serve.run(app, name="rollout-bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    load = Load(base, image, args.clients)
    try:
        load.start()
        time.sleep(3.0)  # connections open, batches formed: not measured
        t0 = time.time()
        time.sleep(args.phase_s)
        c = R.client(uri)
        up = switch(base, load, lambda: G.decide(name, v2, uri, client=c), v2, args.phase_s)
        down = switch(base, load, lambda: lifecycle.rollback(c, name, "bench"), v1, args.phase_s)
    finally:
        load.finish()
        serve.shutdown()
        ray.shutdown()
    print(f"rollout bench: {what}; {args.clients} closed-loop clients on /v1/predict/student over HTTP "
          f"(HAProxy, loopback), 1 Student + 1 Ensemble replica at 0.5 CPU each, Follower poll "
          f"{args.interval_s:g} s; image {len(image)} bytes (synthetic 500 px JPEG)")
    print(f"machine: {cpu_line()}; load average {os.getloadavg()[0]:.1f} (1 min) at the end")
    print(f"  {'phase':<18} {'sent':>7} {'failed':>7} {'p50 ms':>9} {'p99 ms':>9}  versions answering")
    marks = [("before (v1)", t0, up["t_move"]), ("promote: during", up["t_move"], up["t_last"] or up["t_end"]),
             ("after (v2)", up["t_last"] or up["t_end"], down["t_move"]),
             ("rollback: during", down["t_move"], down["t_last"] or down["t_end"]),
             ("after (v1)", down["t_last"] or down["t_end"], down["t_end"])]
    print("\n".join(phase_rows(load, marks)))
    total, failed = len(load.seen), sum(1 for s in load.seen if s[2] != 200)
    print(f"  all requests: {total} sent, {failed} failed")
    for label, s in (("promote v1->v2", up), ("rollback v2->v1", down)):
        f = f"{s['t_first'] - s['t_move']:.2f} s" if s["t_first"] else "never"
        last = f"{s['t_last'] - s['t_move']:.2f} s" if s["t_last"] else "not within 120 s"
        print(f"  {label}: alias move -> first answer from the new version {f}; -> every replica on it {last}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
