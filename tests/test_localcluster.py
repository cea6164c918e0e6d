"""jobs/localcluster/ without a cluster: refusals with one-line errors, and the session-wide stop."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import localcluster as T
from jobs.localcluster import cluster as C
from jobs.localcluster import postgres


def test_missing_postgres_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(postgres, "PG_BIN", tmp_path / "no-postgres")
    assert T.unavailable_reason() == f"no PostgreSQL 15 at {tmp_path / 'no-postgres'}: apt-get install postgresql-15"
    with pytest.raises(T.ClusterError, match="apt-get install postgresql-15"):
        T.up(tmp_path / "st", masks=[])


def test_state_dir_checks(monkeypatch, tmp_path):
    monkeypatch.setattr(C, "unavailable_reason", lambda masks=True: None)
    with pytest.raises(T.ClusterError, match="no test cluster at .*flowers cluster up --state"):
        T.LocalCluster.load(tmp_path / "none")
    with pytest.raises(T.ClusterError, match="too long for Ray's unix socket paths"):
        T.up(tmp_path / ("x" * 60), masks=[])
    busy = Path("/tmp") / f"flc-unit-{os.getpid()}"
    busy.mkdir(exist_ok=True)
    try:
        (busy / "something").write_text("not ours")
        with pytest.raises(T.ClusterError, match="not empty and holds no cluster"):
            T.up(busy, masks=[])
    finally:
        (busy / "something").unlink()
        busy.rmdir()


def test_masks_that_would_hide_what_nodes_need_are_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(C, "unavailable_reason", lambda masks=True: None)
    state = Path("/tmp") / f"flc-unit-{os.getpid()}"
    with pytest.raises(T.ClusterError, match="cannot mask /tmp on workers"):
        T.up(state, masks=["/tmp"], workdir=tmp_path)
    with pytest.raises(T.ClusterError, match="cannot mask .* the nodes need"):
        T.up(state, masks=[sys.prefix], workdir=tmp_path)
    assert not state.exists()


def test_default_masks_cover_driver_state_data_and_mlflow(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWERS_DATA", str(tmp_path / "data"))
    work = tmp_path / "repo"
    masks = T.default_masks(work)
    for want in (work / ".flowers", work / "runs", work / "mlruns", tmp_path / "data", tmp_path / "shared" / "flowers102"):
        assert want.resolve() in masks


def test_end_sessions_stops_a_whole_session(tmp_path):
    """A child that ignores SIGTERM and a grandchild both go: the stop covers the session, not one pid."""
    script = ("import subprocess, signal, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              "print('ready', flush=True); time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert p.stdout.readline().strip() == "ready"
    start = T.session_members(p.pid)
    assert len(start) == 2
    rec = {"pid": p.pid, "start": int(Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])}
    assert T.alive(rec)
    t0 = time.monotonic()
    assert T.end_sessions([rec], grace=0.5) == []
    assert time.monotonic() - t0 < 6
    p.wait(5)
    assert not T.alive(rec) and T.session_members(p.pid) == []
