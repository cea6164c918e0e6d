"""Config loading: YAML + base + profile + overrides, with precise errors."""
from pathlib import Path

import pytest

from flowers import config as C

REPO = Path(__file__).resolve().parents[1]


def test_level_configs_load_with_seed_settings():
    l1 = C.load_config(REPO / "configs/level1.yaml")
    assert (l1.model.arch, l1.model.pretrained, l1.optim.lr, l1.data.batch_size, l1.data.eval_batch_size, l1.train.epochs) == (
        "resnet50", "IMAGENET1K_V2", 3e-4, 32, 64, 10)
    l2 = C.load_config(REPO / "configs/level2.yaml")
    assert l2.level == "l2" and l2.data.augment == "strong" and l2.optim.schedule == "cosine"
    assert l2.optim.label_smoothing == 0.1 and l2.optim.weight_decay > 0
    assert l2.model == l1.model and l2.data.split == l1.data.split  # controlled comparison
    l3 = C.load_config(REPO / "configs/level3.yaml")
    assert l3.model.name == "attention_resnet50"


def test_profile_and_overrides_merge_in_order():
    cfg = C.load_config(REPO / "configs/level3.yaml", "cpu", ["optim.lr=1e-4", "data.classes=10", "model.pretrained=false"])
    assert cfg.model.name == "attention_efficientnet_lite0"
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.classes == 10 and cfg.model.pretrained is False
    assert cfg.data.image_size == 160  # from the profile


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["data.batch_size=big"], "data.batch_size: expected an integer"),
    (["data.augment=heavy"], "data.augment: must be one of"),
    (["optim.schedule=3"], "optim.schedule: expected a string"),
    (["model.pretrained=3"], "model.pretrained: expected str | bool | None, got 3"),
    (["data=5"], "data: expected a mapping, got 5"),
    (["optim.lr=abc"], "optim.lr: expected a number, got 'abc'"),
    (["train.epochs=0"], "train.epochs: must be > 0"),
    (["optim.label_smoothing=1.5"], "optim.label_smoothing"),
    (["nonsense"], "expected KEY=VALUE"),
    (["task=distill"], "distill.teacher"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message.replace("(", r"\(")):
        C.load_config(REPO / "configs/level1.yaml", None, override)


def test_bad_files(tmp_path):
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(C.ConfigError, match="invalid YAML"):
        C.load_config(bad)
    nested = tmp_path / "n.yaml"
    nested.write_text("data:\n  image_size: 128\n  colour: red\n")
    with pytest.raises(C.ConfigError, match="unknown config key 'data.colour'"):
        C.load_config(nested)
    with pytest.raises(C.ConfigError, match="config file not found.*nope.yaml"):
        C.load_config(REPO / "configs/level1.yaml", "nope")


def test_roundtrip_flat_and_replace(tmp_path):
    cfg = C.load_config(REPO / "configs/level2.yaml")
    C.dump_yaml(cfg, tmp_path / "c.yaml")
    assert C.load_config(tmp_path / "c.yaml") == cfg
    flat = C.to_flat_dict(cfg)
    assert flat["optim.schedule"] == "cosine" and flat["model.arch"] == "resnet50"
    cfg2 = C.replace(cfg, {"optim.lr": 1e-3, "data.augment": "light"})
    assert cfg2.optim.lr == 1e-3 and cfg2.data.augment == "light" and cfg.optim.lr == 3e-4
    with pytest.raises(C.ConfigError):
        C.replace(cfg, {"data.augment": "bogus"})
