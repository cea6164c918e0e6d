"""Tests for flowers.data.download against a local HTTP server (no network)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from flowers.data import DataError, class_names, download_flowers102, load_vgg, write_synthetic

ARCHIVE = "102flowers.tgz"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _make_mirror(tmp: Path, num_classes: int = 3, per_class: int = 4, size: int = 24) -> tuple[Path, dict[str, str]]:
    """A folder laid out like the VGG site: 102flowers.tgz (jpg/...), imagelabels.mat, setid.mat."""
    src = write_synthetic(tmp / "src", num_classes=num_classes, per_class=per_class, size=size).root
    site = tmp / "site"
    site.mkdir()
    with tarfile.open(site / ARCHIVE, "w:gz") as tf:
        tf.add(src / "jpg", arcname="jpg")
    for name in ("imagelabels.mat", "setid.mat"):
        (site / name).write_bytes((src / name).read_bytes())
    files = {n: _md5(site / n) for n in (ARCHIVE, "imagelabels.mat", "setid.mat")}
    return site, files


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.endswith("/cut/" + ARCHIVE):  # announce 100 kB, send 1 kB, hang up
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\0" * 1000)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # a proxy configured on the test machine must not intercept 127.0.0.1
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture
def serve():
    """serve(folder) -> (base_url, list of request paths); servers stop after the test."""
    servers = []

    def start(folder: Path):
        handler = type("H", (_Quiet,), {"requests": []})
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/", handler.requests

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_download_and_load(tmp_path, serve):
    site, files = _make_mirror(tmp_path)
    url, requests = serve(site)
    root = tmp_path / "data"
    assert download_flowers102(root, base_url=url, files=files, timeout=5, progress=False) == root
    ds = load_vgg(root)
    src = load_vgg(tmp_path / "src")
    assert np.array_equal(ds.labels, src.labels) and len(ds.paths) == 12
    assert all(np.array_equal(ds.setid[k], src.setid[k]) for k in src.setid)
    assert not [n for n in _leftovers(root) if n.startswith(".tmp")]
    assert not (root / ARCHIVE).exists()  # unpacked, then dropped
    assert not (root / "class_names.json").exists()  # 3 classes: the 102 names would mislabel
    assert len(requests) == 3

    # idempotent: everything verified in place, nothing fetched again
    download_flowers102(root, base_url=url, files=files, timeout=5, progress=False)
    assert len(requests) == 3
    # a corrupted .mat is noticed and fetched again
    (root / "setid.mat").write_bytes(b"garbage")
    download_flowers102(root, base_url=url, files=files, timeout=5, progress=False)
    assert requests[3:] == ["/setid.mat"] and load_vgg(root)


def test_download_writes_class_names_for_102_classes(tmp_path, serve):
    site, files = _make_mirror(tmp_path, num_classes=102, per_class=3, size=8)
    url, _ = serve(site)
    root = download_flowers102(tmp_path / "data", base_url=url, files=files, timeout=5, progress=False)
    assert load_vgg(root).class_names == class_names()
    assert (root / "class_names.json").is_file()


@pytest.mark.parametrize("bad", [ARCHIVE, "setid.mat"])
def test_bad_checksum_leaves_nothing(tmp_path, serve, bad):
    site, files = _make_mirror(tmp_path)
    url, _ = serve(site)
    root = tmp_path / "data"
    files[bad] = "0" * 32
    with pytest.raises(DataError, match=rf"checksum mismatch for {bad}: expected 0{{32}}, got [0-9a-f]{{32}}.*discarded"):
        download_flowers102(root, base_url=url, files=files, timeout=5, progress=False)
    # all files are verified before any is installed: the folder is as empty as before
    assert _leftovers(root) == []


def test_http_404_leaves_nothing(tmp_path, serve):
    site, files = _make_mirror(tmp_path)
    url, _ = serve(site)
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"download of 102flowers\.tgz from .*missing/.*failed.*404"):
        download_flowers102(root, base_url=url + "missing/", files=files, timeout=5, progress=False)
    assert _leftovers(root) == []


def test_interrupted_body_leaves_nothing(tmp_path, serve):
    site, files = _make_mirror(tmp_path)
    url, _ = serve(site)
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"102flowers\.tgz.*interrupted \(1000 of 100000 bytes\)"):
        download_flowers102(root, base_url=url + "cut/", files={ARCHIVE: files[ARCHIVE]}, timeout=5, progress=False)
    assert _leftovers(root) == []


def test_unreachable_server(tmp_path):
    with pytest.raises(DataError, match="failed"):
        download_flowers102(tmp_path / "d", base_url="http://127.0.0.1:9/", timeout=2, progress=False)
    assert _leftovers(tmp_path / "d") == []


def _tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(
    "members, match",
    [
        ({"jpg/image_00001.jpg": b"x", "../evil.txt": b"pwned"}, "unsafe"),
        # the stdlib's data filter (Python >= 3.11.4) unpacks it inside the folder, our own check (older
        # Pythons, e.g. Debian's 3.11.2) refuses it: both end in an error and nothing outside the folder
        ({"/tmp/abs-evil.txt": b"pwned"}, "no jpg/ folder|unsafe entry '/tmp/abs-evil.txt'"),
        ({"images/image_00001.jpg": b"x"}, "no jpg/ folder"),
    ],
)
def test_bad_archives(tmp_path, serve, members, match):
    site = tmp_path / "site"
    site.mkdir()
    (site / ARCHIVE).write_bytes(_tgz(members))
    url, _ = serve(site)
    root = tmp_path / "data"
    with pytest.raises(DataError, match=match):
        download_flowers102(root, base_url=url, files={ARCHIVE: _md5(site / ARCHIVE)}, timeout=5, progress=False)
    assert _leftovers(root) == []
    assert not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/abs-evil.txt").exists()
