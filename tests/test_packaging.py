"""The package as a user gets it: version, JSON output for scripts, and a wheel that installs and runs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def flowers(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowers.cli.main", *args], capture_output=True, text=True, cwd=REPO,
                          env=env)


def test_version_names_the_package_and_the_commit():
    r = flowers("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("flowers 0.")
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        assert f"git {head}" in r.stdout


def test_data_verify_json_counts_and_json_errors(tmp_path):
    assert flowers("data", "synth", str(tmp_path / "s"), "--classes", "3", "--per-class", "6").returncode == 0
    r = flowers("data", "verify", "--root", str(tmp_path / "s"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["images"] == 18 and out["classes"] == 3
    assert sum(out["split_sizes"].values()) == 18
    assert [sum(col) for col in zip(*out["per_class"].values())] == [6, 6, 6]
    r = flowers("data", "verify", "--root", str(tmp_path / "missing"), "--json")
    assert r.returncode == 2
    assert "not found" in json.loads(r.stdout)["error"] and "Traceback" not in r.stderr


def _tracked_package_data() -> list[str]:
    """Every non-Python file git tracks inside the packages: what a wheel must carry."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "flowers", "serve", "jobs"], capture_output=True,
                         text=True, check=True).stdout.split()
    return [p for p in out if not p.endswith(".py")]


@pytest.mark.slow
def test_wheel_installs_and_runs(tmp_path):
    """Build the wheel, install it (no deps) into a fresh venv that borrows this venv's dependencies,
    and run the CLI from it: package data and the entry point are proven, not the checkout."""
    if not (REPO / ".git").exists():
        pytest.skip("needs the git checkout to list package data")
    # build from a copy of the tree (tracked and new files, as git sees them): an in-place build would leave
    # build/ and *.egg-info in the checkout
    src = tmp_path / "src"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(dist), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = dist.glob("flowers-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [p for p in _tracked_package_data() if p not in names]
    assert not missing, f"package data missing from the wheel: {missing}"
    assert any(n.endswith("entry_points.txt") for n in names) and any(n.endswith("licenses/LICENSE") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # a plain path line: the dependencies become importable, but this venv's editable-install hook is not run
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q",
                        "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    exe = str(venv / "bin/flowers")
    r = subprocess.run([str(venv / "bin/python"), "-c", "import flowers, serve, jobs; print(flowers.__file__)"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(str(venv)), (r.stdout, r.stderr[-1500:])
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and "L5" in r.stdout, r.stderr[-1500:]
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("flowers 0.") and "git" not in r.stdout
    r = subprocess.run([exe, "data", "synth", str(tmp_path / "s"), "--classes", "2", "--per-class", "4"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    r = subprocess.run([exe, "data", "verify", "--root", str(tmp_path / "s"), "--json"], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["images"] == 8, r.stderr[-1500:]
