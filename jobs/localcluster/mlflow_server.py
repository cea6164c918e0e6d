"""The local cluster's `mlflow server`: runs and registry on its PostgreSQL, artifacts proxied to s3://flowers/mlflow."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from jobs.localcluster.objectstore import BUCKET, storage_env
from jobs.localcluster.procs import http_ok, launch, wait_until


def _mlflow_cmd(state: dict, port: int) -> list[str]:
    # psycopg2 named explicitly: SQLAlchemy 2.1 defaults `postgresql://` to psycopg 3
    backend = state["postgres"]["uri"].replace("postgresql://", "postgresql+psycopg2://", 1)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
            "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]


def start_mlflow(state: dict, port: int, log_path: Path) -> dict:
    """The server on 127.0.0.1:`port` (its record, with the port); the launching shell's tracking URI dropped."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(storage_env(state), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    rec = launch(_mlflow_cmd(state, port), env, log_path)
    rec["port"] = port
    return rec


def wait_mlflow(state: dict, timeout: float) -> None:
    """Wait for the server's /health (it migrates its schema on PostgreSQL first)."""
    port = state["mlflow"]["port"]
    wait_until("MLflow server", lambda: http_ok(f"http://127.0.0.1:{port}/health"), timeout, state["mlflow"])
