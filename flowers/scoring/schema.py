"""Batch scoring's output schema, its Parquet metadata and the error rows every unscorable input gets."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Sequence

import pyarrow as pa


SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("label", pa.int32()),
    pa.field("name", pa.string()),
    pa.field("confidence", pa.float32()),
    pa.field("top_k_labels", pa.list_(pa.int32())),
    pa.field("top_k_probs", pa.list_(pa.float32())),
    pa.field("entropy", pa.float32()),
    pa.field("uncertain", pa.bool_()),
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("error", pa.string()),
    pa.field("scored_at", pa.timestamp("us", tz="UTC")),
])
"""One row per input. `error` is null when the image scored; otherwise only path,
model_name, model_version, error and scored_at are set."""
SCHEMA_VERSION = 1

META_MODEL_URI = b"flowers.model_uri"
META_TOP_K = b"flowers.top_k"

MANIFEST = "_manifest.json"  # a dataset folder's commit marker, written last
MANIFEST_FORMAT = "flowers.scores/1"
SUMMARY = "_summary.json"  # a dataset folder's run summary (a file output: <stem>.summary.json beside it)
PART_RE = re.compile(r"^part-[A-Za-z0-9_.-]+\.parquet$")
LISTING_PARQUET = (".parquet", ".pq")
LISTING_TEXT = (".txt", ".lst", ".list", ".csv", ".tsv")
EXPERIMENT = "flowers-scoring"


def metadata(model_uri: str, top_k: int) -> dict[bytes, bytes]:
    """Parquet schema metadata of every output file and part: the pinned model URI and k."""
    return {META_MODEL_URI: model_uri.encode(), META_TOP_K: str(top_k).encode()}


def error_rows(paths: Sequence[str], error: str, model_name: str, model_version: str | None,
               meta: dict[bytes, bytes] | None = None) -> pa.Table:
    """Error rows for inputs given no row by the pipeline (`error` is formatted with `{path}`)."""
    n = len(paths)
    cols: dict[str, list] = {f.name: [None] * n for f in SCHEMA}
    now = datetime.now(timezone.utc)
    cols.update(path=list(paths), model_name=[model_name] * n, model_version=[model_version] * n,
                error=[error.format(path=p) for p in paths], scored_at=[now] * n)
    return pa.Table.from_pydict(cols, schema=SCHEMA.with_metadata(meta or {}))


# the reader gives every input a row; this is the safety net that keeps "every input exactly once" true
MISSING = "not scored: {path} got no row from the pipeline"


def count_true(col: pa.ChunkedArray | pa.Array) -> int:
    """How many values of a boolean column are true (nulls count as false)."""
    import pyarrow.compute as pc

    return int(pc.sum(pc.cast(col, pa.int64())).as_py() or 0)
