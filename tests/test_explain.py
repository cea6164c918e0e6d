"""Interpretability: Grad-CAM map shape/range, attention maps, `flowers explain` files and errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowers.cli import main
from flowers.data.transforms import Preprocessing
from flowers.explain import attention_maps, gradcam_maps
from flowers.models import build_model
from flowers.predict import TorchProbModel


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "attention_resnet18"])
def test_gradcam_shape_and_range(name):
    torch.manual_seed(0)
    net = build_model(name, num_classes=4, pretrained=False)
    mod = TorchProbModel(net, Preprocessing.for_size(64)).eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    maps = gradcam_maps(mod, x, targets=[1, 2])
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    att = attention_maps(mod, x)
    if net.spec.attention:
        assert att.shape == (2, 64, 64) and att.min() >= 0 and att.max() <= 1
    else:
        assert att is None


def test_explain_cli_writes_files(trained_checkpoint, synth_root, tmp_path, capsys):
    imgs = sorted((synth_root / "jpg").glob("*.jpg"))[:2]
    rc = main(["explain", *map(str, imgs), "--model", str(trained_checkpoint), "--out", str(tmp_path / "x")])
    assert rc == 0
    recs = json.loads((tmp_path / "x" / "explanations.json").read_text())
    assert len(recs) == 2 and all((tmp_path / "x" / f"{p.stem}_explain.png").stat().st_size > 0 for p in imgs)
    assert {"name", "confidence", "entropy", "uncertain", "explanation"} <= set(recs[0])


def test_bad_model_uri_is_one_line_error(synth_root, tmp_path, capsys):
    img = str(sorted((synth_root / "jpg").glob("*.jpg"))[0])
    for cmd in (["explain", img, "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                ["ensemble", "--members", str(tmp_path / "nope"), "--out", str(tmp_path / "e")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "nope" in err and len(err.splitlines()) == 1
