"""The local multi-node test cluster (jobs/localcluster/) as one session fixture, and the `cluster` marker.

Loaded from tests/conftest.py as a plugin. `test_cluster` starts PostgreSQL, S3 (moto), an MLflow
server and a Ray head + 2 worker nodes (1 CPU each, driver folders masked) once per test run,
and stops them after the last test that uses it. Tests that use it run last, so the cluster's
own processes never compete with the rest of the suite for the CPUs.

It skips only where the machine cannot run it (no root/unshare, no PostgreSQL 15 binaries);
under CI (`CI` set) it fails instead, since `.ci/run` installs what it needs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = "test_cluster"


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "cluster: runs on the local multi-node test cluster (`test_cluster` fixture)")


def pytest_collection_modifyitems(session, config, items) -> None:
    """Cluster tests last, in their own order: the cluster starts once and stops at the end of the run."""
    on_cluster = [i for i in items if FIXTURE in getattr(i, "fixturenames", ())]
    if on_cluster:
        rest = [i for i in items if FIXTURE not in getattr(i, "fixturenames", ())]
        items[:] = rest + on_cluster


@pytest.fixture(scope="session")
def test_cluster():
    """The running `jobs.localcluster.LocalCluster`: `.env()`, `.run_python(code)`, `.kill_worker(name)`, ..."""
    from jobs import localcluster as T

    reason = T.unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"test cluster unavailable in CI: {reason}")
        pytest.skip(reason)
    # short: Ray's unix socket paths under each node's temp dir must stay below 108 bytes
    state = Path(tempfile.mkdtemp(prefix="flc-", dir="/tmp"))
    # if this pytest dies without teardown (timeout, SIGKILL), the reaper stops the cluster
    reaper = subprocess.Popen([sys.executable, "-m", "jobs.localcluster", "reap", str(os.getpid()), str(state)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, cwd=REPO)
    try:
        cluster = T.up(state, workers=2, cpus_per_worker=1, workdir=REPO)
        yield cluster
        cluster.down()
    finally:
        reaper.send_signal(signal.SIGTERM)
        reaper.wait(10)
        if (state / T.STATE_FILE).is_file():  # up failed half-way or down raised: leave nothing running
            T.LocalCluster.load(state).down()


@pytest.fixture(scope="module")
def cluster_env(test_cluster):
    """The cluster's client env in os.environ for one test module (Ray token, MLflow, S3, the queue store)."""
    env = test_cluster.env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
