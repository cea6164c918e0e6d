"""Where rows go: one Parquet file written atomically, or a dataset folder of parts committed by a manifest."""
from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from flowers import storage
from flowers.data import DataError
from flowers.scoring.schema import (MANIFEST, MANIFEST_FORMAT, MISSING, PART_RE, SCHEMA, SCHEMA_VERSION, SUMMARY,
                                    count_true, error_rows)
from flowers.scoring.plan import DatasetOutput, PartInfo, ScorePlan, output_state, resolve_output
from flowers.scoring.summary import ScoreSummary, model_fields

log = logging.getLogger(__name__)


class OutputWriter:
    """Stream tables into `.<out>.tmp-<pid>`; `commit()` renames it over `out` in one step."""

    def __init__(self, out: Path, metadata: dict[bytes, bytes]) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
        self.out = out
        self.tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        self.schema = SCHEMA.with_metadata(metadata)
        self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table.cast(self.schema))
            self.rows += table.num_rows

    def commit(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.out)  # atomic on one filesystem: the old output or the new, never half

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _remove_stale_temps(out: Path) -> None:
    """Temp files of writers that were killed (SIGKILL leaves no chance to clean up)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            tmp.unlink(missing_ok=True)


class Progress:
    """tqdm bar on a terminal, a log line every ~10 s otherwise (jobs, CI logs)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.errors = total, 0, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="scoring", dynamic_ncols=True)
        self.enabled = enabled

    def update(self, n: int, errors: int) -> None:
        self.done += n
        self.errors += errors
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(errors=self.errors)
        elif self.enabled and time.perf_counter() - self.last > 10:
            self.last = time.perf_counter()
            rate = self.done / max(self.last - self.t0, 1e-9)
            log.info("scored %d/%d images (%d errors), %.1f img/s", self.done, self.total, self.errors, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _count(table: pa.Table) -> tuple[int, int]:
    """(error rows, uncertain rows) of a result table."""
    return table.num_rows - table.column("error").null_count, count_true(table.column("uncertain"))


def write_scores(plan: ScorePlan, batches: Iterable[pa.Table], progress: bool = True) -> ScoreSummary:
    """Stream result tables (after the rows `--resume` keeps) into the file `plan.out`, atomically.

    An input the pipeline gave no row gets an error row (a safety net: the reader makes one per
    input, an error row when it cannot read it). `batches`
    is consumed lazily, so the wall time includes producing them; `extra` says how long the first
    batch took (worker start-up and model load) and how many rows it had.
    """
    out = Path(plan.out)
    writer = OutputWriter(out, plan.metadata())
    bar = Progress(len(plan.todo), progress)
    scored = errors = uncertain = first_rows = 0
    first_s = None
    seen: set[str] = set()
    t0 = time.perf_counter()
    try:
        if plan.keep is not None:
            writer.write(plan.keep)
        for table in batches:
            e, u = _count(table)
            if first_s is None:
                first_s, first_rows = time.perf_counter() - t0, table.num_rows
            writer.write(table)
            seen.update(table.column("path").to_pylist())
            scored += table.num_rows
            errors += e
            uncertain += u
            bar.update(table.num_rows, e)
        missing = [p for p in plan.todo if p not in seen]
        if missing:
            writer.write(error_rows(missing, MISSING, plan.model_name, plan.model_version))
            scored += len(missing)
            errors += len(missing)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return ScoreSummary(plan.out, plan.listed, scored, errors, plan.skipped, writer.rows, time.perf_counter() - t0,
                        extra={"first_batch_s": first_s, "first_batch_rows": first_rows},
                        uncertain=uncertain, output_uncertain=plan.kept_uncertain + uncertain, **model_fields(plan))


# ----------------------------------------------------------------------------- dataset folder output


def prepare_dataset(plan: ScorePlan) -> DatasetOutput:
    """Make the folder ready for this run's parts; called once every check passed.

    `--overwrite` removes the old output. `--resume` un-commits first (the manifest goes, so a
    crash from here on never leaves a manifest that disagrees with the parts), removes partial
    parts, and drops error rows from complete ones (those inputs are scored again).
    """
    out = DatasetOutput(plan.out)
    if plan.replace:
        if output_state(plan.out) == "file":
            out.fs.delete_file(out.path)
        else:
            for name in out.names():
                if PART_RE.match(name) or name in (MANIFEST, SUMMARY) or _temp(name):
                    out.delete(name)
    if not storage.is_remote(plan.out):
        out.makedirs()
    if plan.committed:
        out.delete(MANIFEST)
    for name in plan.broken:
        log.warning("removing %s/%s: a partial part from an interrupted run (its images are scored again)",
                    plan.out, name)
        out.delete(name)
    for name in out.names():  # temp files of a killed writer
        if _temp(name):
            out.delete(name)
    for part in plan.parts:
        if part.errors:
            t = out.read(part.name)
            good = t.filter(t.column("error").is_null())
            if good.num_rows:
                out.write_table(part.name, good)
            else:
                out.delete(part.name)
            part.rows, part.errors = good.num_rows, 0
    plan.parts = [p for p in plan.parts if p.rows]
    return out


def _temp(name: str) -> bool:
    """Our temp files (`flowers.storage.write_bytes`) and storage probes, never anything else hidden."""
    return "/" not in name and (name.endswith(".tmp") or name.startswith(".flowers-probe-")) and name.startswith(".")


def commit_dataset(plan: ScorePlan, out: DatasetOutput, wall_s: float) -> ScoreSummary:
    """After the workers wrote their parts: check every input is in exactly one row, add error rows
    for inputs the readers never produced, then write `_manifest.json`, the commit marker, last."""
    kept = {p.name for p in plan.parts}
    seen: set[str] = set()
    parts: list[PartInfo] = []
    scored = errors = uncertain = 0
    names = out.parts()
    # kept parts first: a duplicate (which Ray's retries should never produce) is dropped from the newer part
    for name in sorted(names, key=lambda n: (n not in kept, n)):
        if out.part_rows(name) is None:
            raise DataError(f"part {out.uri}/{name} is unreadable after the run; nothing was committed. "
                            "Run again with --resume")
        t = out.read(name, ["path", "error", "uncertain"])
        paths = t.column("path").to_pylist()
        dup = [p in seen for p in paths]
        if any(dup):
            log.warning("%s/%s repeats %d rows of other parts; rewriting it without them", out.uri, name, sum(dup))
            full = out.read(name)
            mask = pa.array([not d for d in dup], pa.bool_())
            t, full = t.filter(mask), full.filter(mask)
            if full.num_rows:
                out.write_table(name, full)
            else:
                out.delete(name)
                continue
            paths = t.column("path").to_pylist()
        seen.update(paths)
        e, u = _count(t)
        parts.append(PartInfo(name, t.num_rows, e, u))
        if name not in kept:
            scored, errors, uncertain = scored + t.num_rows, errors + e, uncertain + u
    missing = [p for p in plan.todo if p not in seen]
    if missing:
        name = f"part-{uuid.uuid4().hex}-missing.parquet"
        out.write_table(name, error_rows(missing, MISSING, plan.model_name, plan.model_version, plan.metadata()))
        parts.append(PartInfo(name, len(missing), len(missing)))
        scored, errors = scored + len(missing), errors + len(missing)
    rows = sum(p.rows for p in parts)
    manifest = {"format": MANIFEST_FORMAT, "schema_version": SCHEMA_VERSION, "rows": rows,
                "errors": sum(p.errors for p in parts), "uncertain": sum(p.uncertain for p in parts),
                "model_uri": plan.model_uri, "model_name": plan.model_name, "model_version": plan.model_version,
                "top_k": plan.top_k, "inputs": plan.sources,
                "parts": [{"name": p.name, "rows": p.rows} for p in sorted(parts, key=lambda p: p.name)],
                "committed_at": datetime.now(timezone.utc).isoformat()}
    out.write_json(MANIFEST, manifest)
    return ScoreSummary(plan.out, plan.listed, scored, errors, plan.skipped, rows, wall_s, uncertain=uncertain,
                        output_uncertain=manifest["uncertain"], layout="dataset", **model_fields(plan))


def read_dataset(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A committed dataset output as one table (the parts its manifest lists); DataError if uncommitted."""
    out = DatasetOutput(resolve_output(uri))
    manifest = out.read_manifest()
    if not manifest:
        raise DataError(f"{uri} holds no committed scoring output (no {MANIFEST}); finish it with --resume")
    tables = [out.read(p["name"], columns) for p in manifest["parts"]]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()
