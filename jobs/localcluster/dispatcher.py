"""The job queue's dispatcher (jobs/queue/dispatcher.py) as a process of the local cluster, next to the head."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from jobs.localcluster.postgres import queue_url
from jobs.localcluster.procs import launch
from jobs.localcluster.ray_nodes import DRIVER_ONLY_ENV, client_env

# the repository root: `python -m jobs.queue.dispatcher` runs from there
REPO_DIR = Path(__file__).resolve().parents[2]


def start_dispatcher(state: dict, generation: int = 0) -> dict:
    """The queue's dispatcher as a process of its own, on the cluster's Jobs API and queue database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in DRIVER_ONLY_ENV}
    env.update(client_env(state))
    cmd = [sys.executable, "-m", "jobs.queue.dispatcher", "--address", env["RAY_API_SERVER_ADDRESS"],
           "--store", queue_url(state)]
    if state.get("queues_file"):
        cmd += ["--queues", state["queues_file"]]
    logs = Path(state["state_dir"]) / "logs"
    return launch(cmd, env, logs / f"dispatcher-{generation}.log", cwd=REPO_DIR) | {"generation": generation}
