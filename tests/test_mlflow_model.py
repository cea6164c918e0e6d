"""Registered versions are MLflow Models (pyfunc from code, ONNX flavor for the student), pickle-free
and checksum-verified: a tampered artifact is refused and its payload never runs."""
from __future__ import annotations

import base64
import json
import os
import platform
import pickle
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import free_port
from flowers.registry import governance as G
from flowers.registry import flavor as MM
from flowers.registry import uris as R
from flowers.registry import tracking as T
from flowers.models.checkpoint import (MANIFEST, PER_IMAGE, WEIGHTS, ModelLoadError, load_checkpoint, read_manifest,
                                update_manifest, write_checkpoint_folder)
from flowers.inference.predict import Predictor, load_model


class Payload:
    """Unpickling this creates `marker`: the code a malicious artifact would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def folder(trained_checkpoint, tmp_path_factory) -> Path:
    return write_checkpoint_folder(load_checkpoint(trained_checkpoint), tmp_path_factory.mktemp("m") / MM.FOLDER)


def _images(synth_root: Path, n: int = 3) -> list[bytes]:
    return [p.read_bytes() for p in sorted((synth_root / "jpg").glob("*.jpg"))[:n]]


def test_model_folder_is_safetensors_plus_json(folder, trained_checkpoint, synth_root):
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, WEIGHTS, PER_IMAGE])
    manifest = read_manifest(folder)
    assert manifest["file"] == WEIGHTS and set(manifest["sha256"]) == {WEIGHTS, PER_IMAGE}
    assert "optimizer" not in json.dumps(manifest) and manifest["lineage"]["split_hash"]
    assert not (folder / WEIGHTS).read_bytes().startswith(b"\x80")  # not a pickle stream
    # same predictions as the training checkpoint it came from
    imgs = _images(synth_root)
    a, b = Predictor.from_uri(folder).predict(imgs), Predictor.from_uri(trained_checkpoint).predict(imgs)
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert np.allclose([r["confidence"] for r in a], [r["confidence"] for r in b], atol=1e-6)


def test_training_checkpoint_loads_with_weights_only(trained_run):
    ckpt = load_checkpoint(trained_run.run_dir / "last.pt")  # the --resume file: optimizer and scheduler too
    assert {"optimizer", "scheduler", "history"} <= set(ckpt)


def _refused(uri, marker: Path, match: str) -> None:
    """`uri` (or a call that loads one) is refused with `match`, and the payload never ran."""
    with pytest.raises(ModelLoadError, match=match):
        uri() if callable(uri) else load_model(uri)
    assert not marker.exists(), "the pickle payload ran"


def test_tampered_artifacts_are_refused_and_run_nothing(folder, tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Payload(marker))
    pickle.loads(evil)  # the payload works: it creates the marker when unpickled
    assert marker.exists()
    marker.unlink()

    # 1. a pickle dropped in place of the weights: the checksum no longer matches
    bad = tmp_path / "swapped" / MM.FOLDER
    bad.parent.mkdir()
    import shutil

    shutil.copytree(folder, bad)
    (bad / WEIGHTS).write_bytes(evil)
    _refused(bad, marker, "checksum mismatch for 'model.safetensors'")
    # ... and through the pyfunc too
    with pytest.raises(Exception, match="checksum mismatch"):
        MM.pyfunc_model().load_context(type("Ctx", (), {"artifacts": {MM.FOLDER: str(bad)}})())
    assert not marker.exists()

    # 2. the attacker also rewrites the manifest's checksums: safetensors still cannot be a pickle
    update_manifest(bad)
    _refused(bad, marker, "cannot read weights")

    # 3. the manifest names a pickle checkpoint instead: torch.load(weights_only=True) refuses it
    (bad / "evil.pt").write_bytes(evil)
    update_manifest(bad, file="evil.pt")
    _refused(bad, marker, "not a plain flowers checkpoint")
    torch.save({"format": "flowers.models.checkpoint/1", "model": Payload(marker)}, bad / "evil.pt")  # zip format too
    update_manifest(bad, file="evil.pt")
    _refused(bad, marker, "not a plain flowers checkpoint")

    # 4. a bare best.pt carrying a payload
    (tmp_path / "best.pt").write_bytes(evil)
    _refused(tmp_path / "best.pt", marker, "not a plain flowers checkpoint")

    # 5. a manifest without checksums, and one naming a file outside the folder
    m = read_manifest(bad)
    (bad / MANIFEST).write_text(json.dumps({k: v for k, v in m.items() if k != "sha256"}))
    _refused(bad, marker, "lists no SHA-256")
    (bad / MANIFEST).write_text(json.dumps({**m, "sha256": {**m["sha256"], "../best.pt": "0" * 64}}))
    _refused(bad, marker, "outside the model folder")


def test_registry_pins_the_manifest(trained_run, tmp_path, monkeypatch):
    """A version whose manifest and files were rewritten consistently is still refused: the registry
    recorded the manifest's checksum at registration."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old = mlflow.get_tracking_uri()
    target = R.embedded_target(tmp_path / "store")
    try:
        T.configure(target)
        tr = T.StudyTracker("pin", target)
        run = tr.child("l1", "trial")
        v = tr.log_model_dir(run, trained_run.run_dir, "model", "pinned", alias=R.CHAMPION)
        tr.finish(run)
        assert tr.client.get_model_version("pinned", v).tags[R.MANIFEST_TAG]
        assert load_model("models:/pinned@champion", target=target).version == v
        local = Path(tr.client.get_model_version_download_uri("pinned", v).removeprefix("file://"))
        stored = local / MM.FOLDER_PATH
        update_manifest(stored, test_accuracy=0.99)  # consistent checksums, different manifest
        marker = tmp_path / "pwned"
        _refused(lambda: load_model("models:/pinned@champion", target=target), marker,
                 "does not match the checksum the registry recorded")
    finally:
        mlflow.set_tracking_uri(old)


