"""The local cluster as one object: `up` starts every service, `LocalCluster` reads the state file to
stop it, print its env, or kill and restart a worker node, the MLflow server or the dispatcher.

The state file (`cluster.json` in the state dir) records what runs where; `down`, `env`,
`kill_worker` and `restart_worker` only read it.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from jobs.localcluster import postgres
from jobs.localcluster.dispatcher import start_dispatcher
from jobs.localcluster.mlflow_server import start_mlflow, wait_mlflow
from jobs.localcluster.objectstore import BUCKET, start_moto, storage_env, wait_moto
from jobs.localcluster.procs import (ClusterError, alive, end_sessions, log_says, pick_ports, port_open, proc_stat,
                                     signal_session, wait_gone, wait_until)
from jobs.localcluster.ray_nodes import (RAY_READY, RAY_TEMP_MAX, client_env, default_masks, mask_targets,
                                         ray_binary, start_head, start_worker, wait_nodes)

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
PYPI_HINT = ".venv/bin/pip install 'moto[server]' boto3 psycopg2-binary"


def default_state_dir() -> Path:
    """$FLOWERS_CLUSTER_STATE, else <tmp>/flowers-cluster."""
    return Path(os.environ.get("FLOWERS_CLUSTER_STATE") or Path(tempfile.gettempdir()) / "flowers-cluster")


def unavailable_reason(masks: bool = True) -> str | None:
    """Why this machine cannot run the test cluster at all (None when it can)."""
    if not sys.platform.startswith("linux"):
        return "the test cluster needs Linux (mount namespaces, /proc)"
    if not (postgres.PG_BIN / "initdb").is_file():
        return f"no PostgreSQL 15 at {postgres.PG_BIN}: apt-get install postgresql-15"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "no `postgres` user to run PostgreSQL as: apt-get install postgresql-15"
    if masks and (os.geteuid() != 0 or not shutil.which("unshare")):
        return "masking the driver's folders on worker nodes needs root and unshare (util-linux)"
    if not ray_binary():
        return "no `ray` command next to this Python: pip install 'ray[default]'"
    missing = [m for m in ("moto", "boto3", "psycopg2") if importlib.util.find_spec(m) is None]
    if missing:
        return f"missing Python packages {missing}: {PYPI_HINT}"
    return None


class LocalCluster:
    """A running local cluster, as its state file describes it."""

    def __init__(self, state_dir: str | Path, state: dict):
        self.state_dir = Path(state_dir)
        self.state = state

    @classmethod
    def load(cls, state_dir: str | Path | None = None) -> "LocalCluster":
        """The cluster whose state file is in `state_dir` (default: `default_state_dir()`)."""
        sd = Path(state_dir or default_state_dir())
        path = sd / STATE_FILE
        if not path.is_file():
            raise ClusterError(f"no test cluster at {sd}: start one with `flowers cluster up --state {sd}`")
        return cls(sd, json.loads(path.read_text()))

    def save(self) -> None:
        """Write the state file atomically (readable by us only: it holds the PostgreSQL password)."""
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.chmod(0o600)
        tmp.replace(self.state_dir / STATE_FILE)

    # what runs
    def processes(self) -> dict[str, dict]:
        """Every recorded process by name: the services, the head and the workers."""
        out = {k: self.state[k] for k in ("postgres", "moto", "mlflow", "head", "dispatcher") if self.state.get(k)}
        out.update(self.state.get("workers", {}))
        return out

    def running(self) -> list[str]:
        """Names of the recorded processes that still run."""
        return [name for name, rec in self.processes().items() if alive(rec)]

    @property
    def workers(self) -> list[str]:
        return list(self.state.get("workers", {}))

    def env(self) -> dict[str, str]:
        """What a driver needs to use the cluster (`flowers cluster env`)."""
        return client_env(self.state)

    @property
    def postgres_uri(self) -> str:
        return self.state["postgres"]["uri"]

    @property
    def s3_endpoint(self) -> str:
        return storage_env(self.state)["AWS_ENDPOINT_URL_S3"]

    def node_id(self, name: str) -> str:
        """The Ray node id of node `name` (head, worker_a, ...)."""
        return self.state["node_ids"][name]

    def run_python(self, code: str, *args: str, timeout: float = 300, cwd: str | Path | None = None,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run `code` in a fresh Python process that is a driver of this cluster (`env()` set)."""
        full = {**os.environ, **self.env(), **(env or {})}
        return subprocess.run([sys.executable, "-c", code, *args], env=full, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)

    # faults
    def kill_worker(self, name: str) -> str:
        """SIGKILL one worker node whole (raylet, its workers and agents) as a machine loss would; its node id."""
        rec = self._worker(name)
        if not alive(rec):
            raise ClusterError(f"worker {name} is not running")
        signal_session(rec["pid"], signal.SIGKILL)
        wait_gone([rec["pid"]], 10.0)
        log.info("killed worker %s (node %s)", name, self.state["node_ids"].get(name, "?")[:12])
        return self.state["node_ids"].get(name, "")

    def restart_worker(self, name: str, timeout: float = 90.0) -> str:
        """Start a killed worker again (new node id, fresh temp dir); its new node id."""
        old = self._worker(name)
        if alive(old):
            raise ClusterError(f"worker {name} is still running: kill_worker({name!r}) first")
        t0 = time.monotonic()
        rec = start_worker(self.state, name, old.get("generation", 0) + 1)
        self.state["workers"][name] = rec
        self.save()
        wait_until(f"Ray worker {name}", lambda: log_says(rec["log"], RAY_READY), timeout, rec)
        self.state["node_ids"].update(wait_nodes(self.state, [name], timeout))
        self.save()
        log.info("worker %s back as node %s (%.1fs)", name, self.node_id(name)[:12], time.monotonic() - t0)
        return self.node_id(name)

    def stop_mlflow(self) -> None:
        """SIGKILL the MLflow server (a crash, not a clean stop); PostgreSQL and S3 keep its data."""
        rec = self.state["mlflow"]
        if alive(rec):
            signal_session(rec["pid"], signal.SIGKILL)
            wait_gone([rec["pid"]], 10.0)
        log.info("MLflow server stopped")

    def start_mlflow(self, timeout: float = 120.0) -> None:
        """Start the MLflow server again on the same port and stores."""
        port = self.state["mlflow"]["port"]
        self.state["mlflow"] = start_mlflow(self.state, port, self.state_dir / "logs" / "mlflow-restart.log")
        self.save()
        wait_mlflow(self.state, timeout)
        log.info("MLflow server back on :%d", port)

    def kill_dispatcher(self) -> None:
        """SIGKILL the queue's dispatcher (a crash: no lease released, nothing cleaned up)."""
        rec = self.state.get("dispatcher")
        if rec and alive(rec):
            signal_session(rec["pid"], signal.SIGKILL)
            wait_gone([rec["pid"]], 10.0)
        log.info("dispatcher killed")

    def start_dispatcher(self) -> None:
        """Start the dispatcher again; it takes the lease once the dead one's has expired."""
        old = self.state.get("dispatcher") or {}
        if alive(old):
            raise ClusterError("the dispatcher is still running: kill_dispatcher() first")
        self.state["dispatcher"] = start_dispatcher(self.state, old.get("generation", 0) + 1)
        self.save()
        log.info("dispatcher started again (pid %d)", self.state["dispatcher"]["pid"])

    def _worker(self, name: str) -> dict:
        if name not in self.state.get("workers", {}):
            raise ClusterError(f"no worker {name!r}: this cluster has {self.workers}")
        return self.state["workers"][name]

    def down(self, grace: float = 3.0) -> None:
        """Stop everything `up` started, then remove the state dir."""
        t0 = time.monotonic()
        procs = self.processes()
        pg = procs.pop("postgres", None)
        # Ray nodes, MLflow and moto get SIGTERM now; PostgreSQL stops cleanly meanwhile
        for rec in procs.values():
            if rec.get("pid"):
                signal_session(rec["pid"], signal.SIGTERM)
        if pg:
            postgres.stop_postgres(pg)
        left = end_sessions([*procs.values(), pg], grace)
        if left:
            raise ClusterError(f"processes {left} outlived SIGKILL; state kept at {self.state_dir}")
        shutil.rmtree(self.state_dir, ignore_errors=True)
        log.info("test cluster at %s stopped and removed (%.1fs)", self.state_dir, time.monotonic() - t0)


