"""The one `ray.init` of every entry point (study, tune, score, the Serve deployer).

Workers get the fast-allocator env (`flowers.runtime.worker_runtime_env`) and the MLflow
store the driver resolves `models:/` against, so they load the same models.
"""
from __future__ import annotations

import os

import ray

from flowers.config import ConfigError
from flowers.runtime import worker_runtime_env
from flowers.storage import storage_env

# worker env passed on from the driver's environment when set
PASSED_ON = ("MLFLOW_TRACKING_URI",)


def worker_env() -> dict[str, str]:
    """Env vars every worker gets: the allocator settings, the driver's MLflow store, and where
    object storage is (endpoint, credentials), so every node resolves the same URIs."""
    passed = {k: os.environ[k] for k in PASSED_ON if os.environ.get(k)}
    return worker_runtime_env({**passed, **storage_env()})["env_vars"]


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


def alive_nodes() -> list[dict]:
    """The cluster's live nodes (Ray's node table entries)."""
    return [n for n in ray.nodes() if n.get("Alive")]


def spans_nodes() -> bool:
    """Whether work may run on a node other than the driver's (then nothing may rely on its disk)."""
    nodes = alive_nodes()
    here = ray.get_runtime_context().get_node_id()
    return any(n["NodeID"] != here and n.get("Resources", {}).get("CPU", 0) > 0 for n in nodes)


def cluster_gpus() -> float:
    """GPUs the whole cluster has (not the driver's: a CPU head may drive GPU workers)."""
    return float(ray.cluster_resources().get("GPU", 0.0))


def largest_node_cpus() -> float:
    """CPUs of the biggest node: what one task can get at most."""
    return max((n.get("Resources", {}).get("CPU", 0.0) for n in alive_nodes()), default=1.0) or 1.0


def node_id() -> str:
    """The id of the node this process runs on."""
    return ray.get_runtime_context().get_node_id()
