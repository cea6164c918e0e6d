"""Ray Jobs SDK: submit the `python -m jobs.X` entry points and manage the queue.

Token authentication: Ray 2.60 turns it on for clusters started by `ray.init()`,
and for `ray start --head` whenever a token exists (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). We send the same token as a Bearer
header; with none found we send nothing, and an authenticated cluster answers
401, which we turn into a message saying where to put the token. We never turn
authentication off.
"""
from __future__ import annotations

import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any

from ray.job_submission import JobSubmissionClient

from flowers.runtime import worker_runtime_env
from jobs.options import ENTRYPOINTS

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# never upload these with the working_dir (size limit, secrets, local state)
EXCLUDES = [".venv", "venv", ".git", "runs", "mlruns", "mlartifacts", ".flowers", "shared", "**/__pycache__",
            ".pytest_cache", "*.pt", "*.onnx", "*.db", "*.parquet", "node_modules"]


class JobsError(RuntimeError):
    """A job-queue problem the user can fix (address, token, unknown job)."""


def auth_token() -> str | None:
    """The Ray token: $RAY_AUTH_TOKEN, else the file at $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if tok:
        return tok
    for p in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if p and Path(p).is_file():
            tok = Path(p).read_text().strip()
            if tok:
                return tok
    return None


def resolve_address(address: str | None = None) -> str:
    """The Jobs API URL: http(s) as given; else $RAY_API_SERVER_ADDRESS (Ray's own name for it); a
    `host:port` / `ray://host:port` / `auto` address → the dashboard on 8265."""
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if addr.startswith(("http://", "https://")):
        return addr
    if addr == "auto":
        return DEFAULT_ADDRESS
    host = addr.split("://")[-1].split(":")[0] or "127.0.0.1"
    return f"http://{host}:8265"


def client(address: str | None = None):
    """A JobSubmissionClient for `address`, with the auth header when a token is available."""
    addr = resolve_address(address)
    tok = auth_token()
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    try:
        return JobSubmissionClient(addr, headers=headers)
    except Exception as e:
        raise JobsError(_explain(e, addr)) from None


def _explain(e: Exception, addr: str) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "401" in msg or "403" in msg or "nauthori" in msg or "orbidden" in msg or "uthentication" in msg:
        return (f"Ray at {addr} refused the request ({msg}). The cluster uses token authentication: "
                "put its token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head prints it).")
    return f"cannot reach the Ray Jobs API at {addr}: {msg}. Start a head with `ray start --head` or pass --address."


def entrypoint(kind: str, args: list[str] | None = None, python: str = "python") -> str:
    """`python -m jobs.<kind> <args>`, shell-quoted."""
    if kind not in ENTRYPOINTS:
        raise JobsError(f"unknown job '{kind}' (choose from {', '.join(ENTRYPOINTS)})")
    return " ".join([python, "-m", f"jobs.{kind}", *(shlex.quote(a) for a in (args or []))])


def runtime_env(working_dir: str | Path = ".", extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """working_dir upload (minus local state) + the workers' allocator env + tracking/data env."""
    env = dict(worker_runtime_env()["env_vars"])
    for k in ("MLFLOW_TRACKING_URI", "FLOWERS_DATA"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    env.update(extra_env or {})
    return {"working_dir": str(Path(working_dir).resolve()), "excludes": list(EXCLUDES), "env_vars": env}


def submit(kind: str, args: list[str] | None = None, address: str | None = None, working_dir: str | Path = ".",
           submission_id: str | None = None, entrypoint_num_cpus: float | None = None, python: str = "python",
           extra_env: dict[str, str] | None = None) -> str:
    """Submit `python -m jobs.<kind> ...`; returns the submission id."""
    c = client(address)
    deadline = time.time() + 60
    while True:
        try:
            return c.submit_job(entrypoint=entrypoint(kind, args, python), runtime_env=runtime_env(working_dir, extra_env),
                                submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus,
                                metadata={"flowers.job": kind})
        except Exception as e:
            # a head that just started has no job agent yet and says "try again later", or (busy
            # machine) its dashboard drops the connection before answering: both pass
            transient = ("No available agent", "RemoteDisconnected", "Connection aborted")
            if any(t in str(e) for t in transient) and time.time() < deadline:
                time.sleep(2)
                continue
            raise JobsError(_explain(e, resolve_address(address))) from None


def _call(address: str | None, fn: str, *a):
    c = client(address)
    try:
        return getattr(c, fn)(*a)
    except Exception as e:
        if "does not exist" in str(e) or "not found" in str(e).lower():
            raise JobsError(f"no job '{a[0] if a else ''}' at {resolve_address(address)}: see `flowers jobs list`") from None
        raise JobsError(_explain(e, resolve_address(address))) from None


def list_jobs(address: str | None = None) -> list[dict[str, Any]]:
    out = []
    for j in _call(address, "list_jobs"):
        out.append({"submission_id": j.submission_id, "status": str(j.status.value if hasattr(j.status, "value") else j.status),
                    "entrypoint": j.entrypoint, "start_time": j.start_time, "end_time": j.end_time,
                    "message": j.message})
    return sorted(out, key=lambda j: j["start_time"] or 0)


def status(job_id: str, address: str | None = None) -> str:
    s = _call(address, "get_job_status", job_id)
    return str(s.value if hasattr(s, "value") else s)


def logs(job_id: str, address: str | None = None) -> str:
    return _call(address, "get_job_logs", job_id)


def stop(job_id: str, address: str | None = None) -> bool:
    return bool(_call(address, "stop_job", job_id))


def wait(job_id: str, address: str | None = None, timeout_s: float = 600, poll_s: float = 2.0) -> str:
    """Poll until the job is SUCCEEDED/FAILED/STOPPED; returns the final status."""
    deadline = time.time() + timeout_s
    while True:
        st = status(job_id, address)
        if st in ("SUCCEEDED", "FAILED", "STOPPED"):
            return st
        if time.time() > deadline:
            raise JobsError(f"job {job_id} still {st} after {timeout_s:.0f}s")
        time.sleep(poll_s)
