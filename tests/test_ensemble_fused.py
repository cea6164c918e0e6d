"""The L4 ensemble as one ONNX graph: same vote as the members, INT8 choice, loader fallback."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from flowers.data.bundle import build_data
from flowers.inference.ensemble_model import FUSED_DIR, load_ensemble
from flowers.inference.fused_ensemble import (FILES, choose_variant, fuse_and_compare, fused_metrics, load_fused_variant)
from flowers.inference.onnx_models import int8_weight_check
from flowers.inference.predict import load_model, predict_dataset
from flowers.models.checkpoint import load_checkpoint, read_manifest, save_checkpoint, update_manifest
from flowers.training.ensemble import build_ensemble


def _variant(ckpt_path, dest, size: int | None = None, seed: int = 1):
    """Another member: the smoke network with its head perturbed (another vote), optionally recorded at another size."""
    from flowers.data.transforms import Preprocessing

    ckpt = load_checkpoint(ckpt_path)
    g = torch.Generator().manual_seed(seed)
    for k, v in ckpt["model"].items():
        if v.is_floating_point() and v.ndim == 2:  # the classifier's Linear weights
            ckpt["model"][k] = v + 0.5 * v.std() * torch.randn(v.shape, generator=g)
    if size:
        old = Preprocessing.from_dict(ckpt["preprocessing"])
        ckpt["preprocessing"] = Preprocessing.for_size(size, old.mean, old.std).to_dict()
    save_checkpoint(dest, ckpt)
    return dest


def _fused(members, smoke_config, out, weights=None):
    """Build an ensemble folder, fuse it, and return (folder, members' test vote, test labels, fused entry)."""
    ens_dir = build_ensemble([str(m) for m in members], out, weights)
    ens = load_ensemble(ens_dir, read_manifest(ens_dir), "cpu", fused=False)
    data = build_data(smoke_config.data, ens.preprocessing, seed=0)
    test = data.eval_part("test", ens.transform(), ens.draft_size)
    vote, labels = predict_dataset(ens.predict_proba, test, batch_size=16)
    entry = fuse_and_compare(ens_dir, data.eval_part("train", ens.transform(), ens.draft_size), test, vote, labels,
                             batch_size=16, latency_iters=2)
    return ens_dir, vote, labels, entry, test


@pytest.fixture(scope="module")
def fused_ensemble(trained_checkpoint, smoke_config, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused")
    other = _variant(trained_checkpoint, tmp / "other.pt")
    return _fused([trained_checkpoint, other], smoke_config, tmp / "ens", weights=[2.0, 1.0])


def test_fused_graphs_give_the_members_vote(fused_ensemble):
    ens_dir, vote, labels, entry, test = fused_ensemble
    fp32, int8 = load_fused_variant(ens_dir, "fp32"), load_fused_variant(ens_dir, "int8")
    p32, _ = predict_dataset(fp32.predict_proba, test, batch_size=16)
    np.testing.assert_allclose(p32, vote, atol=2e-5)
    p8, _ = predict_dataset(int8.predict_proba, test, batch_size=16)
    assert (p8.argmax(1) == vote.argmax(1)).mean() >= 0.8
    # the vote after the members' softmax stays float: rows sum to 1, values are not steps of 1/256
    np.testing.assert_allclose(p8.sum(1), 1.0, atol=1e-4)
    assert np.abs(p8 * 256 - np.round(p8 * 256)).max() > 1e-3
    check = int8_weight_check(ens_dir / FUSED_DIR / FILES["int8"])
    assert check["int8"] and check["saturation_safe"] and check["max_abs_weight"] <= 64
    # every BatchNormalization folded into its Conv before quantizing: unfolded, INT8 quantized them on their
    # own (a 224 px three-member ensemble lost 6.2 test points that way, and ran slower than fp32)
    import onnx

    ops = {n.op_type for n in onnx.load(str(ens_dir / FUSED_DIR / FILES["int8"])).graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops
    # what was recorded: three top-1 figures, latency at batch 1 and 8, the choice and why
    assert set(entry["test_top1"]) == {"members_fp32", "fused_fp32", "fused_int8"}
    assert entry["test_top1"]["fused_fp32"] == pytest.approx(entry["test_top1"]["members_fp32"])
    assert set(entry["latency"]) == {"members_fp32", "fused_fp32", "fused_int8"}
    assert all(set(v) == {"1", "8"} for v in entry["latency"].values())
    gap = 100 * (entry["test_top1"]["members_fp32"] - entry["test_top1"]["fused_int8"])
    assert entry["variant"] == "fp32" if gap > 0.3 else entry["variant"] in ("int8", "fp32") and entry["why"]
    manifest = read_manifest(ens_dir)
    assert manifest["fused"]["variant"] == entry["variant"] and f"{FUSED_DIR}/flowers_model.json" in manifest["sha256"]
    m = fused_metrics(entry)
    assert m["fused_served"] == 1.0 and "fused_latency_fused_int8_b8_p50_ms" in m and "fused_seconds_export" in m


def test_load_model_serves_the_fused_graph_and_loads_members_only_for_gradients(fused_ensemble):
    from flowers.inference.explain import explainable_modules

    ens_dir, vote, _, entry, test = fused_ensemble
    model = load_model(ens_dir)
    assert model.meta["serving"] == f"fused-{entry['variant']}"
    x = torch.stack([test[i][0] for i in range(4)])
    chosen = load_fused_variant(ens_dir, entry["variant"])
    np.testing.assert_allclose(model.predict_proba(x), chosen.predict_proba(x), atol=1e-6)
    assert model._module is None  # members not loaded to serve
    assert [name for name, *_ in explainable_modules(model)] == [m["name"] for m in read_manifest(ens_dir)["members"]]
    assert load_ensemble(ens_dir, read_manifest(ens_dir), "cpu", fused=False).meta["serving"] == "members"


@pytest.mark.parametrize("damage", ["missing", "changed", "unreadable"])
def test_a_broken_fused_graph_falls_back_to_the_members(fused_ensemble, tmp_path, caplog, damage):
    ens_dir, vote, _, entry, test = fused_ensemble
    copy = shutil.copytree(ens_dir, tmp_path / "ens")
    graph = copy / FUSED_DIR / FILES[entry["variant"]]
    if damage == "missing":
        graph.unlink()
    elif damage == "changed":
        graph.write_bytes(graph.read_bytes()[:-100])
    else:  # garbage the checksums vouch for: ONNX Runtime refuses it
        graph.write_bytes(b"not an onnx graph")
        update_manifest(copy / FUSED_DIR)
        update_manifest(copy)
    with caplog.at_level(logging.WARNING, logger="flowers.inference.ensemble_model"):
        model = load_model(copy)
    assert model.meta["serving"] == "members"
    lines = [r.getMessage() for r in caplog.records if "fused ensemble graph" in r.getMessage()]
    assert len(lines) == 1 and "serving the 2 members instead" in lines[0]
    x = torch.stack([test[i][0] for i in range(4)])
    np.testing.assert_allclose(model.predict_proba(x), vote[:4], atol=1e-5)


@pytest.mark.slow
def test_members_at_two_sizes_fuse_into_one_graph_with_two_inputs(trained_checkpoint, smoke_config, tmp_path):
    small = _variant(trained_checkpoint, tmp_path / "small.pt", size=48)
    big = _variant(trained_checkpoint, tmp_path / "big.pt", size=64, seed=2)
    ens_dir, vote, _, entry, test = _fused([small, big], smoke_config, tmp_path / "ens")
    fp32 = load_fused_variant(ens_dir, "fp32")
    assert [v.image_size for v in fp32.views] == [48, 64]
    p32, _ = predict_dataset(fp32.predict_proba, test, batch_size=16)
    np.testing.assert_allclose(p32, vote, atol=2e-5)
    model = load_model(ens_dir)
    assert model.meta["serving"].startswith("fused-") and [v.image_size for v in model.views] == [48, 64]


def test_choose_variant():
    safe = {"saturation_safe": True}
    assert choose_variant(0.90, 0.898, safe)[0] == "int8"  # 0.2 points
    assert choose_variant(0.90, 0.905, safe)[0] == "int8"
    assert choose_variant(0.90, 0.896, safe)[0] == "fp32"  # 0.4 points
    assert choose_variant(0.90, 0.90, {"saturation_safe": False})[0] == "fp32"
    assert choose_variant(0.90, 0.90, safe, int8_ms=12.0, fp32_ms=10.0)[0] == "fp32"  # slower here: not served
    assert choose_variant(0.90, 0.90, safe, int8_ms=8.0, fp32_ms=10.0)[0] == "int8"
    assert fused_metrics(None) == {"fused_served": 0.0}
