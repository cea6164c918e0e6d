"""The local cluster's Ray nodes: a head with 0 CPUs and token authentication, and worker nodes joined with
`ray start --address`, each worker in its own mount namespace whose masked folders are empty read-only tmpfs.

No Ray import: nodes are `ray start` processes, and the readiness check is a Ray client in a
subprocess (a pytest process may already hold a local Ray of its own).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from jobs.localcluster.objectstore import storage_env
from jobs.localcluster.postgres import queue_url
from jobs.localcluster.procs import ClusterError, launch, pick_ports

log = logging.getLogger(__name__)

# the driver's settings that a node on another machine would not have; every inherited RAY_*
# goes too (a pytest process that started a local Ray carries its Serve ports and job flags),
# and what the nodes should get comes through `node_env`
DRIVER_ONLY_ENV = ("FLOWERS_DATA", "MLFLOW_TRACKING_URI")
NODE_LABEL = "flowers.node"
# Ray puts unix sockets at <temp-dir>/session_<date>_<time>_<pid>/sockets/plasma_store; Linux caps
# a socket path at 107 bytes, which leaves about 45 for the temp dir
RAY_TEMP_MAX = 45
# `ray start --block` prints this once the node runs
RAY_READY = "This command will now block forever"
# the code the nodes run (jobs/): a mask over it would leave them nothing to import
CODE_DIR = Path(__file__).resolve().parents[1]


def ray_binary() -> str | None:
    """The `ray` command next to this Python, else on PATH."""
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.is_file() else shutil.which("ray")


def default_masks(workdir: str | Path | None = None) -> list[Path]:
    """The driver's folders a worker must not see: working state, runs, MLflow's local folder, data."""
    work = Path(workdir or Path.cwd()).resolve()
    out = [work / ".flowers", work / "runs", work / "mlruns"]
    if os.environ.get("FLOWERS_DATA"):
        out.append(Path(os.environ["FLOWERS_DATA"]).resolve())
    out.append(work.parent / "shared" / "flowers102")
    return list(dict.fromkeys(out))


def mask_targets(masks: list[Path], sd: Path, workdir: str | Path | None) -> list[Path]:
    """Folders to mount over on workers: existing ones, and missing ones under the working folder (created now)."""
    work = Path(workdir or Path.cwd()).resolve()
    needed = [Path(sys.prefix).resolve(), sd, CODE_DIR]
    out = []
    for m in masks:
        if any(n == m or n.is_relative_to(m) for n in needed):
            raise ClusterError(f"cannot mask {m} on workers: the nodes need {next(n for n in needed if n.is_relative_to(m))}")
        if not m.is_dir() and m.is_relative_to(work):
            m.mkdir(parents=True, exist_ok=True)  # a mount point, so a folder the driver makes later stays hidden
        if m.is_dir():
            out.append(m)
        else:
            log.debug("not masking %s: it does not exist", m)
    return out


def _node_env(state: dict) -> dict[str, str]:
    """What every node process gets: the launching env without driver-only settings and RAY_*; the
    allocator setting, token auth, storage credentials and `node_env`."""
    from flowers.runtime import allocator_env

    env = {k: v for k, v in os.environ.items() if k not in DRIVER_ONLY_ENV and not k.startswith("RAY_")}
    env.update(allocator_env())
    env.update(storage_env(state))
    # Ray keeps at most a node's CPU count of idle workers and kills the rest after a second; on these
    # 1-CPU nodes every short read/write task of a scoring job then boots a fresh worker (~1.5 s of
    # CPU each). A real node's many CPUs give it that headroom; these nodes get it set.
    env["RAY_num_workers_soft_limit"] = "4"
    env.update(state.get("node_env", {}))
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=state["token_path"], RAY_USAGE_STATS_ENABLED="0")
    return env


def _node_ports_args(ports: list[int]) -> list[str]:
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port")
    # worker ports 0/0: the kernel picks them, so nodes on one machine never hand out the same one
    return [f"--{n}={p}" for n, p in zip(names, ports)] + ["--min-worker-port=0", "--max-worker-port=0"]


def start_head(state: dict) -> dict:
    """`ray start --head` with 0 CPUs, the dashboard (Jobs API) and the client server on fresh ports."""
    sd = Path(state["state_dir"])
    gcs, dash, client, *rest = pick_ports(9)
    temp = sd / "ray-head"
    cmd = [state["ray"], "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client}", *_node_ports_args(rest),
           f"--temp-dir={temp}", f"--object-store-memory={state['head_object_store_mb'] << 20}",
           f"--labels={NODE_LABEL}=head"]
    temp.mkdir()
    rec = launch(cmd, _node_env(state), sd / "logs" / "head.log", cwd=temp)
    rec.update(gcs_port=gcs, dashboard_port=dash, temp_dir=str(temp))
    return rec


def start_worker(state: dict, name: str, generation: int = 0) -> dict:
    """`ray start --address` in a new mount namespace whose masked folders are empty read-only tmpfs."""
    sd = Path(state["state_dir"])
    temp = sd / f"ray-{name}-{generation}"
    temp.mkdir()
    spec = state["worker_spec"]
    ray_cmd = [state["ray"], "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
               f"--address=127.0.0.1:{state['head']['gcs_port']}", f"--num-cpus={spec['cpus']}",
               f"--num-gpus={spec['gpus']}", f"--resources={json.dumps({name: 1})}",
               f"--labels={NODE_LABEL}={name}", *_node_ports_args(pick_ports(6)), f"--temp-dir={temp}",
               f"--object-store-memory={spec['object_store_mb'] << 20}"]
    if spec.get("pin_cpus"):
        # the node's processes on one core of their own (worker_a: core 0, ...), as on separate machines;
        # otherwise a "1-CPU" node's extra processes (readers, writers) use any idle core of this host
        core = (ord(name[-1]) - ord("a")) % (os.cpu_count() or 1)
        ray_cmd = ["taskset", "-c", str(core), *ray_cmd]
    if state["masks"]:
        mounts = "; ".join(f"mount -t tmpfs -o ro,size=1m,mode=755 flowers-mask {shlex.quote(m)}"
                           for m in state["masks"])
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               f"set -e; {mounts}; exec {shlex.join(ray_cmd)}"]
    else:
        cmd = ray_cmd
    rec = launch(cmd, _node_env(state), sd / "logs" / f"{name}-{generation}.log", cwd=temp)
    rec.update(temp_dir=str(temp), generation=generation)
    return rec


_NODES_SCRIPT = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
want, deadline = set(sys.argv[3].split(",")), time.monotonic() + float(sys.argv[2])
while True:
    nodes = {n["Labels"].get("%s", "?"): n["NodeID"] for n in ray.nodes() if n["Alive"]}
    if want <= set(nodes) or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print(json.dumps(nodes))
""" % NODE_LABEL


