"""Batch scoring, the Ray-free half: image folders → one Parquet file, through the shared Predictor.

- `SCHEMA`: the output columns (see docs/scoring.md);
- `Scorer`: the callable class that `jobs/score.py` runs in a Ray Data actor pool; it loads
  the model once and turns a batch of `{path[, bytes]}` rows into output rows, one per
  input row, with `error` set (and nulls elsewhere) for a file that cannot be read or decoded;
- `plan_scoring`: the driver-side checks (settings, images found, output/resume/overwrite
  rules, the model's metadata) that run before any Ray process starts, so bad input fails fast;
- `write_scores`: streams result batches into a temp file next to the output and renames
  it into place only when every row is written (atomic: readers never see half a file).
"""
from __future__ import annotations

import io
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from flowers import registry
from flowers.config import ConfigError, ScoreConfig
from flowers.data import IMAGE_EXTENSIONS, DataError, list_images

log = logging.getLogger(__name__)

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
"""One row per image file. `error` is null when the image scored; otherwise only path,
model_name, model_version, error and scored_at are set."""

META_MODEL_URI = b"flowers.model_uri"
META_TOP_K = b"flowers.top_k"


# ----------------------------------------------------------------------------- scorer (runs in Ray actors)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _image_size(data: bytes) -> tuple[int, int]:
    """Stored width/height from the header (cheap: PIL does not decode pixels for this)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.size


class Scorer:
    """Loads the Predictor once; `__call__` scores a batch of `{path[, bytes]}` rows.

    Rows without `bytes` are read from `path` here, inside the actor, so a file that
    vanished or is unreadable becomes an error row instead of failing a read task.
    """

    def __init__(self, model_uri: str, top_k: int = 5, threads: int | None = None, device: str = "cpu") -> None:
        from flowers.predict import Predictor
        from flowers.runtime import configure_torch_threads

        # Ray sets OMP_NUM_THREADS to the actor's num_cpus; torch follows it unless told otherwise
        self.threads = configure_torch_threads(threads)
        self.predictor = Predictor.from_uri(model_uri, device)
        self.top_k = int(top_k)
        self.model_name = self.predictor.model.name
        self.model_version = self.predictor.model.version

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        import torch

        from flowers.data import ImageDecodeError

        paths = [str(p) for p in batch["path"]]
        blobs = batch.get("bytes")
        n = len(paths)
        cols: dict[str, list] = {f.name: [None] * n for f in SCHEMA}
        cols["path"] = paths
        tensors, ok = [], []
        for i, path in enumerate(paths):
            data = None
            try:
                data = blobs[i] if blobs is not None and blobs[i] is not None else _read_bytes(path)
                tensors.append(self.predictor.load_image(bytes(data)))
                cols["width"][i], cols["height"][i] = _image_size(data)
                ok.append(i)
            except ImageDecodeError as e:
                # open_image names bytes input "<N bytes>"; the path is what the user can act on
                cols["error"][i] = str(e).replace(f"<{len(data)} bytes>", path) if data is not None else str(e)
            except OSError as e:  # unreadable file: permission, vanished, a folder, I/O error
                cols["error"][i] = f"cannot read {path}: {e.strerror or e}"
            except Exception as e:  # a decoder bug on one odd file must not fail the whole job
                cols["error"][i] = f"cannot decode {path}: {type(e).__name__}: {e}"
        if tensors:
            probs = self.predictor.predict_proba(torch.stack(tensors))
            for i, r in zip(ok, self.predictor.format(probs, self.top_k)):
                cols["label"][i] = r["label"]
                cols["name"][i] = r["name"]
                cols["confidence"][i] = r["confidence"]
                cols["top_k_labels"][i] = [t["label"] for t in r["top_k"]]
                cols["top_k_probs"][i] = [t["probability"] for t in r["top_k"]]
                cols["entropy"][i] = r["entropy"]
                cols["uncertain"][i] = r["uncertain"]
        now = datetime.now(timezone.utc)
        cols["model_name"] = [self.model_name] * n
        cols["model_version"] = [self.model_version] * n
        cols["scored_at"] = [now] * n
        return pa.Table.from_pydict(cols, schema=SCHEMA)


# ----------------------------------------------------------------------------- driver-side plan and output


@dataclass
class ScorePlan:
    """What to score and where, after every driver-side check passed."""

    todo: list[str]                 # absolute paths still to score
    out: Path
    model_uri: str                  # pinned (models:/name@alias → models:/name/<version>)
    model_name: str
    model_version: str | None
    top_k: int
    listed: int                     # images found under the folders
    keep: pa.Table | None = None    # rows carried over from the existing output (--resume)

    @property
    def skipped(self) -> int:
        """Images already in the output (--resume)."""
        return self.listed - len(self.todo)

    def metadata(self) -> dict[bytes, bytes]:
        """Parquet file metadata: the pinned model URI and k."""
        return {META_MODEL_URI: self.model_uri.encode(), META_TOP_K: str(self.top_k).encode()}


@dataclass
class ScoreSummary:
    """What a scoring run did; `line()` is the one-line summary printed at the end."""

    out: Path
    listed: int
    scored: int
    errors: int
    skipped: int
    rows: int
    wall_s: float
    workers: int = 0
    batch_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.scored / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        skip = f", {self.skipped} already scored (resume)" if self.skipped else ""
        return (f"scored {self.scored} images ({self.errors} errors{skip}) in {self.wall_s:.1f} s "
                f"= {self.images_per_s:.1f} img/s; {self.rows} rows in {self.out}")


def check_settings(settings: ScoreConfig) -> None:
    """Value checks on the scoring settings, named by their command-line options."""
    if settings.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {settings.batch_size}")
    if settings.workers is not None and settings.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {settings.workers}")
    if settings.cpus_per_worker is not None and settings.cpus_per_worker <= 0:
        raise ConfigError(f"--cpus-per-worker must be > 0, got {settings.cpus_per_worker}")
    if settings.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {settings.top_k}")
    if settings.resume and settings.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: resume keeps the output, overwrite replaces it")


def read_output(out: str | os.PathLike) -> pa.Table:
    """An existing scoring output; ConfigError if it is not one."""
    try:
        table = pq.read_table(out)
    except Exception as e:
        raise ConfigError(f"cannot read existing output {out} ({e}); pass --overwrite to replace it") from None
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    if missing:
        raise ConfigError(f"{out} is not a scoring output (missing columns {', '.join(missing)}); "
                          "pass --overwrite to replace it or choose another --out")
    # cast to the current schema (older files may differ in nullability) but keep our metadata
    return table.select(SCHEMA.names).cast(SCHEMA).replace_schema_metadata(table.schema.metadata)


def plan_scoring(dirs: Sequence[str | os.PathLike], model_uri: str, out: str | os.PathLike,
                 settings: ScoreConfig = ScoreConfig()) -> ScorePlan:
    """Every check that needs no Ray: settings, folders, output rules, and the model's metadata."""
    check_settings(settings)
    if not dirs:
        raise DataError("no folders given; pass one or more image folders")
    out = Path(out).expanduser().absolute()
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path such as {out / 'scores.parquet'}")
    paths = list_images(dirs)
    if not paths:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images ({exts}) found under {', '.join(map(str, dirs))}; nothing to score")
    if out.exists() and not (settings.resume or settings.overwrite):
        raise ConfigError(f"output {out} already exists; pass --resume to add the missing images "
                          "or --overwrite to replace it")
    keep = read_output(out) if (settings.resume and out.exists()) else None

    # actors get the version checked here, even if the alias moves meanwhile; a bad URI or a
    # model without metadata fails here, once, rather than in every actor (no weights loaded)
    uri = registry.pin(model_uri)
    info = registry.describe(uri)
    k = min(settings.top_k, len(info.class_names))

    todo = [str(p.absolute()) for p in paths]
    if keep is not None:
        _check_same_model(keep, out, info.name, info.version, k)
        err = keep.column("error").to_pylist()
        # rows that failed before are tried again (the file may have been fixed); good rows stay
        done = {p for p, e in zip(keep.column("path").to_pylist(), err) if e is None}
        keep = keep.filter(pa.array([e is None for e in err], pa.bool_()))
        todo = [p for p in todo if p not in done]
    return ScorePlan(todo, out, uri, info.name, info.version, k, len(paths), keep)


