"""One resolver for storage URIs: local paths, `s3://bucket/prefix` (AWS or an S3-compatible
server such as MinIO), and whatever else pyarrow's filesystems know (`gs://`, `hdfs://`).

Everything that must cross nodes (Tune storage, the dataset, stage outputs, scoring input and
output) goes through here. S3-compatible servers: set the endpoint once in the environment,
`AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`, the names AWS SDKs and MLflow read), e.g.
`http://minio:9000`; credentials come from the usual `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` / `AWS_DEFAULT_REGION`.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


class StorageError(RuntimeError):
    """A storage URI that cannot be reached, read or written; the message says which and why."""


def is_remote(uri: str | os.PathLike | None) -> bool:
    """True for URIs with a scheme other than file:// (s3://, gs://, https://, ...)."""
    if uri is None:
        return False
    scheme = urlparse(str(uri)).scheme
    return len(scheme) > 1 and scheme != "file"  # len > 1: a Windows drive letter is not a scheme


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint from the environment, if any (None: AWS itself)."""
    for var in ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def storage_env() -> dict[str, str]:
    """The variables that say where object storage is: passed to Ray workers and jobs so every
    node resolves the same `s3://` URIs against the same server with the same credentials."""
    keys = (*ENDPOINT_VARS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION", "AWS_REGION")
    return {k: os.environ[k] for k in keys if os.environ.get(k)}


def filesystem(uri: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a URI or local path."""
    import pyarrow.fs as pafs

    text = str(uri)
    if not is_remote(text):
        path = text[len("file://"):] if text.startswith("file://") else text
        return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"'{text}' names no bucket; expected s3://BUCKET/PREFIX")
        endpoint = s3_endpoint()
        # bounded timeouts and retries: an unreachable endpoint must fail in seconds, not minutes
        kw: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
                              "connect_timeout": 5, "request_timeout": 60,
                              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
        if endpoint:
            ep = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
            kw.update(endpoint_override=ep.netloc, scheme=ep.scheme or "http")
        return pafs.S3FileSystem(**kw), f"{parsed.netloc}{parsed.path}".rstrip("/")
    try:
        return pafs.FileSystem.from_uri(text)
    except Exception as e:
        raise StorageError(f"unsupported storage URI '{text}': {str(e).splitlines()[0]}") from None


def join(uri: str, *parts: str) -> str:
    """`uri/part/...` for URIs and local paths alike."""
    if is_remote(uri):
        return posixpath.join(str(uri).rstrip("/"), *parts)
    return str(Path(uri, *parts))


def _explain(uri: str, e: BaseException) -> StorageError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    hint = ""
    low = msg.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or "the specified bucket" in low:
        hint = "; create the bucket first"
    elif "accessdenied" in low or "invalidaccesskeyid" in low or "signature" in low or "forbidden" in low:
        hint = "; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    elif "connect" in low or "resolve" in low or "timed out" in low or "curl" in low:
        hint = f"; is the object store running (endpoint {s3_endpoint() or 'AWS'})? set AWS_ENDPOINT_URL_S3"
    return StorageError(f"storage '{uri}' is not usable: {msg}{hint}")


def check_writable(uri: str) -> None:
    """Write, read back and delete a small marker under `uri`; StorageError with the reason otherwise.

    Called before any work starts, so a wrong bucket, credentials or endpoint fails in one line
    instead of at the first checkpoint.
    """
    fs, path = filesystem(uri)
    probe = posixpath.join(path, f".flowers-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        with fs.open_input_stream(probe) as f:
            if f.read() != b"ok":
                raise OSError("read back a different marker")
        fs.delete_file(probe)
    except StorageError:
        raise
    except Exception as e:
        raise _explain(uri, e) from None


def read_bytes(uri: str) -> bytes:
    """The whole object/file at `uri`."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except Exception as e:
        raise _explain(uri, e) from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object/file; local files atomically (temp + rename), objects are atomic by nature."""
    if not is_remote(uri):
        p = Path(str(uri).removeprefix("file://")).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return
    fs, path = filesystem(uri)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except Exception as e:
        raise _explain(uri, e) from None


def exists(uri: str) -> bool:
    """Whether a file/object (or folder/prefix) exists at `uri`."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except Exception as e:
        raise _explain(uri, e) from None