def client_env(state: dict) -> dict[str, str]:
    """What a driver or `flowers submit` needs to use the cluster (`flowers cluster env` prints it)."""
    token = Path(state["token_path"]).read_text().strip()
    return {"RAY_ADDRESS": f"127.0.0.1:{state['head']['gcs_port']}",
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{state['head']['dashboard_port']}",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["token_path"], "RAY_AUTH_TOKEN": token,
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{state['mlflow']['port']}",
            "FLOWERS_QUEUE_URL": queue_url(state), **storage_env(state)}


def wait_nodes(state: dict, names: list[str], timeout: float = 90.0) -> dict[str, str]:
    """Node ids by name, once a token-authenticated client sees all of `names` alive."""
    env = {**os.environ, **client_env(state)}
    out = subprocess.run([sys.executable, "-c", _NODES_SCRIPT, env["RAY_ADDRESS"], str(timeout), ",".join(names)],
                         env=env, capture_output=True, text=True, timeout=timeout + 60)
    if out.returncode != 0:
        raise ClusterError(f"a Ray client could not join the cluster: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    nodes = json.loads(out.stdout.strip().splitlines()[-1])
    missing = sorted(set(names) - set(nodes))
    if missing:
        raise ClusterError(f"Ray nodes {missing} did not join within {timeout:.0f}s (logs in {state['state_dir']}/logs)")
    return nodes
