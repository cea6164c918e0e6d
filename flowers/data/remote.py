"""Datasets by URI: publish a folder to object storage, materialise it once per node.

A published dataset is a prefix (`s3://bucket/flowers102`, `https://host/flowers102`, or a
folder) holding the files plus `flowers-dataset.json`, a manifest of every file's size and
MD5 written last (so a half-finished upload is never mistaken for a dataset).

`materialize(uri)` copies it into a node-local cache keyed by the manifest's hash, verifies
every file, and renames the finished folder into place: a crash leaves only a `.partial`
folder that the next attempt removes. Trials that start together on one node take a file
lock, so the node downloads once and the others wait and reuse it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flowers import storage

from .decode import DataError
from .download import md5sum

log = logging.getLogger(__name__)

MANIFEST_NAME = "flowers-dataset.json"
MANIFEST_FORMAT = "flowers.dataset/1"
ENV_CACHE = "FLOWERS_CACHE"
VERIFIED = ".verified"


def cache_root() -> Path:
    """Node-local dataset cache: `$FLOWERS_CACHE/datasets`, else `~/.cache/flowers/datasets`."""
    base = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "flowers")
    return base.expanduser() / "datasets"


def is_http(uri: str) -> bool:
    return str(uri).startswith(("http://", "https://"))


def build_manifest(root: Path) -> dict:
    """Size and MD5 of every regular file under `root` (hidden files skipped)."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                          p.relative_to(root).parts))
    files = [p for p in files if p.name != MANIFEST_NAME]
    if not files:
        raise DataError(f"{root} holds no files to publish")
    with ThreadPoolExecutor(8) as pool:
        sums = list(pool.map(md5sum, files))
    return {"format": MANIFEST_FORMAT,
            "files": {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "md5": s} for p, s in zip(files, sums)}}


def publish(src: str | os.PathLike, uri: str, workers: int = 8) -> dict:
    """Upload a dataset folder to `uri` (object storage or a folder); the manifest goes last."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise DataError(f"dataset folder not found: {src}")
    if is_http(uri):
        raise DataError("cannot publish to an http(s) URI; publish to s3://... or a shared folder and serve that")
    manifest = build_manifest(src)
    storage.check_writable(uri)

    def put(rel: str) -> None:
        storage.write_bytes(storage.join(uri, rel), (src / rel).read_bytes())

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, manifest["files"]))
    storage.write_bytes(storage.join(uri, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
    log.info("published %d files from %s to %s", len(manifest["files"]), src, uri)
    return manifest


def _fetch(uri: str, attempts: int = 3) -> bytes:
    if not is_http(uri):
        return storage.read_bytes(uri)
    last: Exception | None = None
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(uri, timeout=60) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise DataError(f"cannot fetch {uri}: HTTP {e.code}") from None
            last = e
        except (urllib.error.URLError, OSError) as e:
            last = e
    raise DataError(f"cannot fetch {uri}: {last}")


def read_manifest(uri: str) -> tuple[dict, bytes]:
    """The dataset manifest at `uri` and its raw bytes; DataError when there is none."""
    try:
        raw = _fetch(storage.join(uri, MANIFEST_NAME))
    except (storage.StorageError, DataError) as e:
        raise DataError(f"no dataset at {uri} ({e}); publish one with `flowers data publish DIR {uri}`") from None
    try:
        manifest = json.loads(raw)
        if manifest.get("format") != MANIFEST_FORMAT or not manifest.get("files"):
            raise ValueError("not a flowers dataset manifest")
    except ValueError as e:
        raise DataError(f"{uri}/{MANIFEST_NAME} is unreadable ({e})") from None
    return manifest, raw


def _verify(path: Path, rel: str, want: dict) -> None:
    size = path.stat().st_size
    if size != want["size"]:
        raise DataError(f"dataset file {rel}: {size} bytes, the manifest says {want['size']}")
    got = md5sum(path)
    if got != want["md5"]:
        raise DataError(f"dataset file {rel}: MD5 {got} does not match the manifest's {want['md5']} "
                        "(corrupt or changed upload; publish the dataset again)")


def materialize(uri: str | os.PathLike, root: Path | None = None, workers: int = 8) -> Path:
    """A local, verified copy of the dataset at `uri` (a local path is returned as it is)."""
    uri = str(uri)
    if not storage.is_remote(uri):
        return Path(uri.removeprefix("file://")).expanduser()
    manifest, raw = read_manifest(uri)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    base = Path(root) if root else cache_root()
    base.mkdir(parents=True, exist_ok=True)
    final = base / digest
    with open(base / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others wait here, then reuse it
        if (final / VERIFIED).is_file() and (final / VERIFIED).read_text() == digest:
            return final
        partial = base / f".{digest}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # what a crashed attempt left
        partial.mkdir()
        files = manifest["files"]
        log.info("materialising %s (%d files) into %s", uri, len(files), final)

        def get(rel: str) -> None:
            dest = partial / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(_fetch(storage.join(uri, rel)))
            _verify(dest, rel, files[rel])

        try:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(get, files))
        except storage.StorageError as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise DataError(str(e)) from None
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        (partial / MANIFEST_NAME).write_bytes(raw)
        (partial / VERIFIED).write_text(digest)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        return final
