"""Processes of the local cluster: each in a session of its own, checked through /proc, ended whole.

Also the small waits and probes every service's start-up uses, and the free ports they listen on.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable

from raylink.ports import pick_port


class ClusterError(RuntimeError):
    """The test cluster cannot start, stop or be found; the message says what to do."""


def sbin(tool: str) -> str:
    """An administration tool by full path: a plain user's PATH (/usr/bin:/bin) lacks the sbin folders."""
    return shutil.which(tool, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") or tool


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start time in ticks) of `pid` from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, session 6, start 22
    return fields[0], int(fields[3]), int(fields[19])


def reap(pid: int) -> None:
    """Collect `pid` if it is our exited child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def alive(proc: dict | None) -> bool:
    """The recorded process runs: same pid and start time (not a reused pid), not a zombie."""
    if not proc or not proc.get("pid"):
        return False
    reap(proc["pid"])
    st = proc_stat(proc["pid"])
    return st is not None and st[0] != "Z" and st[2] == proc.get("start")


def session_members(sid: int) -> list[int]:
    """Every live process of session `sid` (a node's raylet, workers and agents stay in its session)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st and st[1] == sid and st[0] != "Z":
                out.append(int(d))
    return out


def signal_session(sid: int, sig: int) -> None:
    """Send `sig` to every live process of session `sid`."""
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
        signal_session(sid, signal.SIGTERM)
    wait_gone(sids, grace)
    for sid in sids:
        signal_session(sid, signal.SIGKILL)
    wait_gone(sids, 5.0)
    return [pid for sid in sids for pid in session_members(sid)]


def wait_gone(sids: list[int], timeout: float) -> None:
    """Wait up to `timeout` s for these sessions to have no live process left."""
    deadline = time.monotonic() + timeout
    while any(session_members(s) for s in sids) and time.monotonic() < deadline:
        for sid in sids:
            reap(sid)
        time.sleep(0.1)
    for sid in sids:
        reap(sid)


def launch(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> dict:
    """Start `cmd` in a session of its own, output to `log_path`; the record `alive` checks."""
    with open(log_path, "ab") as out:
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
    st = proc_stat(p.pid)
    return {"pid": p.pid, "start": st[2] if st else 0, "log": str(log_path)}


def log_tail(path: str | Path, pattern: str = "") -> str:
    """The last non-empty log line (containing `pattern` when one does), for one-line errors."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"no log at {path}"
    hits = [ln for ln in lines if pattern and pattern in ln] or lines
    return (hits[-1][:300] if hits else "empty log") + f" (log: {path})"


def wait_until(what: str, ready: Callable[[], bool], timeout: float, proc: dict | None = None) -> None:
    """Poll `ready` until it holds; a one-line ClusterError when `proc` exits or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and not alive(proc):
            raise ClusterError(f"{what} exited while starting: {log_tail(proc['log'], 'rror')}")
        if time.monotonic() > deadline:
            where = log_tail(proc["log"]) if proc else ""
            raise ClusterError(f"{what} not ready after {timeout:.0f}s {where}".strip())
        time.sleep(0.2)


def http_ok(url: str) -> bool:
    """Whether `url` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def log_says(path: str, text: str) -> bool:
    """Whether the log at `path` contains `text` yet."""
    try:
        return text in Path(path).read_text(errors="replace")
    except OSError:
        return False


def run_checked(cmd: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                log_path: Path | None = None) -> None:
    """Run a set-up command to its end; a one-line ClusterError (its log's last line) when it fails."""
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        detail = log_tail(log_path) if log_path else ((out.stderr or out.stdout).strip().splitlines() or ["?"])[-1]
        raise ClusterError(f"{what} failed: {detail}")


def pick_ports(n: int) -> list[int]:
    """`n` distinct free ports below the ephemeral range (Ray's own servers bind ephemeral ports)."""
    ports: list[int] = []
    while len(ports) < n:
        p = pick_port()
        if p not in ports:
            ports.append(p)
    return ports
