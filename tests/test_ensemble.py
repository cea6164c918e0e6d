"""L4 ensemble: soft voting, diversity metrics on hand-made predictions, the stage end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowers.training.ensemble import build_ensemble, diversity_metrics, diversity_report, run_ensemble_stage, soft_vote
from flowers.inference.predict import Predictor, load_model


def test_soft_vote_is_mean_of_member_probs():
    rng = np.random.default_rng(0)
    ps = [rng.dirichlet(np.ones(4), 10) for _ in range(3)]
    np.testing.assert_allclose(soft_vote(ps), np.mean(ps, axis=0), rtol=1e-6)
    np.testing.assert_allclose(soft_vote(ps, [2, 1, 1]), (2 * ps[0] + ps[1] + ps[2]) / 4, rtol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        soft_vote(ps, [1, -1, 1])


def _onehot(preds, k=3, conf=0.9):
    p = np.full((len(preds), k), (1 - conf) / (k - 1))
    p[np.arange(len(preds)), preds] = conf
    return p


def test_diversity_metrics_hand_made():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    a = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0])  # wrong on 8, 9
    b = np.array([0, 0, 0, 0, 1, 1, 1, 0, 2, 1])  # wrong on 7, 9 (another wrong class than a)
    c = np.array([1, 0, 0, 0, 1, 1, 1, 1, 2, 2])  # wrong on 0
    probs = {"a": _onehot(a), "b": _onehot(b), "c": _onehot(c, conf=0.95)}
    rep = diversity_report(probs, labels, {"a": "resnet50", "b": "resnet50", "c": "attention_resnet50"})
    pairs = {(p["a"], p["b"]): p for p in rep["pairs"]}
    ab, ac = pairs[("a", "b")], pairs[("a", "c")]
    assert ab["disagreement"] == pytest.approx(0.3)  # differ on 7, 8, 9
    assert ab["double_fault"] == pytest.approx(0.1)  # both wrong on 9
    assert ac["double_fault"] == 0.0 and ac["disagreement"] == pytest.approx(0.3)
    ea, eb = (a != labels).astype(float), (b != labels).astype(float)
    assert ab["error_correlation"] == pytest.approx(np.corrcoef(ea, eb)[0, 1])
    assert ab["kind"] == "hyperparameter" and ac["kind"] == "architecture"
    # the majority vote fixes every single-member error; nothing is introduced
    assert rep["ensemble"]["top1"] == 1.0
    fixes = {f["member"]: f for f in rep["fixes"]}
    assert fixes["a"]["fixed_by_ensemble"] == 2 and fixes["a"]["introduced_by_ensemble"] == 0
    assert set(rep["by_kind"]) == {"architecture", "hyperparameter"}
    assert rep["by_kind"]["architecture"]["pairs"] == 2
    # the seed's claim with its interval: the per-image gains average to the pairs' gains
    claim = rep["claim"]
    arch_gain = np.mean([p["gain_over_best_member"] for p in rep["pairs"] if p["kind"] == "architecture"])
    assert claim["architecture_minus_hyperparameter_gain"] == pytest.approx(arch_gain - ab["gain_over_best_member"])
    assert claim["low"] <= claim["architecture_minus_hyperparameter_gain"] <= claim["high"] and claim["images"] == 10
    for d in rep["by_kind"].values():
        assert d["gain_low"] <= d["mean_gain_over_best_member"] <= d["gain_high"]
    m = diversity_metrics(rep)
    assert (m["arch_minus_hparam_gain_low"], m["arch_minus_hparam_gain_high"]) == (claim["low"], claim["high"])
    assert diversity_report({"a": probs["a"], "b": probs["b"]}, labels, {"a": "r", "b": "r"})["claim"] is None


def test_diversity_claim_interval_excludes_zero_only_when_the_images_say_so():
    """All images are class 0. a and b (same network) are wrong on the first f images; c (another
    network) is right there, confidently, and wrong, hesitantly, on the next f. Every
    architecture pair then fixes f images its better member (a or b) gets wrong, the
    hyperparameter pair fixes none: the claim is f/n, and its interval excludes 0 on 1000
    images but not on 10."""
    def claim(n, f):
        labels = np.zeros(n, dtype=int)
        a = _onehot(np.r_[np.ones(f, int), np.zeros(n - f, int)], conf=0.6)
        c = _onehot(np.r_[np.zeros(f, int), np.ones(f, int), np.zeros(n - 2 * f, int)], conf=0.6)
        c[:f] = _onehot(np.zeros(f, int), conf=0.99)
        c[f:2 * f] = _onehot(np.ones(f, int), conf=0.55)
        rep = diversity_report({"a": a, "b": a.copy(), "c": c}, labels, {"a": "resnet", "b": "resnet", "c": "att"})
        return rep["claim"]

    big = claim(1000, 100)
    assert big["architecture_minus_hyperparameter_gain"] == pytest.approx(0.1) and big["low"] > 0.05
    small = claim(10, 1)
    assert small["architecture_minus_hyperparameter_gain"] == pytest.approx(0.1)
    assert small["low"] <= 0 < small["high"]


def test_build_ensemble_rejects_mismatched_classes(trained_checkpoint, tmp_path):
    ckpt = torch.load(trained_checkpoint, weights_only=False)
    ckpt["class_names"] = [f"other {i}" for i in range(len(ckpt["class_names"]))]
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    with pytest.raises(Exception, match="class"):
        build_ensemble([str(trained_checkpoint), str(other)], tmp_path / "ens")


def test_ensemble_stage_end_to_end(trained_checkpoint, smoke_config, synth_root, tmp_path):
    run_dir = trained_checkpoint.parent
    res = run_ensemble_stage({"l1": str(trained_checkpoint), "l1b": str(run_dir)}, smoke_config.data, tmp_path / "l4",
                             explain_images=1, ood_images=4)
    m = res.metrics
    for key in ("val_top1", "test_top1", "test_top5", "test_nll", "test_ece", "member_l1_test_top1",
                "member_l1b_test_top1", "uncertainty_threshold", "entropy_auroc", "pair_l1_l1b_disagreement"):
        assert key in m and isinstance(m[key], float)
    # identical members: the ensemble equals them
    assert m["test_top1"] == pytest.approx(m["member_l1_test_top1"])
    assert m["pair_l1_l1b_disagreement"] == 0.0
    manifest = json.loads((res.model_dir / "flowers_model.json").read_text())
    assert manifest["kind"] == "ensemble" and len(manifest["members"]) == 2
    assert manifest["test_accuracy"] == m["test_top1"] and "uncertainty_threshold" in manifest
    # self-contained and pickle-free: each member a safetensors model folder, covered by the ensemble's checksums
    assert all((res.model_dir / mm["file"] / "model.safetensors").is_file() for mm in manifest["members"])
    assert {f"{mm['file']}/flowers_model.json" for mm in manifest["members"]} <= set(manifest["sha256"])
    assert manifest["lineage"]["split_hash"] and [p["uri"] for p in manifest["lineage"]["parents"]] == [
        str(trained_checkpoint), str(run_dir)]
    assert (res.model_dir / "test_per_image.json").is_file()
    for name in ("test_diversity.md", "test_diversity_pairs.csv", "test_diversity_fixes.csv", "test_risk_coverage.png",
                 "test_diversity.png", "explain/l1/sample_explain.png"):
        assert (tmp_path / "l4" / name).is_file(), name
    # loadable by path and usable by the shared Predictor
    pred = Predictor(load_model(res.model_dir))
    assert pred.threshold == pytest.approx(manifest["uncertainty_threshold"])
    img = sorted((synth_root / "jpg").glob("*.jpg"))[0]
    (out,) = pred.predict([img], top_k=2)
    assert set(out) >= {"label", "name", "entropy", "uncertain"}


def _resized_copy(ckpt_path, size: int, dest):
    """The same network recorded as trained at another image size (global pooling takes any size)."""
    from flowers.models.checkpoint import load_checkpoint, save_checkpoint
    from flowers.data.transforms import Preprocessing

    ckpt = load_checkpoint(ckpt_path)
    old = Preprocessing.from_dict(ckpt["preprocessing"])
    ckpt["preprocessing"] = Preprocessing.for_size(size, old.mean, old.std).to_dict()
    save_checkpoint(dest, ckpt)
    return dest


def test_members_trained_at_different_sizes_each_see_their_own_eval_preprocessing(trained_checkpoint, synth_root,
                                                                                  tmp_path):
    """A 48 px and a 64 px member: the ensemble's input has one view per size, and its vote equals
    the mean of each member predicting alone on the same image with its own transform."""
    from PIL import Image

    small = _resized_copy(trained_checkpoint, 48, tmp_path / "small.pt")
    big = _resized_copy(trained_checkpoint, 64, tmp_path / "big.pt")
    ens = load_model(build_ensemble([str(small), str(big)], tmp_path / "ens"))
    assert [v.image_size for v in ens.views] == [48, 64]
    img = Image.open(next((synth_root / "jpg").glob("*.jpg"))).convert("RGB")
    img = img.resize((97, 71))  # not square, not either member's size
    x = Predictor(ens).load_image(img)
    assert isinstance(x, tuple) and [t.shape[-1] for t in x] == [48, 64]
    alone = [Predictor(load_model(p)).predict([img], top_k=1)[0] for p in (small, big)]
    alone_probs = [load_model(p).predict_proba(Predictor(load_model(p)).load_image(img)[None]) for p in (small, big)]
    np.testing.assert_allclose(ens.predict_proba(tuple(t[None] for t in x)), soft_vote(alone_probs), rtol=1e-5, atol=1e-6)
    assert Predictor(ens).predict([img], top_k=1)[0]["label"] == int(soft_vote(alone_probs).argmax())
    assert all("label" in a for a in alone)
    # a member fed a resize of the other member's crop would see other pixels
    resized = torch.nn.functional.interpolate(x[1][None].float(), size=(48, 48), mode="bilinear", antialias=True)
    assert not torch.equal(resized.round().to(torch.uint8)[0], x[0])
