"""Ray Jobs SDK: submit the `python -m jobs.X` entry points and manage the queue.

Token authentication: Ray 2.60 turns it on for clusters started by `ray.init()`,
and for `ray start --head` whenever a token exists (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). We send the same token as a Bearer
header; with none found we send nothing, and an authenticated cluster answers
401, which we turn into a message saying where to put the token. We never turn
authentication off.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ray.job_submission import JobSubmissionClient

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


@contextlib.contextmanager
def _address_wins(address: str | None):
    """Ray's clients take $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS over the address they are given; an
    explicit --address must win, so those are hidden while the client resolves it."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if address and k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def client(address: str | None = None):
    """A JobSubmissionClient for `address`, with the auth header when a token is available."""
    addr = resolve_address(address)
    tok = auth_token()
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    try:
        with _address_wins(address):
            return JobSubmissionClient(addr, headers=headers)
    except Exception as e:
        raise JobsError(_explain(e, addr)) from None


def _explain(e: Exception, addr: str) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "401" in msg or "403" in msg or "nauthori" in msg or "orbidden" in msg or "uthentication" in msg:
        return (f"Ray at {addr} refused the request ({msg}). The cluster uses token authentication: "
                "put its token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head prints it).")
    return (f"cannot reach the Ray Jobs API at {addr}: {msg.rstrip('.')}. Start a head with `ray start --head` "
            "or pass --address.")


def default_python() -> str:
    """The interpreter `flowers` runs in: jobs use the same environment unless told otherwise (--python)."""
    return sys.executable or "python3"


def entrypoint(kind: str, args: list[str] | None = None, python: str | None = None) -> str:
    """`<python> -m jobs.<kind> <args>`, shell-quoted; python defaults to this interpreter."""
    python = shlex.quote(python or default_python())
    if kind not in ENTRYPOINTS:
        raise JobsError(f"unknown job '{kind}' (choose from {', '.join(ENTRYPOINTS)})")
    return " ".join([python, "-m", f"jobs.{kind}", *(shlex.quote(a) for a in (args or []))])


def runtime_env(working_dir: str | Path = ".", extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """working_dir upload (minus local state) + the workers' allocator env + tracking/data env."""
    from flowers.runtime import worker_runtime_env  # here: it loads torch, which listing jobs does not need

    env = dict(worker_runtime_env()["env_vars"])
    for k in ("MLFLOW_TRACKING_URI", "FLOWERS_DATA"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    env.update(extra_env or {})
    return {"working_dir": str(Path(working_dir).resolve()), "excludes": list(EXCLUDES), "env_vars": env}


def submit(kind: str, args: list[str] | None = None, address: str | None = None, working_dir: str | Path = ".",
           submission_id: str | None = None, entrypoint_num_cpus: float | None = None, python: str | None = None,
           extra_env: dict[str, str] | None = None) -> str:
    """Submit `python -m jobs.<kind> ...` straight to Ray Jobs (no queue); returns the submission id."""
    return submit_entrypoint(client(address), entrypoint(kind, args, python), runtime_env(working_dir, extra_env),
                             submission_id, entrypoint_num_cpus, {"flowers.job": kind})


def submit_entrypoint(c, entry: str, renv: dict[str, Any], submission_id: str | None = None,
                      entrypoint_num_cpus: float | None = None, metadata: dict[str, str] | None = None) -> str:
    """`c.submit_job`, riding out a head that is still starting; a submission id Ray already has is
    not submitted again (the queue's dispatcher relies on that after a restart)."""
    deadline = time.time() + 60
    while True:
        try:
            return c.submit_job(entrypoint=entry, runtime_env=renv, submission_id=submission_id,
                                entrypoint_num_cpus=entrypoint_num_cpus or None, metadata=metadata or {})
        except Exception as e:
            if submission_id and "already exists" in str(e):
                return submission_id
            # a head that just started has no job agent yet and says "try again later", or (busy
            # machine) its dashboard drops the connection before answering: both pass
            transient = ("No available agent", "RemoteDisconnected", "Connection aborted")
            if any(t in str(e) for t in transient) and time.time() < deadline:
                time.sleep(2)
                continue
            raise JobsError(_explain(e, getattr(c, "_address", "the Ray Jobs API"))) from None


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
                    "message": j.message, "driver_exit_code": getattr(j, "driver_exit_code", None)})
    return sorted(out, key=lambda j: j["start_time"] or 0)


def _queued(job_id: str, address: str | None):
    """The queue's record of `job_id`, when a queue store for this address exists and knows it."""
    from jobs.queue import store as S  # here: the queue package builds on this module

    url = S.resolve_url(None, resolve_address(address))
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None
    try:
        store = S.Store(url)
    except Exception:  # no store reachable: the id can only be Ray's
        return None
    try:
        return store.get(job_id)
    finally:
        store.dispose()