def test_pyfunc_from_code_signature_and_predictions(folder, synth_root, tmp_path):
    out = MM.save(folder, tmp_path / "mlmodel", metadata={"kind": "checkpoint"})
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert f"{MM.FOLDER_PATH}/{WEIGHTS}" in files and "flowers_pyfunc.py" in files
    # what the pyfunc needs travels with it: the flowers code (no bytecode) and pinned third-party requirements
    assert {"code/flowers/inference/predict.py", "code/flowers/registry/flavor.py"} <= files
    assert not [f for f in files if "__pycache__" in f]
    reqs = (out / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in [r.split("+")[0] for r in reqs]
    assert {r.split("==")[0] for r in reqs} >= {"mlflow", "torch", "onnxruntime", "pyyaml", "tqdm", "safetensors"}
    meta = mlflow.models.Model.load(str(out / "MLmodel"))
    assert meta.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert meta.signature.inputs.input_names() == ["image"]
    assert meta.signature.outputs.input_names() == list(MM.OUTPUT_COLUMNS)
    example = json.loads((out / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]

    pm = mlflow.pyfunc.load_model(str(out))
    imgs = _images(synth_root)
    got = pm.predict(pd.DataFrame({"image": imgs + [b"not an image"]}))
    want = Predictor.from_uri(folder).predict(imgs)
    assert got["label"].tolist()[:3] == [r["label"] for r in want]
    assert got["name"].tolist()[:3] == [r["name"] for r in want]
    assert got["label"].iloc[3] == -1 and "not a recognised image" in got["error"].iloc[3]


def _pyenv() -> str | None:
    """pyenv, which MLflow's default (virtualenv) environment manager needs: on PATH or in ~/.pyenv."""
    import shutil

    home = Path.home() / ".pyenv" / "bin" / "pyenv"
    return shutil.which("pyenv") or (str(home) if home.is_file() else None)


def _serve(uri: str, tracking: str, port: int, log: Path, env_manager: str | None = "local") -> subprocess.Popen:
    # as in an activated environment: MLflow execs `uvicorn` from PATH
    extra = [str(Path(sys.executable).parent)] + ([str(Path(_pyenv()).parent)] if env_manager is None else [])
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking,
           "PATH": os.pathsep.join([*extra, os.environ.get("PATH", "")])}
    manager = ["--env-manager", env_manager] if env_manager else []  # None: MLflow's default (virtualenv)
    return subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, *manager,
                             "-h", "127.0.0.1", "-p", str(port), "--workers", "1"], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def registered_student(mlflow_server, trained_checkpoint, tmp_path_factory) -> Path:
    """An exported student registered through the study's code path as flowers-student@champion."""
    from flowers.inference.export import export_student

    student = export_student(trained_checkpoint, tmp_path_factory.mktemp("student") / "student",
                             [torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)], 0.5, calibration_size=4,
                             torchscript=False, dynamic=False)
    old = mlflow.get_tracking_uri()
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    target = R.resolve_target(mlflow_server)
    try:
        T.configure(target)
        tr = T.StudyTracker("serve-student", target)
        run = tr.child("l5", "stage")
        version = tr.log_model_dir(run, student, "model", "flowers-student")  # the study's code path
        tr.finish(run)
        G.decide("flowers-student", version, mlflow_server, force=True)  # whatever other tests registered
        onnx_model = mlflow.onnx.load_model(f"models:/flowers-student/{version}")  # the ONNX flavor
        assert onnx_model.graph.input[0].name == "images"
    finally:
        mlflow.set_tracking_uri(old)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
    return student


