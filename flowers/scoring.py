"""Batch scoring, the Ray-free half: inputs → rows → one Parquet file or a dataset folder.

`jobs/score.py` runs the Ray Data pipeline; everything it calls lives here:
- inputs (`list_inputs`): local folders, `s3://` prefixes and listing files (text, one path or
  URI per line, or a Parquet column), listed on the driver, sorted, each input once;
- `Scorer`: the callable class of the Ray Data actor pool; it loads the model once and turns
  a batch of `{path, bytes}` rows into output rows, one per input row, with `error` set (and
  nulls elsewhere) for an object that cannot be decoded;
- `plan_scoring`: the driver-side checks (settings, inputs, output/resume/overwrite rules, the
  model's metadata) that run before any Ray process starts, so bad input fails fast and
  nothing is written;
- output, two layouts (docs/scoring.md):
  * a single Parquet file for small local jobs: `write_scores` streams the rows into a temp
    file next to it and renames it into place at the end (atomic);
  * a dataset folder (large jobs, any `s3://` output): workers write `part-*.parquet` files,
    then `commit_dataset` checks every input is there exactly once and writes `_manifest.json`
    LAST, the commit marker. `--resume` keeps the complete parts and scores only the rest;
- `ScoreSummary`: written next to the output and logged to MLflow (`log_summary`).
"""
from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from flowers import registry, storage
from flowers.config import ConfigError, ScoreConfig
from flowers.data import IMAGE_EXTENSIONS, DataError, list_images
from flowers.scoring_io import part_name, read_objects  # noqa: F401  (apart: read and write tasks import only it)

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


# ----------------------------------------------------------------------------- scorer (runs in Ray actors)


def _read_bytes(path: str) -> bytes:
    if storage.is_remote(path):
        return storage.read_bytes(path)
    with open(path, "rb") as f:
        return f.read()


def _image_size(data: bytes) -> tuple[int, int]:
    """Stored width/height from the header (cheap: PIL does not decode pixels for this)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.size


class Scorer:
    """Loads the Predictor once; `__call__` scores a batch of `{path[, bytes, read_error]}` rows.

    The reader (`read_objects`) hands over `bytes`, or `read_error` for an object it could not
    read; a row with neither is read from `path` here. Either way an unreadable or undecodable
    input becomes an error row, never a failed job.
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
        self.schema = SCHEMA.with_metadata(metadata(str(model_uri), self.top_k))

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        import torch

        from flowers.data import ImageDecodeError

        paths = [str(p) for p in batch["path"]]
        blobs = batch.get("bytes")
        read_errors = batch.get("read_error")
        n = len(paths)
        cols: dict[str, list] = {f.name: [None] * n for f in SCHEMA}
        cols["path"] = paths
        tensors, ok = [], []
        for i, path in enumerate(paths):
            data = None
            if read_errors is not None and read_errors[i]:
                cols["error"][i] = str(read_errors[i])
                continue
            try:
                data = blobs[i] if blobs is not None and blobs[i] is not None else _read_bytes(path)
                tensors.append(self.predictor.load_image(bytes(data)))
                cols["width"][i], cols["height"][i] = _image_size(data)
                ok.append(i)
            except ImageDecodeError as e:
                # open_image names bytes input "<N bytes>"; the path is what the user can act on
                cols["error"][i] = str(e).replace(f"<{len(data)} bytes>", path) if data is not None else str(e)
            except (OSError, storage.StorageError) as e:  # unreadable: permission, vanished, a folder, I/O
                cols["error"][i] = f"cannot read {path}: {getattr(e, 'strerror', None) or e}"
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
        return pa.Table.from_pydict(cols, schema=self.schema)


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


# ----------------------------------------------------------------------------- inputs


def _is_image_name(name: str) -> bool:
    # hidden files are skipped: macOS "._x.jpg" resource forks look like images but are not
    base = posixpath.basename(name)
    return posixpath.splitext(base)[1].lower() in IMAGE_EXTENSIONS and not base.startswith(".")


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def _stat(uri: str) -> str:
    """'file', 'dir' or 'missing' for a URI or local path; StorageError when storage cannot be reached."""
    import pyarrow.fs as pafs

    if not storage.is_remote(uri):
        p = _local(uri)
        return "dir" if p.is_dir() else "file" if p.exists() else "missing"
    if not storage.exists(uri):  # explains an unreachable endpoint, a missing bucket, bad credentials
        return "missing"
    fs, path = storage.filesystem(uri)
    return "file" if fs.get_file_info(path).type == pafs.FileType.File else "dir"


