"""The local cluster's S3: moto's server on 127.0.0.1 with the bucket `flowers` and fixed dummy credentials."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from jobs.localcluster.procs import http_ok, launch, wait_until

BUCKET = "flowers"
# moto accepts any credentials; fixed ones keep every process (driver, nodes, server) in agreement
AWS_ENV = {"AWS_ACCESS_KEY_ID": "flowers-test", "AWS_SECRET_ACCESS_KEY": "flowers-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}


def storage_env(state: dict) -> dict[str, str]:
    """Credentials and endpoint of the S3 server, for boto3, MLflow and pyarrow alike."""
    url = f"http://127.0.0.1:{state['moto']['port']}"
    return {**AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": url, "AWS_ENDPOINT_URL_S3": url}


def start_moto(state_dir: Path, port: int) -> dict:
    """moto's S3 server on 127.0.0.1:`port` (its record, with the port)."""
    rec = launch([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                 {**os.environ, **AWS_ENV}, state_dir / "logs" / "moto.log")
    rec["port"] = port
    return rec


def wait_moto(state: dict, timeout: float) -> None:
    """Wait for the S3 server to answer, then create the bucket."""
    wait_until("moto S3 server", lambda: http_ok(f"http://127.0.0.1:{state['moto']['port']}/moto-api/"), timeout,
               state["moto"])
    create_bucket(state)


def create_bucket(state: dict) -> None:
    """The bucket MLflow's artifacts and published datasets go to."""
    import boto3

    env = storage_env(state)
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name=env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=BUCKET)
