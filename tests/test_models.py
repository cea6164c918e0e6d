"""Model registry: every model runs forward/backward on CPU; weights loading paths; specs.

No network, whether or not the machine has one: every torchvision weights URL points at a
closed port on loopback and the download cache is an empty folder, so a download attempt runs
torchvision's real code and fails the same way everywhere.
"""

from __future__ import annotations

import socket

import pytest
import numpy as np
import torch
import torchvision

from flowers import models
from flowers.models import (
    AttentionNet,
    FlowerNet,
    ModelError,
    build_model,
    count_parameters,
    list_models,
    model_spec,
)

REQUIRED = [
    "resnet50",
    "resnet18",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "efficientnet_lite0",
    "efficientnet_lite2",
    "attention_resnet50",
    "attention_efficientnet_lite0",
    "attention_mobilenet_v3_large",
]


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_download(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Every torchvision weights URL → a closed local port; the weights cache → an empty folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    port = _closed_port()
    for arch in torchvision.models.list_models():
        for weights in torchvision.models.get_model_weights(arch):
            monkeypatch.setattr(weights.value, "url",
                                f"http://127.0.0.1:{port}/{weights.value.url.rsplit('/', 1)[-1]}")


def test_registry_lists_all_names() -> None:
    names = list_models()
    assert set(REQUIRED) <= set(names)
    assert len(names) == len(set(names))
    backbones = [n for n in names if not n.startswith("attention_")]
    assert {f"attention_{b}" for b in backbones} <= set(names)
    assert list_models("attention_*") == [n for n in names if n.startswith("attention_")]


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, dropout=0.1)
    assert isinstance(model, FlowerNet)
    assert isinstance(model, AttentionNet) == name.startswith("attention_")
    model.train()
    x = torch.randn(2, 3, 64, 64)

    feats = model.backbone(x)
    assert feats.ndim == 4 and feats.shape[:2] == (2, model.num_features)

    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).mean().backward()
    for pname, p in model.head.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert model.head.fc.weight.grad.abs().sum() > 0

    layer = model.gradcam_layer()
    assert any(layer is m for m in model.backbone.modules())
    assert count_parameters(model) > count_parameters(model.head) > 0


@pytest.mark.parametrize("name", ["attention_resnet18", "attention_efficientnet_lite0",
                                  "attention_mobilenet_v3_large"])
def test_attention_map(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        logits, attn = model(x, return_attention=True)
        feats = model.backbone(x)
        plain = model(x)
    assert logits.shape == (2, 5)
    assert torch.allclose(logits, plain)
    assert attn.shape == (2, 1, *feats.shape[-2:])
    assert attn.min() >= 0 and attn.max() <= 1
    # Zero-initialised attention conv: the head starts out as plain average pooling.
    pooled, _ = model.head.attend(feats)
    assert torch.allclose(pooled, feats.mean(dim=(2, 3)), atol=1e-5)


def test_attention_weighted_pooling_math() -> None:
    head = models.AttentionHead(in_features=3, num_classes=2, dropout=0.0)
    with torch.no_grad():
        head.attention.weight.normal_()
    feats = torch.randn(2, 3, 4, 5)
    pooled, attn = head.attend(feats)
    expected = (attn * feats).sum((2, 3)) / attn.sum((2, 3))
    assert torch.allclose(pooled, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "attention_efficientnet_lite0"])
