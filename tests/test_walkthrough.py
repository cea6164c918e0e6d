"""The cluster walkthrough of docs/cluster.md, as a newcomer runs it: from a plain shell (`env -i
PATH=/usr/bin:/bin`, no virtualenv on PATH, nothing activated), the `flowers` command called by its
full path. cluster up → data publish → submit study → jobs list/status/logs → models list →
cluster down; the job must SUCCEED. A job whose Python lacks the project is refused before it
starts (one line, exit 2), and one sent anyway fails with one line saying what to do.

Its own cluster (the walkthrough starts and stops one); it runs before the shared `test_cluster`
starts (tests/cluster_fixture.py orders those last), so the two never run at once.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

FLOWERS = Path(sys.executable).with_name("flowers")  # e.g. /work/main/.venv/bin/flowers


def _plain(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """What `env -i PATH=/usr/bin:/bin` leaves, plus HOME (a login shell has one) and what `eval
    "$(flowers cluster env)"` exports."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), **(extra or {})}


def sh(env: dict[str, str], *args: str, timeout: float = 900, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["env", "-i", *[f"{k}={v}" for k, v in env.items()], str(FLOWERS), *args],
                       capture_output=True, text=True, cwd=REPO, timeout=timeout)
    if ok:
        assert r.returncode == 0, f"flowers {' '.join(args)}: rc {r.returncode}\n{(r.stdout + r.stderr)[-4000:]}"
    return r


def _documented(study_args: list[str]) -> bool:
    """docs/cluster.md shows these submit arguments (so the test runs what a reader types)."""
    text = (REPO / "docs" / "cluster.md").read_text().replace("\\\n", " ")
    text = " ".join(text.split())
    shown = " ".join(a if " " not in a else f'"{a}"' for a in study_args)
    return shown in text


@pytest.fixture
def walk_dirs():
    from jobs import localcluster as T

    reason = T.unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"test cluster unavailable in CI: {reason}")
        pytest.skip(reason)
    if not FLOWERS.is_file():
        pytest.skip(f"no `flowers` script next to {sys.executable} (install the project: pip install -e .)")
    tmp = Path(tempfile.mkdtemp(prefix="flw-", dir="/tmp"))  # short: Ray's socket paths
    tmp.chmod(0o755)  # PostgreSQL runs as `postgres` and must reach its data dir inside
    try:
        yield tmp
    finally:
        if (tmp / "st" / T.STATE_FILE).is_file():
            T.LocalCluster.load(tmp / "st").down()
        shutil.rmtree(tmp, ignore_errors=True)


def test_cluster_walkthrough_from_a_plain_shell(walk_dirs):
    home = walk_dirs / "home"
    home.mkdir()
    state = walk_dirs / "st"
    base = _plain(home)
    assert "venv" not in base["PATH"] and "VIRTUAL_ENV" not in base

    sh(base, "cluster", "up", "--state", str(state), timeout=600)
    exports = sh(base, "cluster", "env", "--state", str(state)).stdout
    import shlex
    env = _plain(home, {k: shlex.split(v)[0] for k, v in (ln.removeprefix("export ").split("=", 1)
                                                            for ln in exports.splitlines())})

    # the commands of docs/cluster.md, "The walkthrough, from a plain shell"
    synth = walk_dirs / "flowers-synth"
    sh(env, "data", "synth", str(synth), "--classes", "3", "--per-class", "10", "--size", "64")
    sh(env, "data", "publish", str(synth), "s3://flowers/datasets/synth")
    study = ["--profile", "smoke", "--set", "data.root=s3://flowers/datasets/synth", "--set", "data.split=official",
             "--set", "study.storage_path=s3://flowers/tune/smoke", "--set", "study.stages=[tune]",
             "--set", "study.ablation=null", "--set", "study.levels={l1: level1.yaml}"]
    assert _documented(study)
    out = sh(env, "submit", "study", "--", *study).stdout
    job = out.split()[1].rstrip(":")

    listed = sh(env, "jobs", "list").stdout.splitlines()
    mine = [ln for ln in listed if ln.startswith(job)]
    assert len(mine) == 1 and "study --profile smoke" in mine[0], listed
    # the log as it grows, until the job ends (Ray's tail_job_logs)
    follow = sh(env, "jobs", "logs", job, "--follow", timeout=1200).stdout
    assert "study 'flowers-study' done" in follow, follow[-3000:]
    status = json.loads(sh(env, "jobs", "status", job, "--json").stdout)
    assert status["state"] == "SUCCEEDED", status
    rows = json.loads(sh(env, "jobs", "list", "--json").stdout)
    assert [r["state"] for r in rows if r["id"] == job] == ["SUCCEEDED"]
    assert "study 'flowers-study' done" in sh(env, "jobs", "logs", job).stdout
    models = sh(env, "models", "list").stdout
    assert "flowers-l1" in models, models

    # the project missing from the job's Python: refused before anything starts, in one line
    r = sh(env, "submit", "study", "--python", "/usr/bin/python3", "--", *study, ok=False)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "cannot import" in err[0] and "--python" in err[0], r.stderr
    # ... and sent anyway (--no-check), it fails with one line in `jobs status` and `jobs list`
    out = sh(env, "submit", "study", "--python", "/usr/bin/python3", "--no-check", "--", *study).stdout
    bad = out.split()[1].rstrip(":")
    sh(env, "jobs", "logs", bad, "--follow", timeout=600)
    line = sh(env, "jobs", "status", bad).stdout.strip()
    assert line.startswith("FAILED: ") and "cannot import" in line and len(line.splitlines()) == 1, line
    assert any(ln.startswith(bad) and "cannot import" in ln for ln in sh(env, "jobs", "list").stdout.splitlines())

    sh(base, "cluster", "down", "--state", str(state), timeout=300)
    assert not state.exists()
