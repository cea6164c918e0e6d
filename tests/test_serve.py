"""Ray Serve app over real HTTP: shapes, bad input, batching, live reconfigure, model swap.

One Serve instance on loopback for the module, on the shared `ray_session`; both endpoints
serve the smoke-trained checkpoint (the real ensemble/student plug in by URI).
"""
from __future__ import annotations

import concurrent.futures as cf
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
from conftest import free_port

BODY_LIMIT = 6_000_000  # above gRPC's 4 MiB default message size (see test_large_image_under_limit)
APP = "flowers-test"
# 0.5 CPU per model replica leaves room for a surge replica during the swap test on 2 CPUs
MODEL_OPTS = {"num_replicas": 1, "max_ongoing_requests": 16, "max_surge_percent": 100,
              "ray_actor_options": {"num_cpus": 0.5}}


def _opts(batch: int = 8, wait: float = 0.2) -> dict:
    return {"Ensemble": {**MODEL_OPTS, "user_config": {"max_batch_size": batch, "batch_wait_timeout_s": wait}},
            "Student": {**MODEL_OPTS, "user_config": {"max_batch_size": batch, "batch_wait_timeout_s": wait}}}


def _args(ckpt: Path, **kw) -> dict:
    return {"ensemble_uri": str(ckpt), "student_uri": str(ckpt), "max_body_bytes": BODY_LIMIT, **kw}


