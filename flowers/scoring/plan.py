"""The driver-side plan: settings, inputs and output/resume/overwrite rules checked before anything runs."""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from flowers import storage
from flowers.registry import uris as registry
from flowers.config import ConfigError, ScoreConfig
from flowers.scoring.schema import MANIFEST, META_TOP_K, PART_RE, SCHEMA, SUMMARY, count_true, metadata
from flowers.scoring.sources import list_inputs, local_path, stat_uri

def resolve_output(out: str | os.PathLike) -> str:
    """The output as a URI, or an absolute local path."""
    text = str(out)
    return text.rstrip("/") if storage.is_remote(text) else str(local_path(text).absolute())


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
    model: Any = None               # the ModelRef resolved once here; every scorer gets it, none resolves again
    views: list[dict] = field(default_factory=list)  # the model's eval preprocessing(s), from its manifest

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
            return count_true(self.keep.column("uncertain")) if self.keep is not None else 0
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
    kind = stat_uri(out)
    if kind == "missing":
        return "absent"
    if kind == "file":
        return "file"
    names = DatasetOutput(out).names()
    visible = [n for n in names if not (n.startswith(".") and "/" not in n)]
    if not visible:
        return "empty"
    return "dataset" if all(DatasetOutput.ours(n) for n in visible) else "foreign"


def plan_scoring(inputs: Sequence[str | os.PathLike], model: Any, out: str | os.PathLike,
                 settings: ScoreConfig = ScoreConfig(), target: registry.TrackingTarget | None = None) -> ScorePlan:
    """Every check that needs no Ray: settings, inputs, output rules, and the model's metadata.

    `model`: a URI or path, resolved here once (`resolve_ref`, against `target`), or a `ModelRef`
    the caller resolved. Reads only: nothing is written or deleted until the job starts (`prepare_dataset`).
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

    # the one resolution: scorers get this ref (the version pinned here, even if the alias moves
    # meanwhile); a bad URI or a model without metadata fails here, once (no weights loaded)
    ref = registry.resolve_ref(model, target)
    info = registry.describe(ref)
    k = min(settings.top_k, len(info.class_names))
    views = info.manifest.get("views") or [info.preprocessing]
    plan = ScorePlan(list(paths), uri, ref.pinned, info.name, info.version, k, len(paths), layout=layout,
                     sources=[str(s) for s in inputs], replace=exists and settings.overwrite, model=ref,
                     views=[dict(v) for v in views])
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
        plan.parts.append(PartInfo(part, rows, rows - good.num_rows, count_true(good.column("uncertain"))))
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