def up(state_dir: str | Path | None = None, workers: int = 2, cpus_per_worker: float = 1, gpus_per_worker: int = 0,
       masks: list[str | Path] | None = None, workdir: str | Path | None = None,
       object_store_mb: int = 300, head_object_store_mb: int = 100, node_env: dict[str, str] | None = None,
       timeout: float = 120.0, pin_cpus: bool = False, queues: str | Path | None = None) -> LocalCluster:
    """Start the cluster (PostgreSQL, S3, MLflow, Ray head + `workers` nodes); see the package docstring.

    `masks` None means `default_masks(workdir)`; [] starts workers without a mount namespace.
    `node_env`: extra variables for every node (Serve's front, Ray settings like RAY_health_check_*).
    `pin_cpus`: each worker node's processes on one core of their own (`taskset`; benches).
    `queues`: the job queues' YAML for the dispatcher (jobs/queue/config.py; None: only `default`).
    Refuses when a cluster from `state_dir` still runs. On any failure, stops what it started.
    """
    sd = Path(state_dir or default_state_dir()).absolute()
    mask_list = [Path(m).absolute() for m in (default_masks(workdir) if masks is None else masks)]
    reason = unavailable_reason(masks=bool(mask_list))
    if reason:
        raise ClusterError(reason)
    if not 1 <= workers <= 26:
        raise ClusterError(f"--workers {workers}: give 1 to 26 worker nodes")
    if len(str(sd)) + len("/ray-worker_x-10") > RAY_TEMP_MAX:
        raise ClusterError(f"state dir {sd} is too long for Ray's unix socket paths: use a shorter --state (like /tmp/fc)")
    mounted = mask_targets(mask_list, sd, workdir)
    _claim_state_dir(sd)
    names = [f"worker_{chr(ord('a') + i)}" for i in range(workers)]
    token = sd / "ray_token"
    token.write_text(secrets.token_hex(32) + "\n")
    token.chmod(0o600)
    (sd / "logs").mkdir()
    state = {"state_dir": str(sd), "ray": ray_binary(), "token_path": str(token), "masks": [str(m) for m in mounted],
             "worker_spec": {"cpus": cpus_per_worker, "gpus": gpus_per_worker, "object_store_mb": object_store_mb,
                             "pin_cpus": pin_cpus},
             "head_object_store_mb": head_object_store_mb, "node_env": dict(node_env or {}), "workers": {},
             "node_ids": {}, "created": time.time(),
             "queues_file": str(Path(queues).resolve()) if queues else None}
    cluster = LocalCluster(sd, state)
    t0 = time.monotonic()
    try:
        _bring_up(cluster, names, timeout)
    except BaseException:
        log.error("start-up failed; stopping what was started (logs were in %s/logs)", sd)
        _keep_logs(sd)
        cluster.down()
        raise
    log.info("test cluster up in %.1fs: head + %d workers (%s), MLflow %s, S3 %s, PostgreSQL :%d",
             time.monotonic() - t0, workers, ", ".join(names), cluster.env()["MLFLOW_TRACKING_URI"],
             cluster.s3_endpoint, state["postgres"]["port"])
    return cluster