def _list_prefix(uri: str) -> list[str]:
    """Image objects under an object-store prefix (recursive), as URIs."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri)
    scheme = uri.split("://", 1)[0]
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except Exception as e:
        raise storage.StorageError(f"cannot list {uri}: {str(e).splitlines()[0]}") from None
    return [f"{scheme}://{i.path}" for i in infos
            if i.type == pafs.FileType.File and _is_image_name(i.path)
            and not any(part.startswith(".") for part in i.path[len(path):].split("/"))]


def _listing_entries(uri: str, path_column: str | None) -> list[str]:
    """The paths/URIs a listing file names; relative ones are relative to the listing's folder."""
    data = _read_bytes(uri) if storage.is_remote(uri) else _local(uri).read_bytes()
    if uri.lower().endswith(LISTING_PARQUET):
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as e:
            raise DataError(f"listing {uri} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
        strings = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        col = path_column or ("path" if "path" in table.column_names else strings[0] if len(strings) == 1 else None)
        if col is None or col not in table.column_names:
            raise DataError(f"listing {uri} has no column {col or 'path'!r} "
                            f"(columns: {', '.join(table.column_names)}); pass --path-column NAME")
        entries = [str(v).strip() for v in table.column(col).to_pylist() if v is not None and str(v).strip()]
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"listing {uri} is not UTF-8 text (one path or URI per line)") from None
        entries = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if storage.is_remote(uri):
        scheme, rest = uri.split("://", 1)
        base = posixpath.dirname(rest)
        return [e if storage.is_remote(e) or e.startswith("/")
                else f"{scheme}://{posixpath.normpath(posixpath.join(base, e))}" for e in entries]
    base = _local(uri).absolute().parent
    return [e if storage.is_remote(e) else os.path.abspath(base / Path(e).expanduser()) for e in entries]


def list_inputs(sources: Sequence[str | os.PathLike], path_column: str | None = None) -> list[str]:
    """Every input to score, sorted, each once: absolute local paths and URIs.

    A source is a local folder (images under it, recursively), an object-store prefix
    (`s3://bucket/prefix`, the same), a single image, or a listing file that names inputs one per
    line (`# comments` and blank lines skipped) or in a Parquet column. A listing names files:
    each entry is scored, whatever its extension (what is not an image gets an error row).
    """
    if not sources:
        raise DataError("no inputs given; pass image folders, s3:// prefixes or listing files")
    found: set[str] = set()
    scanned: list[str] = []  # folders and prefixes, for the "no images" message
    for src in map(str, sources):
        kind = _stat(src)
        remote = storage.is_remote(src)
        if kind == "missing":
            if remote:
                raise DataError(f"nothing at {src}: no such prefix or object")
            if src.lower().endswith(LISTING_PARQUET + LISTING_TEXT):
                raise DataError(f"listing file not found: {_local(src)}")
            raise DataError(f"folder not found: {_local(src)}")
        if kind == "dir":
            scanned.append(src)
            found.update(_list_prefix(src) if remote else (str(p.absolute()) for p in list_images(_local(src))))
        elif _is_image_name(src):
            found.add(src if remote else str(_local(src).absolute()))
        else:
            entries = _listing_entries(src, path_column)
            if not entries:
                raise DataError(f"listing {src} names no inputs; nothing to score")
            found.update(entries)
    if not found:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images ({exts}) found under {', '.join(scanned)}; nothing to score")
    return sorted(found)


def by_filesystem(uris: Iterable[str]) -> dict[str, list[str]]:
    """Inputs grouped by scheme ('' for local paths): one reader per filesystem."""
    groups: dict[str, list[str]] = {}
    for u in uris:
        groups.setdefault(u.split("://", 1)[0] if storage.is_remote(u) else "", []).append(u)
    return groups


