"""A real multi-node test cluster on this machine: `flowers cluster up|down|env` and the tests' fixture.

What `up` starts, each on a free port picked at run time:
- PostgreSQL 15 as the `postgres` user in a data dir of its own, database `mlflow`;
- moto's S3 server (127.0.0.1) with the bucket `flowers`, fixed dummy credentials, us-east-1;
- `mlflow server` (127.0.0.1) on that PostgreSQL, artifacts proxied to s3://flowers/mlflow;
- a Ray head with 0 CPUs and token authentication, and N worker nodes joined with
  `ray start --address`, each in its own mount namespace with an empty read-only tmpfs over the
  driver's folders (`masks`), so a driver-local path fails on a worker as on another machine.

Every process starts in a session of its own (setsid) and `down` ends each session whole, so a
node's raylet, workers and agents go with it. The state file (`cluster.json` in the state dir)
records what runs where; `down`, `env`, `kill_worker` and `restart_worker` only read it.

No Ray import: nodes are `ray start` processes, and the readiness check is a Ray client in a
subprocess (a pytest process may already hold a local Ray of its own).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
BUCKET = "flowers"
# moto accepts any credentials; fixed ones keep every process (driver, nodes, server) in agreement
AWS_ENV = {"AWS_ACCESS_KEY_ID": "flowers-test", "AWS_SECRET_ACCESS_KEY": "flowers-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
STATE_FILE = "cluster.json"
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
PYPI_HINT = ".venv/bin/pip install 'moto[server]' boto3 psycopg2-binary"


class ClusterError(RuntimeError):
    """The test cluster cannot start, stop or be found; the message says what to do."""


def default_state_dir() -> Path:
    return Path(os.environ.get("FLOWERS_CLUSTER_STATE") or Path(tempfile.gettempdir()) / "flowers-cluster")


def default_masks(workdir: str | Path | None = None) -> list[Path]:
    """The driver's folders a worker must not see: working state, runs, MLflow's local folder, data."""
    work = Path(workdir or Path.cwd()).resolve()
    out = [work / ".flowers", work / "runs", work / "mlruns"]
    if os.environ.get("FLOWERS_DATA"):
        out.append(Path(os.environ["FLOWERS_DATA"]).resolve())
    out.append(work.parent / "shared" / "flowers102")
    return list(dict.fromkeys(out))


def unavailable_reason(masks: bool = True) -> str | None:
    """Why this machine cannot run the test cluster at all (None when it can)."""
    if not sys.platform.startswith("linux"):
        return "the test cluster needs Linux (mount namespaces, /proc)"
    if not (PG_BIN / "initdb").is_file():
        return f"no PostgreSQL 15 at {PG_BIN}: apt-get install postgresql-15"
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


def _sbin(tool: str) -> str:
    """An administration tool by full path: a plain user's PATH (/usr/bin:/bin) lacks the sbin folders."""
    return shutil.which(tool, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") or tool


def ray_binary() -> str | None:
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.is_file() else shutil.which("ray")


# ----------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start time in ticks) of `pid` from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, session 6, start 22
    return fields[0], int(fields[3]), int(fields[19])


def _reap(pid: int) -> None:
    """Collect `pid` if it is our exited child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def alive(proc: dict | None) -> bool:
    """The recorded process runs: same pid and start time (not a reused pid), not a zombie."""
    if not proc or not proc.get("pid"):
        return False
    _reap(proc["pid"])
    st = _proc_stat(proc["pid"])
    return st is not None and st[0] != "Z" and st[2] == proc.get("start")


def session_members(sid: int) -> list[int]:
    """Every live process of session `sid` (a node's raylet, workers and agents stay in its session)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _proc_stat(int(d))
            if st and st[1] == sid and st[0] != "Z":
                out.append(int(d))
    return out


def _signal_session(sid: int, sig: int) -> None:
    for pid in session_members(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def end_sessions(procs: list[dict], grace: float = 3.0) -> list[int]:
    """SIGTERM every process of these sessions, SIGKILL what is left after `grace` s; returns survivors.

    A Ray head takes over 10 s to stop on SIGTERM; a test cluster has nothing to save, so the
    grace is short.
    """
    sids = [p["pid"] for p in procs if p and p.get("pid") and (alive(p) or session_members(p["pid"]))]
    for sid in sids:
        _signal_session(sid, signal.SIGTERM)
    _wait_gone(sids, grace)
    for sid in sids:
        _signal_session(sid, signal.SIGKILL)
    _wait_gone(sids, 5.0)
    return [pid for sid in sids for pid in session_members(sid)]


def _wait_gone(sids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(session_members(s) for s in sids) and time.monotonic() < deadline:
        for sid in sids:
            _reap(sid)
        time.sleep(0.1)
    for sid in sids:
        _reap(sid)


def _launch(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> dict:
    """Start `cmd` in a session of its own, output to `log_path`; the record `alive` checks."""
    with open(log_path, "ab") as out:
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
    st = _proc_stat(p.pid)
    return {"pid": p.pid, "start": st[2] if st else 0, "log": str(log_path)}


def _tail(path: str | Path, pattern: str = "") -> str:
    """The last non-empty log line (containing `pattern` when one does), for one-line errors."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"no log at {path}"
    hits = [ln for ln in lines if pattern and pattern in ln] or lines
    return (hits[-1][:300] if hits else "empty log") + f" (log: {path})"


def _wait(what: str, ready: Callable[[], bool], timeout: float, proc: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and not alive(proc):
            raise ClusterError(f"{what} exited while starting: {_tail(proc['log'], 'rror')}")
        if time.monotonic() > deadline:
            where = _tail(proc["log"]) if proc else ""
            raise ClusterError(f"{what} not ready after {timeout:.0f}s {where}".strip())
        time.sleep(0.2)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _log_says(path: str, text: str) -> bool:
    try:
        return text in Path(path).read_text(errors="replace")
    except OSError:
        return False


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None,
         log_path: Path | None = None) -> None:
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        detail = _tail(log_path) if log_path else ((out.stderr or out.stdout).strip().splitlines() or ["?"])[-1]
        raise ClusterError(f"{what} failed: {detail}")


def pick_ports(n: int) -> list[int]:
    """`n` distinct free ports below the ephemeral range (Ray's own servers bind ephemeral ports)."""
    from serve.ingress_env import pick_port

    ports: list[int] = []
    while len(ports) < n:
        p = pick_port()
        if p not in ports:
            ports.append(p)
    return ports


# ----------------------------------------------------------------------------- services


def _start_postgres(state_dir: Path, port: int) -> dict:
    """initdb + pg_ctl start as `postgres` (root) or as ourselves, then the `mlflow` database."""
    pg = state_dir / "pg"
    pg.mkdir()
    as_pg: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(pg, "postgres", "postgres")
        as_pg = [_sbin("runuser"), "-u", "postgres", "--"]
    password = secrets.token_hex(12)
    pwfile = pg / "pw"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if as_pg:
        shutil.chown(pwfile, "postgres", "postgres")
    data = pg / "data"
    _run(as_pg + [str(PG_BIN / "initdb"), "-D", str(data), "-U", "flowers", f"--pwfile={pwfile}",
                  "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
         "initdb", cwd=pg)
    pwfile.unlink()
    # a throw-away store: durability settings off, socket in our own folder, loopback only
    opts = (f"-p {port} -k {pg} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off")
    server_log = pg / "server.log"
    _run(as_pg + [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(server_log), "-o", opts, "-w", "-t", "60",
                  "start"], f"PostgreSQL on port {port}", cwd=pg, log_path=server_log)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    st = _proc_stat(pid)
    for db in ("mlflow", "queue"):  # MLflow's store, and the job queue's (jobs/queue/store.py)
        _run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "flowers", db],
             f"createdb {db}", env={**os.environ, "PGPASSWORD": password})
    return {"pid": pid, "start": st[2] if st else 0, "log": str(server_log), "port": port, "data": str(data),
            "run_as": "postgres" if as_pg else "", "uri": f"postgresql://flowers:{password}@127.0.0.1:{port}/mlflow"}


def _stop_postgres(rec: dict) -> None:
    as_pg = [_sbin("runuser"), "-u", rec["run_as"], "--"] if rec.get("run_as") and os.geteuid() == 0 else []
    if alive(rec):
        subprocess.run(as_pg + [str(PG_BIN / "pg_ctl"), "-D", rec["data"], "-m", "fast", "-w", "-t", "20", "stop"],
                       capture_output=True, timeout=60, cwd="/")


def storage_env(state: dict) -> dict[str, str]:
    """Credentials and endpoint of the S3 server, for boto3, MLflow and pyarrow alike."""
    url = f"http://127.0.0.1:{state['moto']['port']}"
    return {**AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": url, "AWS_ENDPOINT_URL_S3": url}


def _create_bucket(state: dict) -> None:
    import boto3

    env = storage_env(state)
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name=env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=BUCKET)


def _mlflow_cmd(state: dict, port: int) -> list[str]:
    # psycopg2 named explicitly: SQLAlchemy 2.1 defaults `postgresql://` to psycopg 3
    backend = state["postgres"]["uri"].replace("postgresql://", "postgresql+psycopg2://", 1)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
            "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]


# ----------------------------------------------------------------------------- Ray nodes


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


def _start_head(state: dict) -> dict:
    sd = Path(state["state_dir"])
    gcs, dash, client, *rest = pick_ports(9)
    temp = sd / "ray-head"
    cmd = [state["ray"], "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client}", *_node_ports_args(rest),
           f"--temp-dir={temp}", f"--object-store-memory={state['head_object_store_mb'] << 20}",
           f"--labels={NODE_LABEL}=head"]
    temp.mkdir()
    rec = _launch(cmd, _node_env(state), sd / "logs" / "head.log", cwd=temp)
    rec.update(gcs_port=gcs, dashboard_port=dash, temp_dir=str(temp))
    return rec


def _start_worker(state: dict, name: str, generation: int = 0) -> dict:
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
    rec = _launch(cmd, _node_env(state), sd / "logs" / f"{name}-{generation}.log", cwd=temp)
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


def queue_url(state: dict) -> str:
    """The job queue's store: the `queue` database of the cluster's PostgreSQL."""
    return state["postgres"]["uri"].rsplit("/", 1)[0] + "/queue"


def _start_dispatcher(state: dict, generation: int = 0) -> dict:
    """The queue's dispatcher (jobs/queue/dispatcher.py) as a process of its own, next to the head."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in DRIVER_ONLY_ENV}
    env.update(client_env(state))
    cmd = [sys.executable, "-m", "jobs.queue.dispatcher", "--address", env["RAY_API_SERVER_ADDRESS"],
           "--store", queue_url(state)]
    if state.get("queues_file"):
        cmd += ["--queues", state["queues_file"]]
    logs = Path(state["state_dir"]) / "logs"
    return _launch(cmd, env, logs / f"dispatcher-{generation}.log", cwd=Path(__file__).resolve().parents[1]) | \
        {"generation": generation}


def _wait_nodes(state: dict, names: list[str], timeout: float = 90.0) -> dict[str, str]:
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


# ----------------------------------------------------------------------------- the cluster


class TestCluster:
    """A running test cluster, as its state file describes it."""

    __test__ = False  # not a pytest test class

    def __init__(self, state_dir: str | Path, state: dict):
        self.state_dir = Path(state_dir)
        self.state = state

    @classmethod
    def load(cls, state_dir: str | Path | None = None) -> "TestCluster":
        sd = Path(state_dir or default_state_dir())
        path = sd / STATE_FILE
        if not path.is_file():
            raise ClusterError(f"no test cluster at {sd}: start one with `flowers cluster up --state {sd}`")
        return cls(sd, json.loads(path.read_text()))

    def save(self) -> None:
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.chmod(0o600)
        tmp.replace(self.state_dir / STATE_FILE)

    # what runs
    def processes(self) -> dict[str, dict]:
        out = {k: self.state[k] for k in ("postgres", "moto", "mlflow", "head", "dispatcher") if self.state.get(k)}
        out.update(self.state.get("workers", {}))
        return out

    def running(self) -> list[str]:
        return [name for name, rec in self.processes().items() if alive(rec)]

    @property
    def workers(self) -> list[str]:
        return list(self.state.get("workers", {}))

    def env(self) -> dict[str, str]:
        return client_env(self.state)

    @property
    def postgres_uri(self) -> str:
        return self.state["postgres"]["uri"]

    @property
    def s3_endpoint(self) -> str:
        return storage_env(self.state)["AWS_ENDPOINT_URL_S3"]

    def node_id(self, name: str) -> str:
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
        _signal_session(rec["pid"], signal.SIGKILL)
        _wait_gone([rec["pid"]], 10.0)
        log.info("killed worker %s (node %s)", name, self.state["node_ids"].get(name, "?")[:12])
        return self.state["node_ids"].get(name, "")

    def restart_worker(self, name: str, timeout: float = 90.0) -> str:
        """Start a killed worker again (new node id, fresh temp dir); its new node id."""
        old = self._worker(name)
        if alive(old):
            raise ClusterError(f"worker {name} is still running: kill_worker({name!r}) first")
        t0 = time.monotonic()
        rec = _start_worker(self.state, name, old.get("generation", 0) + 1)
        self.state["workers"][name] = rec
        self.save()
        _wait(f"Ray worker {name}", lambda: _log_says(rec["log"], RAY_READY), timeout, rec)
        self.state["node_ids"].update(_wait_nodes(self.state, [name], timeout))
        self.save()
        log.info("worker %s back as node %s (%.1fs)", name, self.node_id(name)[:12], time.monotonic() - t0)
        return self.node_id(name)

    def stop_mlflow(self) -> None:
        """SIGKILL the MLflow server (a crash, not a clean stop); PostgreSQL and S3 keep its data."""
        rec = self.state["mlflow"]
        if alive(rec):
            _signal_session(rec["pid"], signal.SIGKILL)
            _wait_gone([rec["pid"]], 10.0)
        log.info("MLflow server stopped")

    def start_mlflow(self, timeout: float = 120.0) -> None:
        """Start the MLflow server again on the same port and stores."""
        port = self.state["mlflow"]["port"]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env.update(storage_env(self.state), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        rec = _launch(_mlflow_cmd(self.state, port), env, self.state_dir / "logs" / "mlflow-restart.log")
        rec["port"] = port
        self.state["mlflow"] = rec
        self.save()
        _wait("MLflow server", lambda: _http_ok(f"http://127.0.0.1:{port}/health"), timeout, rec)
        log.info("MLflow server back on :%d", port)

    def kill_dispatcher(self) -> None:
        """SIGKILL the queue's dispatcher (a crash: no lease released, nothing cleaned up)."""
        rec = self.state.get("dispatcher")
        if rec and alive(rec):
            _signal_session(rec["pid"], signal.SIGKILL)
            _wait_gone([rec["pid"]], 10.0)
        log.info("dispatcher killed")

    def start_dispatcher(self) -> None:
        """Start the dispatcher again; it takes the lease once the dead one's has expired."""
        old = self.state.get("dispatcher") or {}
        if alive(old):
            raise ClusterError("the dispatcher is still running: kill_dispatcher() first")
        self.state["dispatcher"] = _start_dispatcher(self.state, old.get("generation", 0) + 1)
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
                _signal_session(rec["pid"], signal.SIGTERM)
        if pg:
            _stop_postgres(pg)
        left = end_sessions([*procs.values(), pg], grace)
        if left:
            raise ClusterError(f"processes {left} outlived SIGKILL; state kept at {self.state_dir}")
        shutil.rmtree(self.state_dir, ignore_errors=True)
        log.info("test cluster at %s stopped and removed (%.1fs)", self.state_dir, time.monotonic() - t0)


def up(state_dir: str | Path | None = None, workers: int = 2, cpus_per_worker: float = 1, gpus_per_worker: int = 0,
       masks: list[str | Path] | None = None, workdir: str | Path | None = None,
       object_store_mb: int = 300, head_object_store_mb: int = 100, node_env: dict[str, str] | None = None,
       timeout: float = 120.0, pin_cpus: bool = False, queues: str | Path | None = None) -> TestCluster:
    """Start the cluster (PostgreSQL, S3, MLflow, Ray head + `workers` nodes); see the module docstring.

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
    mounted = _mask_targets(mask_list, sd, workdir)
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
    cluster = TestCluster(sd, state)
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


def _bring_up(cluster: TestCluster, names: list[str], timeout: float) -> None:
    """Slow parts overlap: PostgreSQL initialises in a thread while moto and the Ray head start;
    the workers join as soon as the head's GCS answers; MLflow migrates its schema meanwhile."""
    state, sd = cluster.state, cluster.state_dir
    t0 = time.monotonic()
    moto_port, pg_port, mlflow_port = pick_ports(3)
    pg: dict = {}

    def start_pg() -> None:
        try:
            pg["rec"] = _start_postgres(sd, pg_port)
        except BaseException as e:  # re-raised in the main thread
            pg["error"] = e

    pg_thread = threading.Thread(target=start_pg, name="postgres", daemon=True)
    pg_thread.start()
    log.info("starting PostgreSQL 15 on 127.0.0.1:%d, S3 (moto) and the Ray head ...", pg_port)
    state["moto"] = _launch([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                            {**os.environ, **AWS_ENV}, sd / "logs" / "moto.log")
    state["moto"]["port"] = moto_port
    state["head"] = head = _start_head(state)
    cluster.save()
    pg_thread.join()
    if "error" in pg:
        raise pg["error"]
    state["postgres"] = pg["rec"]
    cluster.save()
    log.info("PostgreSQL ready (%.1fs); starting the MLflow server on 127.0.0.1:%d ...", time.monotonic() - t0,
             mlflow_port)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(storage_env(state), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    state["mlflow"] = _launch(_mlflow_cmd(state, mlflow_port), env, sd / "logs" / "mlflow.log")
    state["mlflow"]["port"] = mlflow_port
    cluster.save()
    # a joining `ray start` waits for the head's session in the GCS, so an open GCS port is enough
    _wait("Ray head (GCS)", lambda: _port_open(head["gcs_port"]), timeout, head)
    log.info("Ray GCS up on 127.0.0.1:%d (%.1fs); joining %d workers (masked on each: %s) ...",
             head["gcs_port"], time.monotonic() - t0, len(names), ", ".join(state["masks"]) or "nothing")
    for name in names:
        state["workers"][name] = _start_worker(state, name)
        cluster.save()
    _wait("moto S3 server", lambda: _http_ok(f"http://127.0.0.1:{moto_port}/moto-api/"), timeout, state["moto"])
    _create_bucket(state)
    log.info("S3 (moto) ready with bucket %s (%.1fs)", BUCKET, time.monotonic() - t0)
    for name, rec in [("head", head), *state["workers"].items()]:
        _wait(f"Ray node {name}", lambda: _log_says(rec["log"], RAY_READY), timeout, rec)
    state["node_ids"] = _wait_nodes(state, ["head", *names], timeout)
    cluster.save()
    log.info("Ray: head (dashboard :%d) + %d workers alive (%.1fs)", head["dashboard_port"], len(names),
             time.monotonic() - t0)
    state["dispatcher"] = _start_dispatcher(state)
    cluster.save()
    _wait("MLflow server", lambda: _http_ok(f"http://127.0.0.1:{mlflow_port}/health"), timeout, state["mlflow"])
    log.info("MLflow ready on PostgreSQL, artifacts to s3://%s/mlflow (%.1fs)", BUCKET, time.monotonic() - t0)


def _claim_state_dir(sd: Path) -> None:
    """Make `sd` ours: absent or empty, or a stale cluster (nothing running) that we clear first."""
    if (sd / STATE_FILE).is_file():
        old = TestCluster.load(sd)
        if old.running():
            raise ClusterError(f"a test cluster from {sd} is running ({', '.join(old.running())}): "
                               f"`flowers cluster down --state {sd}` first")
        log.info("clearing a stale cluster state at %s", sd)
        old.down()
    elif sd.exists() and any(sd.iterdir()):
        raise ClusterError(f"state dir {sd} is not empty and holds no cluster: choose another --state")
    sd.mkdir(parents=True, exist_ok=True)
    sd.chmod(0o755)  # PostgreSQL, running as `postgres`, must reach its data dir inside


def _mask_targets(masks: list[Path], sd: Path, workdir: str | Path | None) -> list[Path]:
    """Folders to mount over on workers: existing ones, and missing ones under the working folder (created now)."""
    work = Path(workdir or Path.cwd()).resolve()
    needed = [Path(sys.prefix).resolve(), sd, Path(__file__).resolve().parent]
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
    TestCluster.load(state_dir).down()


def kill_worker(name: str, state_dir: str | Path | None = None) -> str:
    cluster = TestCluster.load(state_dir)
    return cluster.kill_worker(name)


def restart_worker(name: str, state_dir: str | Path | None = None) -> str:
    cluster = TestCluster.load(state_dir)
    return cluster.restart_worker(name)


def reap_when_gone(owner_pid: int, state_dir: str | Path) -> None:
    """Wait for `owner_pid` to exit, then stop the cluster if it still runs (a killed pytest leaves no nodes)."""
    while _proc_stat(owner_pid) is not None:
        time.sleep(1)
    if (Path(state_dir) / STATE_FILE).is_file():
        TestCluster.load(state_dir).down()


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.testcluster", description="stop a test cluster once PID exits")
    p.add_argument("action", choices=["reap"])
    p.add_argument("pid", type=int)
    p.add_argument("state_dir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reap_when_gone(args.pid, args.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
