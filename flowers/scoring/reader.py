"""Batch scoring's reader and part names, on their own so that Ray Data read and write tasks stay
light: unpickling one imports this module (pyarrow and `flowers.storage`), not torch or MLflow, so a
task worker holds about 100 MB and starts in a fraction of a second instead of the ~1 GB and ~5 s
that importing the rest of `flowers.scoring` or `jobs.score` costs (Ray starts a fresh worker for many of
these tasks when a node's CPUs are held by the scoring actors)."""
from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa

from flowers import storage


def read_objects(fs: Any, uris: Sequence[str], threads: int = 8) -> pa.Table:
    """`{path, bytes, read_error}`, one row per input, read through one pyarrow filesystem (a Ray
    Data read task runs this on a worker). An object that cannot be read gets `read_error` instead
    of failing the task, and with it the job. Object stores are read by a few threads at a time
    (latency bound); local files in order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(uri: str) -> tuple[bytes | None, str | None]:
        try:
            with fs.open_input_stream(uri.split("://", 1)[1] if storage.is_remote(uri) else uri) as f:
                return f.read(), None
        except Exception as e:
            return None, f"cannot read {uri}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"

    if threads > 1 and len(uris) > 1 and storage.is_remote(uris[0]):
        with ThreadPoolExecutor(min(threads, len(uris))) as pool:
            got = list(pool.map(one, uris))
    else:
        got = [one(u) for u in uris]
    return pa.table({"path": pa.array(list(uris), pa.string()), "bytes": pa.array([g[0] for g in got], pa.binary()),
                     "read_error": pa.array([g[1] for g in got], pa.string())})


def part_name(write_id: str, task_index: int) -> str:
    """Stem of the parts one write task makes (the writer appends `-<i>.parquet`); the same on a retry,
    so a retried task replaces its own part instead of adding a second copy."""
    return f"part-{write_id}-{task_index:06d}"