def test_gradcam_runs(name: str) -> None:
    from flowers.inference.explain import gradcam_maps

    class Wrapped(torch.nn.Module):  # the shape explain expects: uint8-range input, `.net.gradcam_layer()`
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x / 255.0)

    model = Wrapped(build_model(name, num_classes=4)).eval()
    maps = gradcam_maps(model, torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert maps.shape == (2, 64, 64)
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0


def test_unknown_name() -> None:
    with pytest.raises(ModelError, match="resnet50") as info:
        build_model("resnet51")
    assert isinstance(info.value, ValueError)
    assert "attention_efficientnet_lite0" in str(info.value)
    with pytest.raises(ModelError):
        model_spec("attention_vit")


def test_bad_arguments() -> None:
    with pytest.raises(ModelError, match="num_classes"):
        build_model("resnet18", num_classes=0)
    with pytest.raises(ModelError, match="dropout"):
        build_model("resnet18", dropout=1.5)


def test_model_spec_values() -> None:
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for name in ["resnet50", "resnet18", "mobilenet_v3_large", "attention_mobilenet_v3_small"]:
        spec = model_spec(name)
        assert (spec.mean, spec.std, spec.image_size) == (*imagenet, 224)
    s0 = model_spec("efficientnet_lite0")
    assert (s0.mean, s0.std, s0.image_size) == ((0.5,) * 3, (0.5,) * 3, 224)
    assert model_spec("efficientnet_lite2").image_size == 260
    att = model_spec("attention_efficientnet_lite2")
    assert (att.backbone, att.attention, att.image_size) == ("efficientnet_lite2", True, 260)
    plain = model_spec("resnet50")
    assert (plain.backbone, plain.attention) == ("resnet50", False)
    with pytest.raises(Exception):  # frozen
        plain.image_size = 1  # type: ignore[misc]
    assert build_model("attention_resnet18").spec == model_spec("attention_resnet18")


@pytest.mark.parametrize("off", [None, False, "none", "None", "false"])
def test_pretrained_off(off: object) -> None:
    assert build_model("mobilenet_v3_small", pretrained=off).pretrained == "none"


@pytest.mark.parametrize("name", ["efficientnet_lite0", "attention_efficientnet_lite2"])
def test_packaged_weights_load_strict(name: str) -> None:
    torch.manual_seed(0)
    random_init = build_model(name).backbone.state_dict()
    model = build_model(name, pretrained="packaged")
    assert model.pretrained.startswith("packaged:")
    loaded = model.backbone.state_dict()

    spec = model_spec(name)
    from flowers.models.backbones import BACKBONES
    from flowers.models.weights import packaged_path

    pkg = packaged_path(spec.backbone, BACKBONES[spec.backbone])
    file_sd = torch.load(pkg, weights_only=True, map_location="cpu")
    expected = {k: v for k, v in file_sd.items() if not k.startswith("_fc.")}
    assert set(expected) == set(loaded)  # strict: every backbone tensor comes from the file
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k
    floats = [k for k in loaded if loaded[k].dtype.is_floating_point]
    changed = [k for k in floats if not torch.equal(loaded[k], random_init[k])]
    assert len(changed) > 0.9 * len(floats)
    # The head is new: num_classes-way, not ImageNet's 1000.
    assert model.head.fc.out_features == 102


def test_pretrained_true_means_packaged_for_lite() -> None:
    assert build_model("efficientnet_lite0", pretrained=True).pretrained.startswith("packaged:")


def test_packaged_unavailable_for_resnet() -> None:
    with pytest.raises(ModelError, match="efficientnet_lite0"):
        build_model("resnet50", pretrained="packaged")


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_local_file_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    src = build_model("resnet18")
    path = tmp_path / "backbone.pth"
    torch.save(src.backbone.state_dict(), path)
    torch.manual_seed(2)
    dst = build_model("attention_resnet18", num_classes=3, pretrained=str(path))
    assert _equal_states(dst.backbone.state_dict(), src.backbone.state_dict())
    assert dst.pretrained == f"file:{path}"


def test_local_file_full_model_keys(tmp_path) -> None:
    # A full torchvision model (features.* + classifier.*) and a FlowerNet state dict.
    torch.manual_seed(3)
    tv = torchvision.models.mobilenet_v3_small()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    model = build_model("mobilenet_v3_small", pretrained=str(tmp_path / "tv.pth"))
    assert _equal_states(model.backbone.state_dict(), tv.features.state_dict())

    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    again = build_model("attention_mobilenet_v3_small", pretrained=str(tmp_path / "ckpt.pt"))
    assert _equal_states(again.backbone.state_dict(), tv.features.state_dict())


def test_local_file_wrong_architecture(tmp_path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(build_model("resnet18").backbone.state_dict(), path)
    with pytest.raises(ModelError, match="do not fit the resnet50 backbone") as info:
        build_model("resnet50", pretrained=str(path))
    assert "missing keys" in str(info.value) and "shape" in str(info.value)


def test_local_file_missing(tmp_path) -> None:
    with pytest.raises(ModelError, match="not found"):
        build_model("resnet18", pretrained=str(tmp_path / "nope.pth"))


def test_local_file_not_a_state_dict(tmp_path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="Could not read"):
        build_model("resnet18", pretrained=str(path))


@pytest.mark.parametrize("weights", ["IMAGENET1K_V2", "DEFAULT", "ResNet50_Weights.IMAGENET1K_V1"])
def test_torchvision_weights_offline(weights: str) -> None:
    with pytest.raises(ModelError, match="Could not download") as info:
        build_model("attention_resnet50", pretrained=weights)
    msg = str(info.value)
    assert "packaged" in msg and "efficientnet_lite0" in msg and "false" in msg
    assert "http://127.0.0.1:" in msg  # torchvision's real download code ran, against the closed port


def test_torchvision_weights_loaded_into_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand-in for a successful download: the weights' state dict is a seeded random model.
    torch.manual_seed(4)
    fake = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", lambda self, *a, **k: fake)
    model = build_model("resnet18", pretrained="IMAGENET1K_V1")
    assert model.pretrained == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    expected = {k: v for k, v in fake.items() if not k.startswith("fc.")}
    assert _equal_states(model.backbone.state_dict(), expected)


def test_unknown_torchvision_weights() -> None:
    with pytest.raises(ModelError, match="IMAGENET1K_V2"):
        build_model("resnet50", pretrained="IMAGENET_FOO")
    with pytest.raises(ModelError, match="packaged"):
        build_model("efficientnet_lite0", pretrained="IMAGENET1K_V1")
