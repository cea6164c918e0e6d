"""The shared predictor: URI loading, preprocessing parity, per-item errors, CLI errors."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from flowers.data import open_image
from flowers.data.transforms import eval_transform
from flowers.models.checkpoint import ModelLoadError
from flowers.inference.predict import Predictor, load_model


def test_predictor_matches_the_training_eval_path(trained_checkpoint, synth_root):
    pred = Predictor.from_uri(trained_checkpoint)
    img_path = sorted((synth_root / "jpg").glob("*.jpg"))[0]
    out = pred.predict([img_path.read_bytes(), img_path], top_k=3)
    assert out[0]["label"] == out[1]["label"]
    assert out[0]["top_k"][0]["probability"] == pytest.approx(out[1]["top_k"][0]["probability"], abs=1e-6)
    assert len(out[0]["top_k"]) == 3 and out[0]["name"] == pred.class_names[out[0]["label"]]
    assert 0.0 <= out[0]["entropy"] <= 1.0 and isinstance(out[0]["uncertain"], bool)
    # same numbers as the loop's own eval: uint8 eval transform + model
    from flowers.models.checkpoint import load_checkpoint, model_from_checkpoint
    from flowers.data.transforms import Normalize, Preprocessing

    ckpt = load_checkpoint(trained_checkpoint)
    pp = Preprocessing.from_dict(ckpt["preprocessing"])
    x = eval_transform(pp)(open_image(img_path, draft_size=pp.resize_size))[None]
    with torch.inference_mode():
        p = torch.softmax(model_from_checkpoint(ckpt)(Normalize(pp.mean, pp.std)(x)), 1)[0].numpy()
    assert np.allclose(sorted(p)[::-1][:3], [t["probability"] for t in out[0]["top_k"]], atol=1e-5)


def test_bad_items_fail_alone(trained_checkpoint, synth_root):
    pred = Predictor.from_uri(trained_checkpoint)
    good = sorted((synth_root / "jpg").glob("*.jpg"))[0].read_bytes()
    out = pred.predict([b"", b"not an image", good[: len(good) // 3], good])
    assert all("error" in r for r in out[:3]) and "label" in out[3]


def test_model_dir_and_meta(trained_run):
    m = load_model(trained_run.run_dir)  # a run folder resolves to its best.pt
    assert m.meta["test_accuracy"] == pytest.approx(trained_run.test_metrics["top1"])
    assert m.predict_proba(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, len(m.class_names))


@pytest.mark.parametrize("uri, msg", [("/no/such/model.pt", "model not found"), ("models:/nope@champion", "cannot resolve model URI")])
def test_bad_uri_is_clear(uri, msg, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    with pytest.raises(ModelLoadError, match=msg):
        load_model(uri)


def test_cli_bad_uri_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flowers.cli.main", "predict", "x.jpg", "--model", str(tmp_path / "nope.pt")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: model not found") and "Traceback" not in r.stderr


def test_models_uri_without_any_store_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="no MLflow store.*make run"):
        load_model("models:/flowers-l1@champion")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".flowers").exists()
