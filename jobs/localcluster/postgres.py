"""PostgreSQL 15 for the local cluster: a throw-away server in the state dir with the `mlflow` and `queue` databases.

Run as the `postgres` user when we are root (PostgreSQL refuses root), else as ourselves.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from jobs.localcluster.procs import alive, proc_stat, run_checked, sbin

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def start_postgres(state_dir: Path, port: int) -> dict:
    """initdb + pg_ctl start as `postgres` (root) or as ourselves, then the `mlflow` database."""
    pg = state_dir / "pg"
    pg.mkdir()
    as_pg: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(pg, "postgres", "postgres")
        as_pg = [sbin("runuser"), "-u", "postgres", "--"]
    password = secrets.token_hex(12)
    pwfile = pg / "pw"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if as_pg:
        shutil.chown(pwfile, "postgres", "postgres")
    data = pg / "data"
    run_checked(as_pg + [str(PG_BIN / "initdb"), "-D", str(data), "-U", "flowers", f"--pwfile={pwfile}",
                         "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync",
                         "--no-instructions"], "initdb", cwd=pg)
    pwfile.unlink()
    # a throw-away store: durability settings off, socket in our own folder, loopback only
    opts = (f"-p {port} -k {pg} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off")
    server_log = pg / "server.log"
    run_checked(as_pg + [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(server_log), "-o", opts, "-w", "-t", "60",
                         "start"], f"PostgreSQL on port {port}", cwd=pg, log_path=server_log)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    st = proc_stat(pid)
    for db in ("mlflow", "queue"):  # MLflow's store, and the job queue's (jobs/queue/store.py)
        run_checked([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "flowers", db],
                    f"createdb {db}", env={**os.environ, "PGPASSWORD": password})
    return {"pid": pid, "start": st[2] if st else 0, "log": str(server_log), "port": port, "data": str(data),
            "run_as": "postgres" if as_pg else "", "uri": f"postgresql://flowers:{password}@127.0.0.1:{port}/mlflow"}


def stop_postgres(rec: dict) -> None:
    """A fast, clean `pg_ctl stop` of the recorded server, when it still runs."""
    as_pg = [sbin("runuser"), "-u", rec["run_as"], "--"] if rec.get("run_as") and os.geteuid() == 0 else []
    if alive(rec):
        subprocess.run(as_pg + [str(PG_BIN / "pg_ctl"), "-D", rec["data"], "-m", "fast", "-w", "-t", "20", "stop"],
                       capture_output=True, timeout=60, cwd="/")


def queue_url(state: dict) -> str:
    """The job queue's store: the `queue` database of the cluster's PostgreSQL."""
    return state["postgres"]["uri"].rsplit("/", 1)[0] + "/queue"
