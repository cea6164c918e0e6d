"""Datasets by URI: publish, materialise once per node (verified, atomic, shared under a lock),
against a local HTTP server and an S3-compatible server (moto) on loopback."""
from __future__ import annotations

import functools
import http.server
import json
import multiprocessing as mp
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from flowers import config as C
from flowers import storage
from flowers.data import DataError
from flowers.data.remote import MANIFEST_NAME, build_manifest, materialize, publish
from conftest import free_port


class _Counting(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).hits.append(self.path)
        super().do_GET()


@pytest.fixture()
def http_dataset(synth_root, tmp_path, monkeypatch):
    """The synthetic dataset published into a folder and served over HTTP on loopback."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    site = tmp_path / "site"
    publish(synth_root, str(site / "flowers"))
    _Counting.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Counting, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/flowers", site / "flowers"
    server.shutdown()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST_NAME}


def test_publish_writes_a_manifest_of_every_file(synth_root, tmp_path):
    manifest = publish(synth_root, str(tmp_path / "pub"))
    assert set(manifest["files"]) == set(_tree(synth_root))
    assert json.loads((tmp_path / "pub" / MANIFEST_NAME).read_text()) == manifest
    assert _tree(tmp_path / "pub") == _tree(synth_root)


def test_materialise_over_http_once_then_reuse(http_dataset, synth_root, tmp_path):
    uri, _ = http_dataset
    local = materialize(uri, tmp_path / "cache")
    assert _tree(local) == _tree(synth_root)
    first = len(_Counting.hits)
    assert first == len(build_manifest(synth_root)["files"]) + 1
    assert materialize(uri, tmp_path / "cache") == local
    assert len(_Counting.hits) == first + 1  # only the manifest again: the verified copy is reused


def _materialise_in_process(uri: str, cache: str, q) -> None:
    q.put(str(materialize(uri, Path(cache))))


def test_trials_starting_together_on_one_node_download_once(http_dataset, synth_root, tmp_path):
    uri, _ = http_dataset
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_materialise_in_process, args=(uri, str(tmp_path / "cache"), q)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    paths = {q.get(timeout=5) for _ in procs}
    assert len(paths) == 1
    n_files = len(build_manifest(synth_root)["files"])
    assert len([h for h in _Counting.hits if not h.endswith(MANIFEST_NAME)]) == n_files


def test_checksum_mismatch_is_one_error_and_nothing_half_written(http_dataset, tmp_path):
    uri, served = http_dataset
    victim = sorted((served / "jpg").glob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    with pytest.raises(DataError, match=f"{victim.name}: MD5 .* does not match"):
        materialize(uri, tmp_path / "cache")
    left = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert left == [], left


def test_a_crashed_download_is_cleaned_up_by_the_next_attempt(http_dataset, synth_root, tmp_path):
    uri, _ = http_dataset
    cache = tmp_path / "cache"
    materialize(uri, cache)
    (final,) = [p for p in cache.iterdir() if p.is_dir()]
    partial = cache / f".{final.name}.partial"
    shutil.move(final, partial)  # as if the process died before the final rename
    (partial / "jpg" / "junk").write_text("x")
    again = materialize(uri, cache)
    assert again == final and not partial.exists() and _tree(again) == _tree(synth_root)


def test_missing_dataset_says_how_to_publish(http_dataset, tmp_path):
    uri, _ = http_dataset
    with pytest.raises(DataError, match="HTTP 404.*flowers data publish"):
        materialize(uri + "-missing", tmp_path / "cache")


# ----------------------------------------------------------------------------- S3-compatible server (conftest: s3_server)


def test_publish_to_s3_and_train_data_from_the_uri(s3_server, synth_root, tmp_path, monkeypatch):
    from flowers.data.bundle import build_data
    from flowers.data.transforms import Preprocessing

    monkeypatch.setenv("FLOWERS_CACHE", str(tmp_path / "cache"))
    publish(synth_root, "s3://flowers/datasets/synth")
    data = build_data(C.DataConfig(root="s3://flowers/datasets/synth", split="official"), Preprocessing.for_size(64))
    assert "s3://flowers/datasets/synth" in data.source and len(data.train) > 0
    assert Path(data.train.paths[0]).is_file() and str(tmp_path / "cache") in str(data.train.paths[0])


def test_object_store_errors_are_one_line(s3_server, synth_root, monkeypatch):
    with pytest.raises(storage.StorageError, match="not usable"):
        storage.check_writable("s3://no-such-bucket/prefix")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")  # moto accepts any key; a closed port does not
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match="object store running") as e:
        storage.check_writable("s3://flowers/prefix")
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 60
