"""The one `ray.init` of every entry point (study, tune, score).

Workers get the fast-allocator env (`flowers.runtime.worker_runtime_env`) and the MLflow
store the driver resolves `models:/` against, so they load the same models.
"""
from __future__ import annotations

import os

import ray

from flowers.config import ConfigError
from flowers.runtime import worker_runtime_env

# worker env passed on from the driver's environment when set
PASSED_ON = ("MLFLOW_TRACKING_URI",)


def worker_env() -> dict[str, str]:
    """Env vars every worker gets: the allocator settings and the driver's MLflow store."""
    return worker_runtime_env({k: os.environ[k] for k in PASSED_ON if os.environ.get(k)})["env_vars"]


def connect(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster at `address` (else $RAY_ADDRESS), or start a local Ray of `num_cpus` CPUs.

    Does nothing when Ray is already initialised (tests, a caller that connected first).
    Inside a Ray job RAY_ADDRESS is set, so the entry point joins the job's cluster.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"log_to_driver": log_to_driver, "configure_logging": False, "include_dashboard": False,
              "runtime_env": {"env_vars": worker_env()}}
    # inside a Ray job (`flowers submit`) the job's runtime env sets the same vars, and ray.init
    # refuses a second value for a key unless told that the driver's wins (ours: same or newer)
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = address or "a new local Ray"
        raise ConfigError(f"cannot start or reach Ray at {where}: {str(e).splitlines()[0] if str(e) else e}; "
                          "check --address (or RAY_ADDRESS) and that the cluster is running") from None
