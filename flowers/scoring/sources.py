"""Batch scoring's inputs: local folders, object-store prefixes and listing files, listed once, sorted."""
from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from flowers import storage
from flowers.data import IMAGE_EXTENSIONS, DataError, list_images
from flowers.scoring.schema import LISTING_PARQUET, LISTING_TEXT

def read_bytes(path: str) -> bytes:
    """The bytes of a local file or a storage URI."""
    if storage.is_remote(path):
        return storage.read_bytes(path)
    with open(path, "rb") as f:
        return f.read()


def is_image_name(name: str) -> bool:
    # hidden files are skipped: macOS "._x.jpg" resource forks look like images but are not
    base = posixpath.basename(name)
    return posixpath.splitext(base)[1].lower() in IMAGE_EXTENSIONS and not base.startswith(".")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def stat_uri(uri: str) -> str:
    """'file', 'dir' or 'missing' for a URI or local path; StorageError when storage cannot be reached."""
    import pyarrow.fs as pafs

    if not storage.is_remote(uri):
        p = local_path(uri)
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
            if i.type == pafs.FileType.File and is_image_name(i.path)
            and not any(part.startswith(".") for part in i.path[len(path):].split("/"))]


def _listing_entries(uri: str, path_column: str | None) -> list[str]:
    """The paths/URIs a listing file names; relative ones are relative to the listing's folder."""
    data = read_bytes(uri) if storage.is_remote(uri) else local_path(uri).read_bytes()
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
    base = local_path(uri).absolute().parent
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
        kind = stat_uri(src)
        remote = storage.is_remote(src)
        if kind == "missing":
            if remote:
                raise DataError(f"nothing at {src}: no such prefix or object")
            if src.lower().endswith(LISTING_PARQUET + LISTING_TEXT):
                raise DataError(f"listing file not found: {local_path(src)}")
            raise DataError(f"folder not found: {local_path(src)}")
        if kind == "dir":
            scanned.append(src)
            found.update(_list_prefix(src) if remote else (str(p.absolute()) for p in list_images(local_path(src))))
        elif is_image_name(src):
            found.add(src if remote else str(local_path(src).absolute()))
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