# ----------------------------------------------------------------------------- output: one file or a dataset folder


def resolve_output(out: str | os.PathLike) -> str:
    """The output as a URI, or an absolute local path."""
    text = str(out)
    return text.rstrip("/") if storage.is_remote(text) else str(_local(text).absolute())


class DatasetOutput:
    """A dataset folder or prefix: `part-*.parquet`, `_manifest.json` (written last) and `_summary.json`."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.path = storage.filesystem(uri)

    def _full(self, name: str) -> str:
        return posixpath.join(self.path, name)

    def names(self) -> list[str]:
        """Every file under the folder, relative (a dataset folder is flat; anything nested is foreign)."""
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        except Exception as e:
            raise storage.StorageError(f"cannot list {self.uri}: {str(e).splitlines()[0]}") from None
        return sorted(i.path[len(self.path) + 1:] for i in infos if i.type == pafs.FileType.File)

    @staticmethod
    def ours(name: str) -> bool:
        return bool(PART_RE.match(name)) or name in (MANIFEST, SUMMARY) or \
            ("/" not in name and name.startswith("."))  # our temp files and storage probes

    def parts(self) -> list[str]:
        return [n for n in self.names() if PART_RE.match(n)]

    def read_manifest(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(storage.join(self.uri, MANIFEST)))
        except storage.StorageError:
            return None
        except ValueError:
            return {}

    def part_rows(self, name: str) -> tuple[int, dict[bytes, bytes]] | None:
        """(rows, schema metadata) of a complete part; None for a partial or unreadable one."""
        try:
            with self.fs.open_input_file(self._full(name)) as f:
                meta = pq.read_metadata(f)
                return meta.num_rows, dict(meta.schema.to_arrow_schema().metadata or {})
        except Exception:
            return None

    def read(self, name: str, columns: Sequence[str] | None = None) -> pa.Table:
        with self.fs.open_input_file(self._full(name)) as f:
            return pq.read_table(f, columns=list(columns) if columns else None)

    def write_table(self, name: str, table: pa.Table) -> None:
        """A part written whole: a temp file renamed into place locally; one PUT on object storage."""
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes(storage.join(self.uri, name), buf.getvalue().to_pybytes())

    def write_json(self, name: str, obj: dict) -> None:
        storage.write_bytes(storage.join(self.uri, name), json.dumps(obj, indent=1, default=str).encode())

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self._full(name))
        except FileNotFoundError:
            pass

    def makedirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)


@dataclass
class PartInfo:
    name: str
    rows: int
    errors: int = 0
    uncertain: int = 0


@dataclass
class ScorePlan:
    """What to score and where, after every driver-side check passed."""

    todo: list[str]                 # inputs still to score (absolute paths, URIs)
    out: str                        # the output: absolute path or URI
    model_uri: str                  # pinned (models:/name@alias → models:/name/<version>)
    model_name: str
    model_version: str | None
    top_k: int
    listed: int                     # inputs found
    keep: pa.Table | None = None    # file layout: rows carried over from the existing output (--resume)
    layout: str = "file"            # "file" | "dataset"
    sources: list[str] = field(default_factory=list)
    replace: bool = False           # --overwrite of an existing output (removed when the job starts)
    parts: list[PartInfo] = field(default_factory=list)  # dataset layout: complete parts kept (--resume)
    broken: list[str] = field(default_factory=list)      # dataset layout: partial parts of a crashed run
    committed: bool = False         # dataset layout: `_manifest.json` exists

    @property
    def skipped(self) -> int:
        """Inputs already in the output (--resume)."""
        return self.listed - len(self.todo)

    @property
    def kept_rows(self) -> int:
        if self.layout == "file":
            return self.keep.num_rows if self.keep is not None else 0
        return sum(p.rows - p.errors for p in self.parts)

    @property
    def kept_uncertain(self) -> int:
        if self.layout == "file":
            return _n_true(self.keep.column("uncertain")) if self.keep is not None else 0
        return sum(p.uncertain for p in self.parts)

    def metadata(self) -> dict[bytes, bytes]:
        """Parquet file metadata: the pinned model URI and k."""
        return metadata(self.model_uri, self.top_k)

    @property
    def summary_uri(self) -> str:
        if self.layout == "dataset":
            return storage.join(self.out, SUMMARY)
        return str(Path(self.out).with_suffix(".summary.json"))


def check_settings(settings: ScoreConfig) -> None:
    """Value checks on the scoring settings, named by their command-line options."""
    if settings.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {settings.batch_size}")
    if settings.workers is not None and settings.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {settings.workers}")
    if settings.cpus_per_worker is not None and settings.cpus_per_worker <= 0:
        raise ConfigError(f"--cpus-per-worker must be > 0, got {settings.cpus_per_worker}")
    if settings.gpus_per_worker is not None and settings.gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker must be >= 0, got {settings.gpus_per_worker}")
    if settings.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {settings.top_k}")
    if settings.dataset_threshold < 0:
        raise ConfigError(f"--dataset-threshold must be >= 0, got {settings.dataset_threshold}")
    if settings.part_rows < 1:
        raise ConfigError(f"--part-rows must be >= 1, got {settings.part_rows}")
    if settings.resume and settings.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: resume keeps the output, overwrite replaces it")


def read_output(out: str | os.PathLike) -> pa.Table:
    """An existing single-file scoring output; ConfigError if it is not one."""
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


def output_state(out: str) -> str:
    """'absent', 'file', 'dataset' (a folder of ours, maybe uncommitted), 'empty' or 'foreign'."""
    kind = _stat(out)
    if kind == "missing":
        return "absent"
    if kind == "file":
        return "file"
    names = DatasetOutput(out).names()
    visible = [n for n in names if not (n.startswith(".") and "/" not in n)]
    if not visible:
        return "empty"
    return "dataset" if all(DatasetOutput.ours(n) for n in visible) else "foreign"


def plan_scoring(inputs: Sequence[str | os.PathLike], model_uri: str, out: str | os.PathLike,
                 settings: ScoreConfig = ScoreConfig()) -> ScorePlan:
    """Every check that needs no Ray: settings, inputs, output rules, and the model's metadata.

    Reads only: nothing is written or deleted until the job starts (`prepare_dataset`).
    """
    check_settings(settings)
    uri = resolve_output(out)
    remote_out = storage.is_remote(uri)
    paths = list_inputs(inputs, settings.path_column)
    state = output_state(uri)
    if state == "foreign" and not remote_out:
        raise ConfigError(f"--out {uri} is a folder that holds other files; give a file path such as "
                          f"{Path(uri) / 'scores.parquet'}, or a new or empty folder for a dataset of part files")
    if state == "foreign":
        raise ConfigError(f"--out {uri} holds objects that are not a scoring output; choose another prefix")
    if state == "file" and remote_out:
        raise ConfigError(f"--out {uri} is an object; an object-store output is a prefix of part files: "
                          f"give {uri.rsplit('.', 1)[0]}/ or another prefix")
    exists = state in ("file", "dataset")
    if exists and not (settings.resume or settings.overwrite):
        raise ConfigError(f"output {uri} already exists; pass --resume to add the missing images "
                          "or --overwrite to replace it")
    if remote_out or state in ("dataset", "empty"):
        layout = "dataset"
    elif state == "file" and settings.resume:
        layout = "file"  # resume keeps the layout it finds
    else:
        layout = "dataset" if len(paths) > settings.dataset_threshold else "file"

    # actors get the version checked here, even if the alias moves meanwhile; a bad URI or a
    # model without metadata fails here, once, rather than in every actor (no weights loaded)
    pinned = registry.pin(model_uri)
    info = registry.describe(pinned)
    k = min(settings.top_k, len(info.class_names))
    plan = ScorePlan(list(paths), uri, pinned, info.name, info.version, k, len(paths), layout=layout,
                     sources=[str(s) for s in inputs], replace=exists and settings.overwrite)
    if settings.resume and state == "file":
        keep = read_output(uri)
        _check_same_model(_models(keep), keep.schema.metadata, uri, info.name, info.version, k)
        err = keep.column("error").to_pylist()
        # rows that failed before are tried again (the file may have been fixed); good rows stay
        done = {p for p, e in zip(keep.column("path").to_pylist(), err) if e is None}
        plan.keep = keep.filter(pa.array([e is None for e in err], pa.bool_()))
        plan.todo = [p for p in paths if p not in done]
    elif settings.resume and state == "dataset":
        _scan_dataset(plan, info.name, info.version)
    if remote_out:
        storage.check_writable(uri)  # bucket, credentials, endpoint: one line now, not after the first part
    return plan


def _models(table: pa.Table) -> set[tuple[str, str | None]]:
    return {(r["model_name"], r["model_version"]) for r in table.select(["model_name", "model_version"]).to_pylist()}


def _check_same_model(seen: set, meta: dict | None, out: str, name: str, version: str | None, k: int) -> None:
    if seen and seen != {(name, version)}:
        before = ", ".join(f"{n} v{v}" for n, v in sorted(seen, key=str))
        raise ConfigError(f"{out} was scored with {before}, not {name} v{version}; resuming would mix models. "
                          "Pass --overwrite or choose another --out")
    meta = meta or {}
    if META_TOP_K in meta and int(meta[META_TOP_K]) != k:
        raise ConfigError(f"{out} holds top-{int(meta[META_TOP_K])} lists, not top-{k}; use the same --top-k, "
                          "or --overwrite")


def _scan_dataset(plan: ScorePlan, name: str, version: str | None) -> None:
    """--resume on a dataset folder: complete parts are kept, partial ones (a crash mid-write) will be
    removed, and inputs whose rows are good are not scored again."""
    out = DatasetOutput(plan.out)
    plan.committed = out.read_manifest() is not None
    done: set[str] = set()
    seen: set = set()
    for part in out.parts():
        head = out.part_rows(part)
        if head is None:
            plan.broken.append(part)
            continue
        rows, meta = head
        t = out.read(part, ["path", "error", "uncertain", "model_name", "model_version"])
        seen |= _models(t)
        _check_same_model(seen, meta, plan.out, name, version, plan.top_k)
        good = t.filter(t.column("error").is_null())
        done.update(good.column("path").to_pylist())
        plan.parts.append(PartInfo(part, rows, rows - good.num_rows, _n_true(good.column("uncertain"))))
    plan.todo = [p for p in plan.todo if p not in done]


def check_cluster_paths(plan: ScorePlan, model_uri: str, multi_node: bool, shared_fs: bool) -> None:
    """On a cluster that spans nodes, workers read the inputs and the model, and write a dataset
    output: none of them may be a path only the driver has (unless every node mounts it)."""
    if not multi_node or shared_fs:
        return
    hint = "or pass --shared-fs if every node mounts it at the same path"
    local = next((u for u in plan.todo if not storage.is_remote(u)), None)  # a local listing of URIs is fine
    if local:
        raise ConfigError(f"input {local} is on the driver's disk, but the cluster spans several nodes and the "
                          f"workers read the images; copy them to object storage (s3://BUCKET/PREFIX) {hint}")
    if plan.layout == "dataset" and not storage.is_remote(plan.out):
        raise ConfigError(f"--out {plan.out} is a folder on the driver, but the cluster spans several nodes and the "
                          f"workers write its part files; use --out s3://BUCKET/PREFIX {hint}")
    if not registry.is_mlflow_uri(model_uri) and not storage.is_remote(model_uri):
        raise ConfigError(f"--model {model_uri} is a path on the driver, but the cluster spans several nodes; "
                          f"register it and pass models:/NAME@ALIAS {hint}")


# ----------------------------------------------------------------------------- single-file output


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


def _n_true(col: pa.ChunkedArray | pa.Array) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.cast(col, pa.int64())).as_py() or 0)


def _count(table: pa.Table) -> tuple[int, int]:
    """(error rows, uncertain rows) of a result table."""
    return table.num_rows - table.column("error").null_count, _n_true(table.column("uncertain"))


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
                        uncertain=uncertain, output_uncertain=plan.kept_uncertain + uncertain, **_model_fields(plan))


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
                        output_uncertain=manifest["uncertain"], layout="dataset", **_model_fields(plan))


def read_dataset(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A committed dataset output as one table (the parts its manifest lists); DataError if uncommitted."""
    out = DatasetOutput(resolve_output(uri))
    manifest = out.read_manifest()
    if not manifest:
        raise DataError(f"{uri} holds no committed scoring output (no {MANIFEST}); finish it with --resume")
    tables = [out.read(p["name"], columns) for p in manifest["parts"]]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