def status(job_id: str, address: str | None = None) -> str:
    """The job's state: the queue's (WAITING, RUNNING, RETRYING, SUCCEEDED, ...) for a queued job, else Ray's."""
    q = _queued(job_id, address)
    if q is not None:
        return "WAITING" if q.state == "ADMITTING" else q.state
    s = _call(address, "get_job_status", job_id)
    return str(s.value if hasattr(s, "value") else s)


def client_logs(submission_id: str, address: str | None = None) -> str:
    """Ray's log of one submission."""
    return _call(address, "get_job_logs", submission_id)


def logs(job_id: str, address: str | None = None) -> str:
    q = _queued(job_id, address)
    if q is not None:
        return client_logs(q.ray_id, address) if q.ray_id else ""
    return client_logs(job_id, address)


def stop(job_id: str, address: str | None = None) -> bool:
    if _queued(job_id, address) is not None:
        from jobs.queue import api

        return not api.stop(job_id, address).startswith("already")
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


# ----------------------------------------------------------------------------- used by the queue


def quiet_ray_logs() -> None:
    """Ray's client logs an INFO line per working-dir upload on its own handlers; commands and the
    dispatcher keep their output to what the user asked for."""
    packaging = "ray._private.runtime_env"  # warns ".git is now ignored" at every upload
    for name in [*logging.root.manager.loggerDict, packaging]:
        if name == "ray" or name.startswith("ray."):
            logging.getLogger(name).setLevel(logging.ERROR if name.startswith(packaging) else logging.WARNING)


def status_name(s: Any) -> str:
    return str(s.value if hasattr(s, "value") else s)


def job_info(c, submission_id: str):
    """Ray's JobDetails for `submission_id`, or None when Ray has no such job."""
    try:
        return c.get_job_info(submission_id)
    except Exception as e:
        if "does not exist" in str(e) or "404" in str(e):
            return None
        raise JobsError(_explain(e, getattr(c, "_address", "the Ray Jobs API"))) from None


def stop_job(c, submission_id: str) -> bool:
    try:
        return bool(c.stop_job(submission_id))
    except Exception as e:
        log.warning("stopping %s: %s", submission_id, str(e).splitlines()[0] if str(e) else e)
        return False


def logs_tail(c, submission_id: str | None, chars: int = 20000) -> str:
    if not submission_id:
        return ""
    try:
        return (c.get_job_logs(submission_id) or "")[-chars:]
    except Exception:
        return ""


def cluster_cpus(address: str | None = None) -> float:
    """CPUs of the cluster's live nodes (Ray's state API, token header as for jobs)."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    tok = auth_token()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {tok}"} if tok else {})}
    addr = resolve_address(address)
    try:
        with _address_wins(address):
            api = StateApiClient(address=addr, headers=headers)
        nodes = api.list(
            StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False)
    except Exception as e:
        raise JobsError(_explain(e, addr)) from None
    return float(sum((n.resources_total or {}).get("CPU", 0.0) for n in nodes if n.state == "ALIVE"))


# a driver ended by a signal: SIGKILL/SIGTERM (node lost, OOM killer, killed by hand); as a
# negative code when Ray's shell itself died, as 128+N when it reported its child's death
_KILLED = {-9: "SIGKILL", -15: "SIGTERM", 137: "SIGKILL", 143: "SIGTERM"}
_SUPERVISOR = {
    "JOB_SUPERVISOR_ACTOR_START_TIMEOUT": "the job did not start in time (no resources for its driver?)",
    "JOB_SUPERVISOR_ACTOR_START_FAILURE": "Ray could not start the job's supervisor",
    "JOB_SUPERVISOR_ACTOR_UNSCHEDULABLE": "Ray could not place the job's supervisor",
    "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE": "the job's supervisor failed",
    "JOB_SUPERVISOR_ACTOR_DIED": "the job's supervisor died (its node was lost?)"}


_NEVER_STARTED = {
    "JOB_SUPERVISOR_ACTOR_START_TIMEOUT": "the job's driver did not start in time",
    "JOB_SUPERVISOR_ACTOR_START_FAILURE": "Ray could not start the job's supervisor",
    "JOB_SUPERVISOR_ACTOR_UNSCHEDULABLE": "Ray could not place the job's supervisor"}


def start_failure(info: Any) -> str | None:
    """Why a job failed before its driver ran any code (sent again without counting a retry); else None."""
    err = status_name(getattr(info, "error_type", None) or "")
    msg = str(getattr(info, "message", "") or "")
    if err == "RUNTIME_ENV_SETUP_FAILURE" and "Failed to download runtime_env file package" in msg:
        return "Ray lost the job's code package before its driver started"
    return _NEVER_STARTED.get(err)


def infrastructure_failure(info: Any) -> str | None:
    """Why a FAILED job failed when it is not the job's own fault (retried with --max-retries); else None."""
    err = status_name(getattr(info, "error_type", None) or "")
    if err in _SUPERVISOR:
        return _SUPERVISOR[err]
    code = getattr(info, "driver_exit_code", None)
    if code in _KILLED:
        return f"the driver was killed ({_KILLED[code]}: node lost, out of memory or stopped by hand)"
    return None


