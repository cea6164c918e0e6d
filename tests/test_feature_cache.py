"""Frozen-trunk training on cached features: the split network equals the whole one, the cache is
exact and reused, and a cached run trains, tests on the images and saves the whole network."""
import json
import os
import threading

import numpy as np
import pytest
import torch

from flowers import config as C
from flowers.training import feature_cache as FC
from flowers.models.checkpoint import load_checkpoint, model_from_checkpoint
from flowers.data.bundle import build_data
from flowers.data.transforms import Normalize, Preprocessing
from flowers.models import TailNet, backbone_units, build_model
from flowers.training.tasks import make_task
from flowers.training.loop import fit


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18", "mobilenet_v3_small"])
def test_units_compose_to_the_backbone_and_tail_splits_it(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    h = x
    for fn, _ in backbone_units(model):
        h = fn(h)
    with torch.no_grad():
        assert torch.allclose(h, model.backbone(x), atol=1e-5)
        tail = TailNet(model, 1).eval()
        assert torch.allclose(tail(tail.trunk(x)), model(x), atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and any(n.startswith("head.") for n in trainable)
    # the trunk is frozen, the last unit is not
    assert not all(n.startswith("head.") for n in trainable)
    assert len(trainable) < len(list(model.parameters()))


def test_trainable_units_out_of_range_is_a_clear_error():
    model = build_model("resnet18", num_classes=3, pretrained=False)
    with pytest.raises(ValueError, match="model.trainable_units must be in"):
        TailNet(model, 1000)


@pytest.fixture()
def lite_setup(smoke_config):
    cfg = C.replace(smoke_config, {"model.arch": "efficientnet_lite0", "model.pretrained": "packaged"})
    model = build_model(cfg.model.name, num_classes=5, pretrained="packaged")
    pp = Preprocessing.for_size(64, model.spec.mean, model.spec.std)
    data = build_data(cfg.data, pp, seed=0)
    return model, pp, data


def _prepare(model, pp, data, root, views=2, seed=0):
    return FC.prepare(TailNet(model, 1), data.train, data.val, Normalize(pp.mean, pp.std), data.val.transform,
                      data.train.transform, views, seed, root, batch_size=5,
                      eval_desc={"pp": pp.to_dict()}, view_desc={"augment": "light"})


def test_cached_features_equal_the_trunk_on_the_images_and_are_reused(lite_setup, tmp_path):
    model, pp, data = lite_setup
    parts = _prepare(model, pp, data, tmp_path / "c")
    assert parts.train_clean.shape[0] == len(data.train) and parts.val_clean.shape[0] == len(data.val)
    assert parts.train_views.shape[:2] == (2, len(data.train))
    # clean entries: exactly the trunk on the eval-preprocessed image (to float16 precision)
    tail = TailNet(model, 1).eval()
    norm = Normalize(pp.mean, pp.std)
    x = norm(torch.stack([data.val[i][0] for i in range(3)]))
    with torch.no_grad():
        want = tail.trunk(x).numpy()
    np.testing.assert_allclose(parts.val_clean[:3].astype(np.float32), want, rtol=1e-2, atol=1e-2)
    # the views are augmented (not the clean image) and differ from each other
    assert not np.allclose(parts.train_views[0], parts.train_clean)
    assert not np.allclose(parts.train_views[0], parts.train_views[1])
    files = sorted(p.name for p in (tmp_path / "c").glob("*.npy"))
    assert len(files) == 3  # train eval, val eval, train views
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.npy")}
    again = _prepare(model, pp, data, tmp_path / "c")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.npy")} == mtimes  # reused, not rebuilt
    np.testing.assert_array_equal(again.train_views, parts.train_views)
    # a different seed is a different set of views (a new entry), the clean entries are shared
    _prepare(model, pp, data, tmp_path / "c", seed=1)
    assert len(list((tmp_path / "c").glob("*.npy"))) == 4
    meta = [json.loads(p.read_text()) for p in (tmp_path / "c").glob("*.json")]
    assert all(m["format"] == FC.FORMAT and m["trunk"] for m in meta)


def test_views_are_the_same_whoever_builds_them(lite_setup, tmp_path):
    model, pp, data = lite_setup
    a = _prepare(model, pp, data, tmp_path / "a")
    torch.manual_seed(123)  # the global RNG state must not matter
    b = _prepare(model, pp, data, tmp_path / "b")
    np.testing.assert_array_equal(a.train_views, b.train_views)


def test_concurrent_builders_build_once(lite_setup, tmp_path):
    model, pp, data = lite_setup
    results, errors = [], []

    def run():
        try:
            results.append(_prepare(model, pp, data, tmp_path / "c", views=1))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    metas = [json.loads(p.read_text()) for p in (tmp_path / "c").glob("*.json")]
    assert len(metas) == 3
    assert not [p for p in os.listdir(tmp_path / "c") if p.startswith(".")]  # no temporary files left
    np.testing.assert_array_equal(results[0].train_views, results[1].train_views)


def test_epoch_view_choice_is_seeded_and_covers_clean_and_views():
    clean = np.zeros((50, 2, 1, 1), np.float16)
    views = np.stack([np.full((50, 2, 1, 1), v + 1, np.float16) for v in range(2)])
    ds = FC.CachedFeatures(clean, np.arange(50) % 3, views, seed=0)
    seen0 = {float(ds[i][0][0, 0, 0]) for i in range(50)}
    assert seen0 == {0.0, 1.0, 2.0}
    first = [float(ds[i][0][0, 0, 0]) for i in range(50)]
    ds.set_epoch(1)
    assert [float(ds[i][0][0, 0, 0]) for i in range(50)] != first
    ds.set_epoch(0)
    assert [float(ds[i][0][0, 0, 0]) for i in range(50)] == first
    for i in range(50):  # the sample key says which input it is: image i, clean (slot 0) or view v (slot v + 1)
        x, y, key = ds[i]
        assert y == i % 3 and x.dtype == torch.float16
        assert key == FC.sample_key(i, int(x[0, 0, 0]), 50)


def test_cached_run_learns_tests_on_images_and_saves_the_whole_network(smoke_config, tmp_path):
    cfg = C.replace(smoke_config, {"model.arch": "efficientnet_lite0", "model.pretrained": "packaged",
                                   "optim.lr": 3e-3, "train.epochs": 4, "data.feature_cache": True,
                                   "data.cache_views": 2, "data.cache_dir": str(tmp_path / "cache")})
    res = fit(cfg, make_task(cfg), run_dir=tmp_path / "run")
    summary = json.loads((res.run_dir / "metrics.json").read_text())
    assert summary["feature_cache"]["views"] == 2 and summary["feature_cache"]["cut"] > 0
    assert res.test_metrics["n"] == 20 and res.test_metrics["top1"] >= 0.6, res.test_metrics
    ckpt = load_checkpoint(res.best_checkpoint)
    net = model_from_checkpoint(ckpt).eval()
    fresh = build_model("efficientnet_lite0", num_classes=5, pretrained="packaged")
    trained = dict(net.named_parameters())
    # the frozen stem is the pretrained one, the trained head conv moved
    assert torch.equal(trained["backbone._conv_stem.weight"], fresh.backbone._conv_stem.weight)
    assert not torch.equal(trained["backbone._conv_head.weight"], fresh.backbone._conv_head.weight)

    # L5 on the same cache: a teacher with the student's trunk is read off the cached features,
    # per view (consistent), and the student learns from it
    dcfg = C.replace(cfg, {"task": "distill", "distill.teacher": str(res.best_checkpoint), "train.epochs": 2})
    task = make_task(dcfg)
    dres = fit(dcfg, task, run_dir=tmp_path / "student")
    n = len(json.loads((dres.run_dir / "split.json").read_text())["train"])
    assert task.mode == "cached-trunk-views" and task.cache.shape == (3 * n, 5)  # clean + 2 views per image
    assert not torch.allclose(task.cache[:n], task.cache[n:2 * n])
    assert dres.test_metrics["top1"] >= 0.6, dres.test_metrics


def test_cache_settings_are_validated(smoke_config):
    with pytest.raises(C.ConfigError, match="data.cache_views"):
        C.validate(C.replace(smoke_config, {"data.cache_views": -1}))
    with pytest.raises(C.ConfigError, match="model.trainable_units"):
        C.validate(C.replace(smoke_config, {"model.trainable_units": -2}))


def test_teacher_probabilities_from_cached_features_equal_the_teacher_on_images(lite_setup, tmp_path):
    """The distillation shortcut is exact: an ensemble whose members share the student's frozen trunk
    gives the same probabilities from the cached features as from the images; a member with another
    trunk makes it decline (None), so the caller falls back to the images."""
    from flowers.inference.ensemble_model import EnsembleModule
    from flowers.inference.predict import LoadedModel, TorchProbModel
    from flowers.training.tasks import teacher_probs_from_features

    model, pp, data = lite_setup
    torch.manual_seed(0)
    members = [build_model("efficientnet_lite0", num_classes=5, pretrained="packaged") for _ in range(2)]
    for m in members:  # different tops, same (packaged) trunk
        torch.nn.init.normal_(m.head.fc.weight, std=0.5)
        torch.nn.init.normal_(m.backbone._conv_head.weight, std=0.05)
    ens = EnsembleModule([TorchProbModel(m, pp).eval() for m in members], [0, 0], [1.0, 1.0]).eval()
    teacher = LoadedModel(lambda x: None, pp, list(data.class_names), "ens", module=ens)
    parts = _prepare(model, pp, data, tmp_path / "c", views=1)
    student = TailNet(model, 1)
    n = len(data.train)
    got = teacher_probs_from_features(teacher, student, parts.train_clean, pp)
    assert got is not None and got.shape == (n, 5)
    clean = torch.stack([data.eval_part("train")[i][0] for i in range(n)])
    with torch.no_grad():
        want = torch.softmax(ens(clean), 1)
    assert torch.allclose(got, want, atol=2e-2), (got - want).abs().max()
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.95

    # consistent teacher: with the cached views, the row a training sample's key picks is the teacher
    # on exactly the input the student sees that epoch (the clean image or its augmented view)
    both = teacher_probs_from_features(teacher, student, parts.train_clean, pp, views=parts.train_views)
    assert both.shape == (2 * n, 5) and torch.equal(both[:n], got)
    view_imgs = FC.ViewImages(data.train, data.train.transform, 1, 0)
    with torch.no_grad():
        on_views = torch.softmax(ens(torch.stack([view_imgs[i][0][0] for i in range(n)])), 1)
    assert torch.allclose(both[n:], on_views, atol=2e-2), (both[n:] - on_views).abs().max()
    assert not torch.allclose(on_views, want, atol=2e-2)  # the views really are other inputs
    ds = FC.CachedFeatures(parts.train_clean, data.train.labels, parts.train_views, seed=0)
    keys = [ds[i][2] for i in range(n)]
    assert {k // n for k in keys} == {0, 1} and [k % n for k in keys] == list(range(n))
    seen = torch.stack([on_views[i] if k >= n else want[i] for i, k in enumerate(keys)])
    assert torch.allclose(both[keys], seen, atol=2e-2)
    # another trunk (random init): not provably the same features, so no shortcut
    other = build_model("efficientnet_lite0", num_classes=5, pretrained=False)
    mixed = EnsembleModule([TorchProbModel(members[0], pp), TorchProbModel(other, pp)], [0, 0], [1.0, 1.0])
    assert teacher_probs_from_features(LoadedModel(lambda x: None, pp, list(data.class_names), "m", module=mixed),
                                       student, parts.train_clean, pp) is None
    # another eval preprocessing: no shortcut either
    big = Preprocessing.for_size(96, pp.mean, pp.std)
    assert teacher_probs_from_features(teacher, student, parts.train_clean, big) is None


def test_entry_keys_do_not_depend_on_object_addresses():
    """Keys use the transforms' repr: two equal transforms built apart (new addresses) give one key."""
    from flowers.data.transforms import train_transform

    a, b = train_transform("strong", 64), train_transform("strong", 64)
    assert FC._stable_repr(a) == FC._stable_repr(b)
    assert "0x" not in FC._stable_repr(a)
    assert FC._stable_repr(a) != FC._stable_repr(train_transform("light", 64))


def test_int8_recipe_choices_are_the_exporters():
    from flowers.inference.export import DEFAULT_INT8_RECIPE, INT8_RECIPES

    assert set(C.CHOICES["distill.int8_recipe"]) == set(INT8_RECIPES)
    assert C.Config().distill.int8_recipe == DEFAULT_INT8_RECIPE
    with pytest.raises(C.ConfigError, match="distill.int8_recipe"):
        C.validate(C.replace(C.Config(), {"distill.int8_recipe": "u4s4"}))


def test_shift_views_are_a_second_entry_read_as_one_bank(lite_setup, tmp_path):
    """`data.shift_views`: views under the `shifts` preset, built as their own entry, follow the level's
    views in one V x N bank (no copy), and epochs draw from all of them."""
    from flowers.data.transforms import train_transform

    model, pp, data = lite_setup
    parts = FC.prepare(TailNet(model, 1), data.train, data.val, Normalize(pp.mean, pp.std), data.val.transform,
                       data.train.transform, 1, 0, tmp_path / "c", batch_size=5, eval_desc={"pp": pp.to_dict()},
                       view_desc={"augment": "light"}, shift_transform=train_transform("shifts", 64), shift_views=2)
    bank = parts.train_views
    assert isinstance(bank, FC.ViewBank) and bank.shape[:2] == (3, len(data.train)) and len(bank) == 3
    assert len(list((tmp_path / "c").glob("*.npy"))) == 4  # train eval, val eval, level views, shift views
    level_only = _prepare(model, pp, data, tmp_path / "c", views=1)  # the level's entry is shared, not rebuilt
    np.testing.assert_array_equal(bank[0], level_only.train_views[0])
    assert not np.allclose(bank[1], bank[0]) and not np.allclose(bank[2], bank[1])
    np.testing.assert_array_equal(bank[2, 3], bank.parts[1][1, 3])
    ds = FC.CachedFeatures(parts.train_clean, data.train.labels, bank, seed=0)
    keys = {ds[i][2] // len(ds) for e in range(4) for i in range(len(ds)) if not ds.set_epoch(e)}
    assert keys == {0, 1, 2, 3}  # clean, the level's view and both shift views


def test_shifts_preset_keeps_uint8_size_and_is_seeded():
    from flowers.data.transforms import train_transform
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    tf = train_transform("shifts", 64)
    torch.manual_seed(5)
    a = [tf(img) for _ in range(6)]
    torch.manual_seed(5)
    b = [tf(img) for _ in range(6)]
    assert all(x.dtype == torch.uint8 and x.shape == (3, 64, 64) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert "RandomLowRes" in repr(tf) and " at 0x" not in repr(tf)  # the cache key needs a stable repr