# ----------------------------------------------------------------------------- summary


def _model_fields(plan: ScorePlan) -> dict[str, Any]:
    return {"model_uri": plan.model_uri, "model_name": plan.model_name, "model_version": plan.model_version,
            "top_k": plan.top_k, "sources": list(plan.sources)}


@dataclass
class ScoreSummary:
    """What a scoring run did; `line()` is the one-line summary printed at the end, `to_dict()` the
    summary file written next to the output and the metrics logged to MLflow."""

    out: str | Path
    listed: int
    scored: int                     # rows this run produced (error rows included)
    errors: int                     # error rows this run produced (= error rows in the output: resume retries them)
    skipped: int
    rows: int                       # rows in the output
    wall_s: float
    workers: int = 0
    batch_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    uncertain: int = 0              # this run's rows flagged uncertain
    output_uncertain: int = 0       # ... in the whole output
    layout: str = "file"
    model_uri: str = ""
    model_name: str = ""
    model_version: str | None = None
    top_k: int = 0
    sources: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.scored / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def uncertain_share(self) -> float:
        """Uncertain rows among the output's scored (non-error) rows."""
        good = self.rows - self.errors
        return self.output_uncertain / good if good > 0 else 0.0

    def line(self) -> str:
        skip = f", {self.skipped} already scored (resume)" if self.skipped else ""
        return (f"scored {self.scored} images ({self.errors} errors{skip}) in {self.wall_s:.1f} s "
                f"= {self.images_per_s:.1f} img/s; {self.rows} rows in {self.out}, "
                f"{self.uncertain_share:.1%} uncertain")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(out=str(self.out), images_per_s=self.images_per_s, uncertain_share=self.uncertain_share,
                 format="flowers.scoring-summary/1", finished_at=datetime.now(timezone.utc).isoformat())
        return d


