"""Cluster scaling on the local test cluster (`flowers cluster up`): the same 4-trial grid
(augment x schedule, 1 CPU per trial) on 1 worker node vs 2 worker nodes of 1 CPU each, in one
run, and the time from killing a worker node to its interrupted trial running again.

    python bench/cluster_scaling.py                      # FLOWERS_DATA (Flowers-102), first 10 classes
    python bench/cluster_scaling.py --synthetic          # a synthetic dataset instead

The dataset goes to the cluster's S3 (`flowers data publish`), Tune storage to S3, MLflow to the
cluster's server (PostgreSQL): the same settings a real cluster uses. Prints wall times, their
ratio and the recovery time, with the CPU model and flags. Figures belong in the README with the
date and machine; nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def cpu_line() -> str:
    """CPU model, cores and the SIMD flags that change CPU training speed."""
    model, flags = "?", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    keep = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(keep) or 'no avx2'}"


def class_folder(vgg_root: Path, classes: int, dest: Path) -> Path:
    """The first `classes` Flowers-102 classes as an image folder (one subfolder per class), linked
    not copied: the cluster then publishes and caches only what the bench trains on."""
    from flowers.data import load_vgg

    ds = load_vgg(vgg_root)
    for path, label in zip(ds.paths, ds.labels):
        if label < classes:
            folder = dest / f"{int(label):03d}_{ds.class_names[label].replace(' ', '_')}"
            folder.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, folder / Path(path).name)
            except OSError:  # another filesystem
                shutil.copy2(path, folder / Path(path).name)
    return dest


def study_yaml(tmp: Path, name: str, data_uri: str, extra: list[str], epochs: int) -> Path:
    (tmp / "grid.yaml").write_text(yaml.safe_dump({
        "config": str(REPO / "configs/level1.yaml"),
        "axes": {"augment": {"light": {"data.augment": "light"}, "strong": {"data.augment": "strong"}},
                 "schedule": {"constant": {"optim.schedule": "constant"}, "cosine": {"optim.schedule": "cosine"}}}}))
    data = {"name": name, "levels": {}, "ablation": "grid.yaml", "profile": str(REPO / "configs/profiles/smoke.yaml"),
            "overrides": [f"data.root={data_uri}", f"train.epochs={epochs}", *extra], "stages": ["tune"],
            "resources": {"cpus_per_trial": 1, "max_concurrent": 4}, "max_failures": 2,
            "home": str(tmp / "home"), "storage_path": f"s3://flowers/bench/{name}"}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_study(path: Path, tracking: str, wait: bool = True) -> subprocess.Popen | float:
    cmd = [sys.executable, "-m", "jobs.study", "--config", str(path), "--tracking-uri", tracking]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"study {path.stem} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def tune_seconds(client, name: str) -> float:
    exp = client.get_experiment_by_name(name)
    parent = client.search_runs([exp.experiment_id], "tags.`flowers.role` = 'study'")[0]
    return parent.data.metrics["study_wall_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", action="store_true", help="synthetic data instead of FLOWERS_DATA")
    p.add_argument("--classes", type=int, default=10, help="real data: keep the first N classes (default 10)")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()

    from mlflow import MlflowClient

    from flowers.data.remote import publish
    from jobs import localcluster as TC

    # SIGTERM (timeout, kill) must still stop the cluster below: turn it into SystemExit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"machine: {cpu_line()}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    cluster = TC.up(Path(tempfile.mkdtemp(prefix="bcl-", dir="/tmp")), workers=2, cpus_per_worker=1, workdir=REPO)
    try:
        os.environ.update(cluster.env())
        if args.synthetic:
            from flowers.data import write_synthetic

            src, extra = write_synthetic(tmp / "synth", num_classes=10, per_class=40, size=128).root, ["data.split=official"]
            what = "synthetic 10 classes x 40 images, 128 px"
        else:
            if not os.environ.get("FLOWERS_DATA"):
                raise SystemExit("set FLOWERS_DATA to a Flowers-102 copy, or pass --synthetic")
            src = class_folder(Path(os.environ["FLOWERS_DATA"]), args.classes, tmp / "subset")
            extra = ["data.format=folder", "data.split=random"]
            what = (f"Flowers-102 images of the first {args.classes} classes as an image folder "
                    "(random 80/10/10 split, seed 0)")
        t0 = time.perf_counter()
        publish(src, "s3://flowers/datasets/bench")
        print(f"data: {what}; published to the cluster's S3 in {time.perf_counter() - t0:.1f}s")
        print(f"grid: 4 trials (augment x schedule), smoke profile model, {args.epochs} epochs, 1 CPU per trial")
        tracking = os.environ["MLFLOW_TRACKING_URI"]
        mc = MlflowClient(tracking)

        cluster.kill_worker("worker_b")
        one = run_study(study_yaml(tmp, "scale-1node", "s3://flowers/datasets/bench", extra, args.epochs), tracking)
        cluster.restart_worker("worker_b")
        two = run_study(study_yaml(tmp, "scale-2nodes", "s3://flowers/datasets/bench", extra, args.epochs), tracking)
        t1, t2 = tune_seconds(mc, "scale-1node"), tune_seconds(mc, "scale-2nodes")
        print(f"1 worker node : {one:7.1f}s wall ({t1:.1f}s inside the study)")
        print(f"2 worker nodes: {two:7.1f}s wall ({t2:.1f}s inside the study)")
        print(f"speed-up 2 vs 1 node: {one / two:.2f}x wall, {t1 / t2:.2f}x inside the study")

        # recovery: kill the node of a trial past its first epoch; time until it reports again elsewhere
        name = "scale-kill"
        proc = run_study(study_yaml(tmp, name, "s3://flowers/datasets/bench", extra, max(3, args.epochs)),
                         tracking, wait=False)
        workers = {cluster.node_id(w): w for w in cluster.workers}
        victim, deadline = None, time.monotonic() + 900
        while victim is None and time.monotonic() < deadline:
            exp = mc.get_experiment_by_name(name)
            for r in mc.search_runs([exp.experiment_id], "tags.`flowers.role` = 'trial'") if exp else []:
                if r.info.status == "RUNNING" and r.data.tags.get("ray.node_id") in workers and \
                        len(mc.get_metric_history(r.info.run_id, "val/acc")) >= 1:
                    victim = r
                    break
            time.sleep(0.5)
        if victim is None:
            raise SystemExit("no trial reached its first epoch")
        t_kill = time.monotonic()
        cluster.kill_worker(workers[victim.data.tags["ray.node_id"]])
        back = None
        while back is None and time.monotonic() < deadline:
            tags = mc.get_run(victim.info.run_id).data.tags
            if len(tags.get("ray.node_ids", "").split(",")) >= 2:
                back = time.monotonic() - t_kill
            time.sleep(0.5)
        epoch_s = mc.get_metric_history(victim.info.run_id, "epoch_seconds")[-1].value
        proc.wait(900)
        print(f"node kill -> interrupted trial's first epoch reported on the other node: {back:.1f}s "
              f"(that epoch took {epoch_s:.1f}s, so the trial was running again after about {back - epoch_s:.1f}s)")
    finally:
        cluster.down()


if __name__ == "__main__":
    main()