@pytest.mark.slow
def test_mlflow_models_serve_answers_for_the_student(mlflow_server, registered_student, synth_root, tmp_path):
    """`mlflow models serve -m models:/flowers-student@champion` answers over HTTP on loopback."""
    _serve_and_ask(mlflow_server, registered_student, synth_root, tmp_path, "local", 180)


@pytest.mark.slow
def test_mlflow_models_serve_with_the_default_environment_manager(mlflow_server, registered_student, synth_root,
                                                                  tmp_path):
    """The same with MLflow's default environment manager (virtualenv): a new environment from the model's
    python_env.yaml (pyenv's Python) and requirements.txt (pinned, from the package indexes pip is set up
    with), the flowers code from the model's own `code/` folder. Costly the first time on a machine (the
    pinned torch build and its libraries, about 6 GB; MLflow keeps the environment under ~/.mlflow/envs)."""
    if _pyenv() is None:  # a system tool MLflow needs for this manager, not a dependency of the project
        pytest.skip("MLflow's virtualenv environment manager needs pyenv (not on PATH, not in ~/.pyenv)")
    # the model's python_env.yaml names this interpreter's version; pyenv would download it when it does not
    # have it, and the test machines reach only the package indexes (Debian's 3.11.2 is not a pyenv build)
    have = subprocess.run([_pyenv(), "versions", "--bare"], capture_output=True, text=True).stdout.split()
    if platform.python_version() not in have:
        pytest.skip(f"pyenv has no Python {platform.python_version()} (it has {', '.join(have) or 'none'}) and "
                    "would download it; this test runs where the venv's Python is a pyenv build")
    _serve_and_ask(mlflow_server, registered_student, synth_root, tmp_path, None, 1500)


def _serve_and_ask(mlflow_server: str, student: Path, synth_root: Path, tmp_path: Path, env_manager: str | None,
                   start_s: float) -> None:
    port = free_port()
    proc = _serve("models:/flowers-student@champion", mlflow_server, port, tmp_path / "serve.log", env_manager)
    try:
        deadline = time.time() + start_s
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        else:
            pytest.fail("mlflow models serve did not start: " + (tmp_path / "serve.log").read_text()[-3000:])
        imgs = _images(synth_root, 2)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in imgs]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            got = json.loads(r.read())["predictions"]
        want = Predictor.from_uri(student).predict(imgs)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert {"label", "name", "confidence", "entropy", "uncertain"} <= set(got[0])
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except ProcessLookupError:  # it had already exited (the assertion above says why)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
