"""The explain route's core without Serve: which network Grad-CAM runs on, and what it answers.

The INT8 ONNX student has no gradients; the explainer falls back to the fp32 checkpoint its
manifest names, and says why there is none (501 over HTTP) when that file is not reachable.
A stand-in for the ONNX model (a LoadedModel without a torch module) keeps this a unit test;
tests/test_web.py covers the route over HTTP.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest


def _onnx_like(source_checkpoint: str):
    from flowers.data.transforms import Preprocessing
    from flowers.inference.predict import LoadedModel

    return LoadedModel(predict_proba=lambda x: np.full((len(x), 5), 0.2, dtype=np.float32),
                       preprocessing=Preprocessing.for_size(64), class_names=[f"c{i}" for i in range(5)],
                       name="flowers-student", version="3",
                       meta={"kind": "onnx", "source_checkpoint": source_checkpoint})


def test_onnx_student_is_explained_through_its_source_checkpoint(monkeypatch, trained_checkpoint):
    from flowers.inference import predict
    from serve import explainer

    real = predict.load_model
    monkeypatch.setattr(explainer, "load_model",
                        lambda uri: _onnx_like(str(trained_checkpoint)) if uri == "student.onnx" else real(uri))
    served, net, what = explainer.explainable("student.onnx")
    assert served.name == "flowers-student" and net is not None and net.module is not None
    assert what == f"fp32 source checkpoint of flowers-student ({trained_checkpoint.name})"


def test_onnx_student_without_its_source_has_no_explanation(monkeypatch, tmp_path):
    from serve import explainer

    monkeypatch.setattr(explainer, "load_model", lambda uri: _onnx_like(str(tmp_path / "gone.pt")))
    served, net, what = explainer.explainable("student.onnx")
    assert net is None and "no PyTorch network to take gradients from" in what


def test_gradcam_png_answers_a_png_and_refuses_bad_input(trained_checkpoint, synth_root):
    from PIL import Image

    from flowers.inference.predict import load_model
    from serve.explainer import DISPLAY_PX, ExplainError, gradcam_png

    model = load_model(trained_checkpoint)
    jpeg = sorted((synth_root / "jpg").glob("*.jpg"))[0].read_bytes()
    out = gradcam_png(model, jpeg, None)
    png = Image.open(io.BytesIO(base64.b64decode(out["png_base64"])))
    assert png.format == "PNG" and png.size == (DISPLAY_PX, DISPLAY_PX) and png.mode == "RGB"
    assert out["name"] == model.class_names[out["label"]] and 0 <= out["probability"] <= 1 and out["maps"] == 1
    assert gradcam_png(model, jpeg, 3)["label"] == 3
    with pytest.raises(ExplainError, match="not a recognised image") as e:
        gradcam_png(model, b"<svg/>" * 20, None)
    assert e.value.status == 400
    with pytest.raises(ExplainError, match=r"label: must be a class index in 0\.\.4, got 5"):
        gradcam_png(model, jpeg, 5)