def explain_failure(info: Any, logs: str, python: str = "python") -> str:
    """One line a user acts on for a job that failed on its own: missing modules, no interpreter, the
    entry point's own `error: …` line, else the last exception line of its log."""
    text = logs or str(getattr(info, "message", "") or "")
    missing = re.findall(r"ModuleNotFoundError: No module named '([^'\"]+)'", text)
    if missing:  # the last one: the log also echoes the entrypoint
        return (f"the job's Python ({python}) cannot import '{missing[-1]}': pass `flowers submit --python "
                f"/path/to/the/project/.venv/bin/python` (the environment where flowers is installed on the nodes)")
    no_python = getattr(info, "driver_exit_code", None) in (126, 127)
    if no_python and re.search(r"(not found|No such file or directory)", text):
        return (f"the cluster node has no {python}: pass `flowers submit --python PATH` with the Python of the "
                f"project's environment on the nodes")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return ln.removeprefix("error: ")[:300]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", ln):
            return ln[:300]
    code = getattr(info, "driver_exit_code", None)
    return f"exit code {code}" if code is not None else (lines[-1][:300] if lines else "failed")


def short_label(entry: str) -> str:
    """A readable one-line form of an entrypoint: `study --profile smoke`, not the interpreter's path,
    the tracking URI or a multi-line `python -c` script."""
    try:
        words = shlex.split(entry)
    except ValueError:
        words = entry.split()
    if len(words) >= 3 and words[1] == "-m" and words[2].startswith("jobs."):
        words = [words[2].removeprefix("jobs."), *words[3:]]
    elif len(words) >= 3 and words[1] == "-c":
        first = next((ln.strip() for ln in words[2].splitlines() if ln.strip()), "")
        words = ["python -c", repr(first[:40] + ("…" if len(first) > 40 else ""))]
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
            continue
        if w in ("--tracking-uri", "--address"):
            skip = True
            continue
        if w.startswith(("--tracking-uri=", "--address=")):
            continue
        out.append(Path(w).name if "/" in w and not w.startswith(("s3://", "models:/", "runs:/", "http")) else w)
    text = " ".join(out).replace("\n", " ")
    return text if len(text) <= 60 else text[:59] + "…"


def tail_logs(submission_id: str, address: str | None = None):
    """The job's log as it grows (Ray's `tail_job_logs`), chunk by chunk, until the job ends."""
    agen = client(address).tail_job_logs(submission_id)  # an async generator: driven here, one chunk at a time
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
            except Exception as e:
                raise JobsError(_explain(e, resolve_address(address))) from None
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()


PROBE_MODULES = ("ray", "torch", "mlflow", "torchvision", "pyarrow")
# found, not imported (seconds on a busy node): the project from the working dir, its dependencies
# from the interpreter's environment; a miss reads as Python's own "No module named" line
_PROBE_CODE = ("import importlib.util as u, sys; import flowers, jobs; "
               "m = [n for n in %r if u.find_spec(n) is None]; "
               "m and sys.exit('ModuleNotFoundError: No module named ' + repr(m[0]))" % (PROBE_MODULES,))


def probe_environment(c, python: str, renv: dict[str, Any], timeout_s: float = 180) -> str | None:
    """Run a tiny job with the job's interpreter and runtime env that finds the project and its
    dependencies; None when it works, else one line saying what the cluster lacks."""
    entry = f"{shlex.quote(python)} -c {shlex.quote(_PROBE_CODE)}"
    sid = submit_entrypoint(c, entry, renv, None, None, {"flowers.probe": "1"})
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        info = job_info(c, sid)
        st = status_name(info.status) if info else "PENDING"
        if st == "SUCCEEDED":
            return None
        if st in ("FAILED", "STOPPED"):
            return explain_failure(info, logs_tail(c, sid), python)
        time.sleep(0.5)
    stop_job(c, sid)
    return f"the cluster did not run a 1-second check job within {timeout_s:.0f}s (no node can start a driver?)"