@pytest.fixture(scope="module")
def served(ray_session, trained_checkpoint):
    from ray import serve

    from serve.app import make_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(make_app(_args(trained_checkpoint), _opts()), name=APP, route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, trained_checkpoint
    serve.delete(APP)
    serve.shutdown()  # Serve's controller and proxy only; the session's Ray stays up


@pytest.fixture(scope="module")
def jpegs(synth_root) -> list[bytes]:
    return [p.read_bytes() for p in sorted((synth_root / "jpg").glob("*.jpg"))[:12]]


def _class_names(ckpt: Path) -> list[str]:
    import torch

    return list(torch.load(ckpt, map_location="cpu", weights_only=False)["class_names"])


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares 10^10 pixels: must be refused before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _post(client, path: str, data: bytes, ctype: str = "image/jpeg", **kw):
    return client.post(path, content=data, headers={"content-type": ctype}, **kw)


def test_predict_response_shape_labels_and_names(served, jpegs):
    client, ckpt = served
    names = _class_names(ckpt)
    for model in ("ensemble", "student"):
        r = _post(client, f"/v1/predict/{model}?top_k=3", jpegs[0])
        assert r.status_code == 200, r.text
        body = r.json()
        assert {"model", "version", "top_k", "label", "name", "entropy", "uncertain", "latency_ms",
                "batch_size"} <= set(body)
        assert body["route"] == model and body["model"]
        assert len(body["top_k"]) == 3
        probs = [t["probability"] for t in body["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
        for t in body["top_k"]:
            assert names[t["label"]] == t["name"]
        assert body["label"] == body["top_k"][0]["label"] and body["name"] == names[body["label"]]
        assert 0.0 <= body["entropy"] <= 1.0 and isinstance(body["uncertain"], bool)
        assert body["latency_ms"] > 0
    # multipart upload gives the same answer as raw bytes
    raw = _post(client, "/v1/predict/student", jpegs[1]).json()
    r = client.post("/v1/predict/student", files={"file": ("flower.jpg", jpegs[1], "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.json()["top_k"] == raw["top_k"] and len(raw["top_k"]) == min(5, len(names))


@pytest.mark.parametrize("case, status, needle", [
    ("empty", 400, "empty body"),
    ("not_image", 400, "not a recognised image"),
    ("truncated", 400, "truncated"),
    ("bomb", 400, "pixel limit"),
    ("too_large", 413, "byte limit"),
    ("content_type", 415, "unsupported content type"),
    ("multipart_type", 415, "unsupported file type"),
    ("unknown_model", 404, "unknown model"),
    ("unknown_route", 404, "no route"),
    ("bad_top_k", 400, "top_k"),
])
def test_bad_input_gives_json_error_and_replica_keeps_serving(served, jpegs, case, status, needle):
    client, _ = served
    good = jpegs[2]
    r = {
        "empty": lambda: _post(client, "/v1/predict/ensemble", b""),
        "not_image": lambda: _post(client, "/v1/predict/ensemble", b"hello, this is not a flower" * 10),
        "truncated": lambda: _post(client, "/v1/predict/ensemble", good[: len(good) // 2]),
        "bomb": lambda: _post(client, "/v1/predict/ensemble", _png_bomb(), "image/png"),
        "too_large": lambda: _post(client, "/v1/predict/ensemble", b"\xff" * (BODY_LIMIT + 1)),
        "content_type": lambda: _post(client, "/v1/predict/ensemble", good, "text/plain"),
        "multipart_type": lambda: client.post("/v1/predict/student", files={"file": ("a.txt", b"hi", "text/plain")}),
        "unknown_model": lambda: _post(client, "/v1/predict/resnet9000", good),
        "unknown_route": lambda: client.get("/v2/nothing"),
        "bad_top_k": lambda: _post(client, "/v1/predict/ensemble?top_k=zero", good),
    }[case]()
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and needle in body["error"], body
    after = _post(client, "/v1/predict/ensemble", good)  # the replica still serves
    assert after.status_code == 200 and after.json()["top_k"]


def _noise_jpeg(min_bytes: int) -> bytes:
    """A real (noise) JPEG of at least `min_bytes`: too big for gRPC's default 4 MiB message."""
    import io

    import numpy as np
    from PIL import Image

    side = 1200
    while True:
        pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=95)
        if buf.tell() >= min_bytes:
            return buf.getvalue()
        side += 200


def test_large_image_under_limit_crosses_the_ensemble_hop(served):
    """A 4.5+ MB image (under the 6 MB limit) reaches the Ensemble replica over gRPC and back."""
    client, _ = served
    big = _noise_jpeg(4_500_000)
    assert 4 * 1024 * 1024 < len(big) < BODY_LIMIT
    for model in ("ensemble", "student"):
        r = _post(client, f"/v1/predict/{model}", big)
        assert r.status_code == 200, r.text
        assert r.json()["top_k"]


def test_python_fallback_proxy_serves_the_same_app(served, jpegs):
    """HAProxy is the front; Ray's Python proxy on the fallback port answers identically."""
    import os

    client, _ = served
    fallback = int(os.environ["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"])
    via_haproxy = _post(client, "/v1/predict/student?top_k=3", jpegs[5])
    with httpx.Client(base_url=f"http://127.0.0.1:{fallback}", timeout=60) as direct:
        via_python = _post(direct, "/v1/predict/student?top_k=3", jpegs[5])
        assert direct.get("/healthz").json()["status"] == "ok"
    assert via_haproxy.status_code == via_python.status_code == 200
    assert via_haproxy.json()["top_k"] == via_python.json()["top_k"]


def test_chunked_body_over_limit_is_413(served):
    client, _ = served

    def gen():  # no Content-Length: the limit is enforced while reading
        for _ in range(5):
            yield b"\xff" * (BODY_LIMIT // 4)

    r = client.post("/v1/predict/student", content=gen(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 413 and "byte limit" in r.json()["error"]


def test_concurrent_requests_batch_and_bad_item_fails_alone(served, jpegs):
    """8 concurrent requests (one truncated) form batches (batch wait 0.2 s)."""
    client, _ = served
    bodies = jpegs[:7] + [jpegs[7][:200]]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        rs = list(pool.map(lambda b: _post(client, "/v1/predict/ensemble", b), bodies))
    assert [r.status_code for r in rs] == [200] * 7 + [400], [r.text for r in rs]
    assert "truncated" in rs[-1].json()["error"]
    sizes = [r.json()["batch_size"] for r in rs[:7]]
    assert max(sizes) > 1, sizes
    seen = client.get("/v1/models").json()["models"][0]["batch_sizes_seen"]
    assert any(int(k) > 1 for k in seen), seen


def test_compare_models_and_health(served, jpegs):
    client, ckpt = served
    r = _post(client, "/v1/compare", jpegs[3])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["agree"] is True  # same checkpoint behind both routes
    assert body["ensemble"]["label"] == body["student"]["label"]
    assert body["ensemble"]["latency_ms"] > 0 and body["student"]["latency_ms"] > 0
    assert _post(client, "/v1/compare", b"junk").status_code == 400

    models = client.get("/v1/models").json()
    assert [m["route"] for m in models["models"]] == ["ensemble", "student"]
    for m in models["models"]:
        assert m["uri"] == str(ckpt) and m["num_classes"] == len(_class_names(ckpt))
        assert {"name", "version", "alias", "test_accuracy", "max_batch_size"} <= set(m)
        # batching was chosen for this machine at start-up, and the replica runs what was chosen
        b = m["batching"]
        assert b["source"] in ("calibrated", "config") and b["reason"] and b["cpu"]
        assert 1 <= b["max_batch_size"] <= 16 and m["max_batch_size"] == b["max_batch_size"]
        if b["source"] == "calibrated":
            assert b["table"] and all(r["ms_per_image"] > 0 for r in b["table"])
    assert models["max_body_bytes"] == BODY_LIMIT

    h = client.get("/healthz")
    assert h.status_code == 200 and h.json() == {"status": "ok", "models": {"ensemble": "ok", "student": "ok"}}


@pytest.mark.slow
def test_live_reconfigure_then_model_swap_without_dropped_requests(served, jpegs, trained_checkpoint, tmp_path):
    from ray import serve

    from serve.app import make_app

    client, ckpt = served
    before = client.get("/v1/models").json()["models"][0]
    # 1) user_config change: same replica (same observed-batch history), new batching
    serve.run(make_app(_args(ckpt), _opts(batch=1, wait=0.0)), name=APP, route_prefix="/")
    after = client.get("/v1/models").json()["models"][0]
    assert (after["max_batch_size"], after["batch_wait_timeout_s"]) == (1, 0.0)
    assert after["batch_sizes_seen"] == before["batch_sizes_seen"]  # not restarted
    with cf.ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda b: _post(client, "/v1/predict/ensemble", b), jpegs[:4]))
    assert all(r.status_code == 200 and r.json()["batch_size"] == 1 for r in rs)

    # 2) new model URI (as after an alias move): rolling update while requests keep coming
    swapped = tmp_path / "swapped.pt"
    swapped.write_bytes(Path(trained_checkpoint).read_bytes())
    stop, codes = threading.Event(), []

    def hammer() -> None:
        while not stop.is_set():
            codes.append(_post(client, "/v1/predict/student", jpegs[4]).status_code)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        serve.run(make_app(_args(ckpt, student_uri=str(swapped)), _opts()), name=APP, route_prefix="/")
        deadline = time.time() + 60
        while time.time() < deadline:
            uris = [m["uri"] for m in client.get("/v1/models").json()["models"]]
            if uris[1] == str(swapped):
                break
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    assert uris[1] == str(swapped) and uris[0] == str(ckpt)
    assert codes and set(codes) == {200}, codes


def test_config_yaml_builds_app():
    """serve/config.yaml is valid for `serve deploy` and for app_from_config (no Serve started)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from flowers.config import ConfigError
    from serve.app import app_from_config
    from serve.config import DEFAULT_CONFIG

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    ServeDeploySchema.model_validate(raw)
    assert raw["applications"][0]["import_path"] == "serve.app:build_app"
    spec = app_from_config(DEFAULT_CONFIG, {"student_uri": "/tmp/x.onnx"})
    assert spec.name == "flowers" and spec.args.student_uri == "/tmp/x.onnx"
    assert spec.args.ensemble_uri == "models:/flowers-ensemble@champion"
    assert spec.args.max_body_bytes == 10 * 1024 * 1024
    with pytest.raises(ConfigError, match="app args: unknown config key 'nonsense'"):
        app_from_config(DEFAULT_CONFIG, {"nonsense": 1})
    with pytest.raises(ConfigError, match="default_top_k in 1..102"):
        app_from_config(DEFAULT_CONFIG, {"default_top_k": 0})


@pytest.mark.parametrize("entry", ["flowers serve", "python -m jobs.deploy"])
def test_serve_and_deploy_reject_bad_uri_before_starting_ray(capsys, tmp_path, entry):
    import ray

    from flowers.cli.main import main
    from jobs.deploy import main as deploy_main

    argv = ["--ensemble", str(tmp_path / "nope"), "--student", str(tmp_path / "nope2")]
    started = ray.is_initialized()
    assert (main(["serve", *argv]) if entry == "flowers serve" else deploy_main(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model not found") and len(err.splitlines()) == 1
    assert ray.is_initialized() == started


def test_deploy_pins_aliases_by_default_and_serve_does_not():
    import argparse

    from serve.options import add_arguments, settings

    for pin, expected in ((False, False), (True, True)):
        p = argparse.ArgumentParser()
        add_arguments(p, pin=pin)
        assert settings(p.parse_args([])).pin is expected
    p = argparse.ArgumentParser()
    add_arguments(p, pin=True)
    s = settings(p.parse_args(["--no-pin", "--port", "9000", "--student", "x.onnx"]))
    assert (s.pin, s.port, s.student_uri, s.ensemble_uri, s.proxy) == (False, 9000, "x.onnx", None, "haproxy")