def _bring_up(cluster: LocalCluster, names: list[str], timeout: float) -> None:
    """Slow parts overlap: PostgreSQL initialises in a thread while moto and the Ray head start;
    the workers join as soon as the head's GCS answers; MLflow migrates its schema meanwhile."""
    state, sd = cluster.state, cluster.state_dir
    t0 = time.monotonic()
    moto_port, pg_port, mlflow_port = pick_ports(3)
    pg: dict = {}

    def start_pg() -> None:
        try:
            pg["rec"] = postgres.start_postgres(sd, pg_port)
        except BaseException as e:  # re-raised in the main thread
            pg["error"] = e

    pg_thread = threading.Thread(target=start_pg, name="postgres", daemon=True)
    pg_thread.start()
    log.info("starting PostgreSQL 15 on 127.0.0.1:%d, S3 (moto) and the Ray head ...", pg_port)
    state["moto"] = start_moto(sd, moto_port)
    state["head"] = head = start_head(state)
    cluster.save()
    pg_thread.join()
    if "error" in pg:
        raise pg["error"]
    state["postgres"] = pg["rec"]
    cluster.save()
    log.info("PostgreSQL ready (%.1fs); starting the MLflow server on 127.0.0.1:%d ...", time.monotonic() - t0,
             mlflow_port)
    state["mlflow"] = start_mlflow(state, mlflow_port, sd / "logs" / "mlflow.log")
    cluster.save()
    # a joining `ray start` waits for the head's session in the GCS, so an open GCS port is enough
    wait_until("Ray head (GCS)", lambda: port_open(head["gcs_port"]), timeout, head)
    log.info("Ray GCS up on 127.0.0.1:%d (%.1fs); joining %d workers (masked on each: %s) ...",
             head["gcs_port"], time.monotonic() - t0, len(names), ", ".join(state["masks"]) or "nothing")
    for name in names:
        state["workers"][name] = start_worker(state, name)
        cluster.save()
    wait_moto(state, timeout)
    log.info("S3 (moto) ready with bucket %s (%.1fs)", BUCKET, time.monotonic() - t0)
    for name, rec in [("head", head), *state["workers"].items()]:
        wait_until(f"Ray node {name}", lambda: log_says(rec["log"], RAY_READY), timeout, rec)
    state["node_ids"] = wait_nodes(state, ["head", *names], timeout)
    cluster.save()
    log.info("Ray: head (dashboard :%d) + %d workers alive (%.1fs)", head["dashboard_port"], len(names),
             time.monotonic() - t0)
    state["dispatcher"] = start_dispatcher(state)
    cluster.save()
    wait_mlflow(state, timeout)
    log.info("MLflow ready on PostgreSQL, artifacts to s3://%s/mlflow (%.1fs)", BUCKET, time.monotonic() - t0)