def write_summary(plan: ScorePlan, summary: ScoreSummary) -> str:
    """The summary JSON next to the output (`<stem>.summary.json`, or `_summary.json` in a dataset folder)."""
    uri = plan.summary_uri
    storage.write_bytes(uri, json.dumps(summary.to_dict(), indent=1, default=str).encode())
    return uri


def log_summary(summary: ScoreSummary, target: registry.TrackingTarget, params: dict[str, Any] | None = None) -> str:
    """One run in the `flowers-scoring` experiment: the summary's figures as metrics, the settings as
    params, the summary JSON as an artifact. Returns the run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    c = MlflowClient(target.tracking_uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        loc = f"{target.artifact_root}/{EXPERIMENT}" if target.artifact_root else None
        exp_id = c.create_experiment(EXPERIMENT, artifact_location=loc)
    d = summary.to_dict()
    run = c.create_run(exp_id, run_name=f"score {posixpath.basename(str(summary.out).rstrip('/'))}",
                       tags={"flowers.role": "scoring", "flowers.output": str(summary.out),
                             "flowers.model_uri": summary.model_uri})
    now = int(time.time() * 1000)
    metrics = {k: d[k] for k in ("rows", "errors", "uncertain", "output_uncertain", "uncertain_share", "scored",
                                 "skipped", "listed", "images_per_s", "wall_s")}
    all_params = {"output": d["out"], "layout": d["layout"], "model_uri": d["model_uri"],
                  "model_name": d["model_name"], "model_version": d["model_version"], "top_k": d["top_k"],
                  "inputs": ",".join(d["sources"]), "workers": d["workers"], "batch_size": d["batch_size"],
                  **(params or {})}
    c.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                params=[Param(k, ("null" if v is None else str(v))[:6000]) for k, v in all_params.items()])
    c.log_dict(run.info.run_id, d, "summary.json")
    c.set_terminated(run.info.run_id)
    return run.info.run_id
