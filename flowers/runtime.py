"""Process-level settings: memory allocator, torch threads, progress bars.

glibc's malloc returns large freed blocks to the kernel on every batch, which
costs a large share of a CPU ResNet step (README: performance table); tcmalloc (or glibc with high mmap/trim
thresholds) keeps them. Allocator variables only take effect at process start,
so they are passed to new processes (Ray runtime_env, re-exec of the CLI).
"""
from __future__ import annotations

import glob
import logging
import os
import sys
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

GLIBC_TUNING = {
    "MALLOC_MMAP_THRESHOLD_": "1000000000000",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
}
_TCMALLOC_GLOBS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4*",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4*",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4*",
    "/usr/lib64/libtcmalloc_minimal.so.4*",
)


def find_tcmalloc() -> str | None:
    for pattern in _TCMALLOC_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def allocator_env() -> dict[str, str]:
    """Environment for a fast allocator: tcmalloc if installed, else tuned glibc.

    Set FLOWERS_ALLOCATOR=glibc|tcmalloc|system to choose; `system` adds nothing.
    """
    choice = os.environ.get("FLOWERS_ALLOCATOR", "auto")
    if choice == "system":
        return {}
    env = dict(GLIBC_TUNING)
    lib = find_tcmalloc() if choice in ("auto", "tcmalloc") else None
    if lib:
        preload = os.environ.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{lib}:{preload}" if preload and lib not in preload else (preload or lib)
    return env


def allocator_active() -> bool:
    """Whether this process started with the allocator settings."""
    want = allocator_env()
    return all(os.environ.get(k) == v for k, v in want.items())


def cpu_share() -> int:
    """CPUs this process should use: OMP_NUM_THREADS (Ray sets it per worker), else the affinity mask."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def configure_torch_threads(threads: int | None = None) -> int:
    """Set torch intra-op threads to this worker's share (oversubscription slows every trial)."""
    n = threads or cpu_share()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def worker_runtime_env(extra: dict[str, str] | None = None) -> dict:
    """Ray runtime_env fragment giving workers the allocator settings."""
    env = allocator_env()
    env.update(extra or {})
    return {"env_vars": env}


def progress_bar(it: Iterable, progress: bool = True, **kw: Any) -> tqdm:
    """tqdm that redraws on a terminal and prints rarely in logs (Ray workers, CI)."""
    interactive = sys.stderr.isatty()
    return tqdm(it, disable=not progress, mininterval=0.5 if interactive else 30, dynamic_ncols=True, leave=False, **kw)
