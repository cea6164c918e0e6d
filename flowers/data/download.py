"""Download Flowers-102 from the VGG site: checksummed, atomic, idempotent.

Every file is streamed to ``root/.tmp-<name>``, checked against its MD5 and only then moved
into place, so an interrupted or corrupted download never leaves a dataset that looks
complete. The image archive is unpacked into a temporary folder inside ``root`` and its
``jpg/`` renamed into place in one step.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

from tqdm.auto import tqdm

from .decode import DataError
from .vgg import CLASS_NAMES_FILE, LABELS_FILE, loadmat, class_names

log = logging.getLogger(__name__)

VGG_BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
VGG_FILES: dict[str, str] = {  # name -> md5
    "102flowers.tgz": "52808999861908f626f3c1f4e79d11fa",
    "imagelabels.mat": "e0620be6f572b9609742df49c70aed4d",
    "setid.mat": "a5357ecc9cb78c4bef273ce3793fc85c",
}
_CHUNK = 1 << 20
_ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar")


def _is_archive(name: str) -> bool:
    return name.endswith(_ARCHIVE_SUFFIXES)


def md5sum(path: Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _marker(root: Path, name: str) -> Path:
    # the archive itself is deleted after unpacking (it would double the disk use); this
    # marker records which archive checksum produced the current jpg/ folder
    return root / f".{name}.md5"


def _installed(root: Path, name: str, md5: str) -> bool:
    if _is_archive(name):
        m = _marker(root, name)
        return (root / "jpg").is_dir() and m.is_file() and m.read_text().strip() == md5
    path = root / name
    return path.is_file() and md5sum(path) == md5


def _fetch(url: str, dest: Path, name: str, md5: str, timeout: float, progress: bool) -> None:
    """Stream ``url`` to ``dest`` and verify its MD5; on any failure remove ``dest`` and raise DataError."""
    h = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            got = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress) as bar:
                while block := resp.read(_CHUNK):
                    out.write(block)
                    h.update(block)
                    got += len(block)
                    bar.update(len(block))
            if total is not None and got != total:
                raise DataError(
                    f"download of {name} from {url} was interrupted ({got} of {total} bytes); "
                    "the download was discarded, try again"
                )
    except DataError:
        dest.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        dest.unlink(missing_ok=True)
        raise DataError(f"download of {name} from {url} failed: {e}; the download was discarded, try again") from e
    except BaseException:  # Ctrl-C: clean up, then let it propagate unchanged
        dest.unlink(missing_ok=True)
        raise
    digest = h.hexdigest()
    if digest != md5:
        dest.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {name}: expected {md5}, got {digest}; the download was discarded, try again"
        )


def _safe_extract(tf: tarfile.TarFile, dest: Path, archive: str) -> None:
    """Extract refusing absolute paths, '..', links and device files (path traversal)."""
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: the stdlib does the checks
        try:
            tf.extractall(dest, filter="data")
        except tarfile.FilterError as e:
            raise DataError(f"{archive} contains an unsafe entry ({e}); refusing to unpack it") from e
        return
    for m in tf.getmembers():  # pragma: no cover - only on old Pythons
        p = Path(m.name)
        if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
            raise DataError(f"{archive} contains an unsafe entry {m.name!r}; refusing to unpack it")
    tf.extractall(dest)  # pragma: no cover


def _install_archive(root: Path, tmp_archive: Path, name: str, md5: str) -> None:
    work = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-extract-"))
    try:
        try:
            with tarfile.open(tmp_archive) as tf:
                _safe_extract(tf, work, name)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot unpack {name}: {e}; delete {root} and download again") from e
        src = work / "jpg"
        if not src.is_dir():
            raise DataError(f"{name} has no jpg/ folder; is this the Flowers-102 image archive?")
        dst = root / "jpg"
        if dst.exists():  # a stale folder from an older archive: move it aside, dropped below
            os.replace(dst, work / "old-jpg")
        os.replace(src, dst)
        _write_atomic(_marker(root, name), md5 + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download_flowers102(
    root: str | os.PathLike,
    base_url: str = VGG_BASE_URL,
    files: Mapping[str, str] = VGG_FILES,
    timeout: float = 60,
    progress: bool = True,
) -> Path:
    """Download and verify Flowers-102 into ``root`` (``files``: name -> md5); returns ``root``.

    Files already in place with the right checksum are skipped. All missing files are fetched
    and verified before any is installed, so a failure leaves ``root`` as it was.
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    base = base_url if base_url.endswith("/") else base_url + "/"
    todo = {n: m for n, m in files.items() if not _installed(root, n, m)}
    if not todo:
        log.info("Flowers-102 already complete in %s", root)
    fetched: list[Path] = []
    try:
        for name, md5 in todo.items():
            tmp = root / f".tmp-{name}"
            log.info("downloading %s%s", base, name)
            _fetch(base + name, tmp, name, md5, timeout, progress)
            fetched.append(tmp)
        # archives first: unpacking is the step most likely to fail after the downloads
        for name, md5 in sorted(todo.items(), key=lambda kv: not _is_archive(kv[0])):
            tmp = root / f".tmp-{name}"
            if _is_archive(name):
                _install_archive(root, tmp, name, md5)
                tmp.unlink()
            else:
                os.replace(tmp, root / name)
    finally:
        for tmp in fetched:
            tmp.unlink(missing_ok=True)

    labels_path = root / LABELS_FILE
    names = class_names()
    if labels_path.is_file() and int(loadmat(labels_path, "labels").max()) == len(names):
        _write_atomic(root / CLASS_NAMES_FILE, json.dumps({str(i + 1): n for i, n in enumerate(names)}, indent=1) + "\n")
    else:
        # a mirror with a different label set: keep its names out of it rather than mislabel
        log.warning("%s does not use the %d Flowers-102 classes; not writing %s", labels_path, len(names), CLASS_NAMES_FILE)
    return root