def _check_same_model(keep: pa.Table, out: Path, name: str, version: str | None, k: int) -> None:
    seen = {(r["model_name"], r["model_version"]) for r in keep.select(["model_name", "model_version"]).to_pylist()}
    if seen and seen != {(name, version)}:
        before = ", ".join(f"{n} v{v}" for n, v in sorted(seen, key=str))
        raise ConfigError(f"{out} was scored with {before}, not {name} v{version}; resuming would mix models. "
                          "Pass --overwrite or choose another --out")
    meta = keep.schema.metadata or {}
    if META_TOP_K in meta and int(meta[META_TOP_K]) != k:
        raise ConfigError(f"{out} holds top-{int(meta[META_TOP_K])} lists, not top-{k}; use the same --top-k, "
                          "or --overwrite")


class OutputWriter:
    """Stream tables into `<out>.tmp-<pid>`; `commit()` renames it over `out` in one step."""

    def __init__(self, out: Path, metadata: dict[bytes, bytes]) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
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


def write_scores(plan: ScorePlan, batches: Iterable[pa.Table], progress: bool = True) -> ScoreSummary:
    """Stream result tables (after the rows `--resume` keeps) into `plan.out`, atomically.

    `batches` is consumed lazily, so the wall time includes producing them; `extra` says
    how long the first batch took (worker start-up and model load) and how many rows it had.
    """
    writer = OutputWriter(plan.out, plan.metadata())
    bar = Progress(len(plan.todo), progress)
    scored = errors = first_rows = 0
    first_s = None
    t0 = time.perf_counter()
    try:
        if plan.keep is not None:
            writer.write(plan.keep)
        for table in batches:
            e = table.num_rows - table.column("error").null_count
            if first_s is None:
                first_s, first_rows = time.perf_counter() - t0, table.num_rows
            writer.write(table)
            scored += table.num_rows
            errors += e
            bar.update(table.num_rows, e)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return ScoreSummary(plan.out, plan.listed, scored, errors, plan.skipped, writer.rows, time.perf_counter() - t0,
                        extra={"first_batch_s": first_s, "first_batch_rows": first_rows})
