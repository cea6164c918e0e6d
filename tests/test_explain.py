"""Interpretability: Grad-CAM map shape/range, localisation on images with known objects, attention
maps, `flowers explain` files and errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowers.cli.main import main
from flowers.data.transforms import Preprocessing
from flowers.inference.explain import attention_maps, gradcam_maps
from flowers.models import build_model, model_spec
from flowers.inference.predict import TorchProbModel

SIZE = 128


def _scenes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int, int]]]:
    """uint8 images of a red (class 0) or blue (class 1) disc on a noisy background, each disc in a
    random quadrant (never at the centre); returns images, labels and each disc's box (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images, labels, boxes = [], [], []
    for i in range(n):
        label = i % 2
        img = rng.integers(30, 110, (SIZE, SIZE, 3)).astype(np.uint8)
        q = int(rng.integers(0, 4))
        cx = SIZE // 4 + (SIZE // 2) * (q % 2) + int(rng.integers(-6, 7))
        cy = SIZE // 4 + (SIZE // 2) * (q // 2) + int(rng.integers(-6, 7))
        r = int(rng.integers(12, 18))
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (230, 40, 40) if label == 0 else (40, 90, 230)
        images.append(img.transpose(2, 0, 1))
        labels.append(label)
        boxes.append((cx - r, cy - r, cx + r, cy + r))
    return torch.from_numpy(np.stack(images)), torch.tensor(labels), boxes


def localised(maps: np.ndarray, boxes, margin: int = 8) -> float:
    """Share of maps whose hot region (>= half the maximum) has its centroid on the object's box
    (grown by `margin` px). A constant map's hot region is the whole image, whose centroid is the
    centre: never on an off-centre object, as a centred blob's is not."""
    yy, xx = np.mgrid[: maps.shape[1], : maps.shape[2]]
    hits = []
    for m, (x0, y0, x1, y1) in zip(maps, boxes):
        hot = np.where(m >= 0.5 * m.max(), m, 0.0) if m.max() > m.min() + 1e-6 else np.ones_like(m)
        cx, cy = (hot * xx).sum() / hot.sum(), (hot * yy).sum() / hot.sum()
        hits.append(x0 - margin <= cx <= x1 + margin and y0 - margin <= cy <= y1 + margin)
    return float(np.mean(hits))


@pytest.fixture(scope="module")
def disc_model():
    """L3's architecture (attention pooling over offline-pretrained EfficientNet-Lite0) trained a few
    steps to tell red from blue discs; the colour is only on the disc, so a faithful map must find it."""
    torch.manual_seed(0)
    name = "attention_efficientnet_lite0"
    spec = model_spec(name)
    mod = TorchProbModel(build_model(name, num_classes=2, pretrained="packaged"),
                         Preprocessing.for_size(SIZE, spec.mean, spec.std))
    x, y, _ = _scenes(64, seed=0)
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-3)
    mod.train()
    for _ in range(6):
        idx = torch.randint(0, len(x), (16,))
        loss = torch.nn.functional.cross_entropy(mod(x[idx].float()), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mod.eval()


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


@pytest.mark.slow
def test_gradcam_and_attention_find_the_object(disc_model):
    x, y, boxes = _scenes(32, seed=1)  # held-out images, objects at known places
    with torch.inference_mode():
        assert (disc_model(x.float()).argmax(1) == y).float().mean() >= 0.9
    cam = gradcam_maps(disc_model, x, targets=y.tolist())
    att = attention_maps(disc_model, x)
    assert localised(cam, boxes) >= 0.8
    assert localised(att, boxes) >= 0.8
    # the criterion can fail: a constant map, a centred blob, or the right maps on the wrong images do
    yy, xx = np.mgrid[:SIZE, :SIZE]
    centred = np.exp(-((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2) / (2 * 20.0 ** 2))
    assert localised(np.ones_like(cam), boxes) == 0.0
    assert localised(np.repeat(centred[None], len(cam), 0).astype(np.float32), boxes) == 0.0
    assert localised(cam[::-1], boxes) <= 0.5 and localised(np.flip(cam, axis=2), boxes) <= 0.5


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