def _claim_state_dir(sd: Path) -> None:
    """Make `sd` ours: absent or empty, or a stale cluster (nothing running) that we clear first."""
    if (sd / STATE_FILE).is_file():
        old = LocalCluster.load(sd)
        if old.running():
            raise ClusterError(f"a test cluster from {sd} is running ({', '.join(old.running())}): "
                               f"`flowers cluster down --state {sd}` first")
        log.info("clearing a stale cluster state at %s", sd)
        old.down()
    elif sd.exists() and any(sd.iterdir()):
        raise ClusterError(f"state dir {sd} is not empty and holds no cluster: choose another --state")
    sd.mkdir(parents=True, exist_ok=True)
    sd.chmod(0o755)  # PostgreSQL, running as `postgres`, must reach its data dir inside


def _keep_logs(sd: Path) -> None:
    """Copy the logs of a failed start-up next to the state dir before `down` removes it."""
    dest = sd.with_name(sd.name + "-failed-logs")
    shutil.rmtree(dest, ignore_errors=True)
    if (sd / "logs").is_dir():
        shutil.copytree(sd / "logs", dest)
        if (sd / "pg" / "server.log").is_file():
            shutil.copy(sd / "pg" / "server.log", dest / "postgres.log")
        log.error("start-up logs kept in %s", dest)


def down(state_dir: str | Path | None = None) -> None:
    """Stop the cluster recorded in `state_dir` and remove the folder."""
    LocalCluster.load(state_dir).down()


def kill_worker(name: str, state_dir: str | Path | None = None) -> str:
    """SIGKILL worker node `name` of the cluster in `state_dir`; its node id."""
    cluster = LocalCluster.load(state_dir)
    return cluster.kill_worker(name)


def restart_worker(name: str, state_dir: str | Path | None = None) -> str:
    """Start killed worker node `name` again; its new node id."""
    cluster = LocalCluster.load(state_dir)
    return cluster.restart_worker(name)


def reap_when_gone(owner_pid: int, state_dir: str | Path) -> None:
    """Wait for `owner_pid` to exit, then stop the cluster if it still runs (a killed pytest leaves no nodes)."""
    while proc_stat(owner_pid) is not None:
        time.sleep(1)
    if (Path(state_dir) / STATE_FILE).is_file():
        LocalCluster.load(state_dir).down()
