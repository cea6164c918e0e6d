"""The L4 ensemble as one ONNX graph: members fused, each input view normalized once, the soft vote inside.

The folder `build_ensemble` writes gains a nested model folder (its own manifest and checksums)::

    fused/flowers_model.json   {"kind": "onnx", "file": "ensemble_int8.onnx" | "ensemble_fp32.onnx", "views",
                                "files", "quantization", "comparison", ...}
    fused/ensemble_fp32.onnx   uint8 view(s) in (`images`, or `images_0`.. per view), vote probabilities out
    fused/ensemble_int8.onnx   ONNX Runtime static INT8 (QDQ), the student's saturation-safe 7-bit recipe
                               (`flowers.inference.export.INT8_RECIPES`); the vote stays float

and the ensemble's manifest a `fused` entry: the test top-1 of the fp32 members' vote, the fused fp32
graph and the fused INT8 graph, batch-1/batch-8 latency of each, and the variant served. INT8 is
served only when its test top-1 is within `INT8_TOLERANCE_POINTS` of the fp32 members' vote (else the
fused fp32 graph). `flowers.inference.ensemble_model.load_ensemble` loads the fused graph when it is
there and valid for this CPU, else the members as before.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from flowers.data.transforms import Normalize, Preprocessing
from flowers.inference.ensemble_model import FUSED_DIR, EnsembleModule, load_ensemble
from flowers.inference.export import (DEFAULT_INT8_RECIPE, INT8_RECIPES, embed_metadata, prepare_for_quantization,
                                      quantize_static_int8)
from flowers.inference.loaded import LoadedModel, TorchProbModel
from flowers.inference.onnx_models import cpu_flags, describe_cpu, int8_weight_check, latency, load_onnx
from flowers.models.checkpoint import read_manifest, update_manifest, write_manifest

log = logging.getLogger(__name__)

FILES = {"fp32": "ensemble_fp32.onnx", "int8": "ensemble_int8.onnx"}
OUTPUT_NAME = "probs"
INT8_TOLERANCE_POINTS = 0.3  # INT8 is served only within this many top-1 points of the fp32 members' vote
# MinMax calibration keeps every calibration batch's intermediate tensors of all members in memory:
# about the student's 256 images' worth for a three-member ensemble
CALIBRATION_IMAGES = 96
EVAL_BATCH = 8  # the fused graphs' test pass: serving batches are this small too


def input_names(n_views: int) -> list[str]:
    """`images` for one view (as the student's graph), `images_0`, `images_1`, ... for several."""
    return ["images"] if n_views == 1 else [f"images_{i}" for i in range(n_views)]


class FusedEnsembleModule(torch.nn.Module):
    """uint8 views → the weighted mean of the members' probabilities (the soft vote).

    Each view is normalized once and shared by every member that reads it (members of a view
    share its preprocessing, mean and std included), where `EnsembleModule` normalizes per member.
    """

    def __init__(self, ensemble: EnsembleModule, views: Sequence[Preprocessing]) -> None:
        super().__init__()
        if not all(isinstance(m, TorchProbModel) for m in ensemble.members):
            raise ValueError("only torch checkpoint members can be fused into one graph")
        self.norms = torch.nn.ModuleList(Normalize(v.mean, v.std) for v in views)
        self.nets = torch.nn.ModuleList(m.net for m in ensemble.members)
        self.view_index = list(ensemble.view_index)
        self.register_buffer("weights", ensemble.weights.clone(), persistent=False)

    def forward(self, *views: torch.Tensor) -> torch.Tensor:
        xs = [norm(v) for norm, v in zip(self.norms, views)]
        total = 0
        for w, net, v in zip(self.weights, self.nets, self.view_index):
            total = total + w * torch.softmax(net(xs[v]).float(), 1)
        return total


def export_fused_fp32(module: FusedEnsembleModule, views: Sequence[Preprocessing], path: Path) -> Path:
    """torch.onnx.export (dynamo) of the fused module: one uint8 input per view, one shared dynamic batch."""
    xs = tuple(torch.randint(0, 256, (2, 3, v.image_size, v.image_size), dtype=torch.uint8) for v in views)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), xs, str(path), dynamo=True, input_names=input_names(len(views)),
                          output_names=[OUTPUT_NAME],
                          dynamic_shapes=(tuple({0: batch} for _ in views),),  # forward(*views): one packed argument
                          external_data=False, verbose=False,
                          # the exporter's pass folds the CastLike/Expand chains that feed each BatchNormalization;
                          # without it no BatchNormalization folds into its Conv, and INT8 quantized the unfolded
                          # BN ops on their own (measured: 6.2 points of test top-1 lost, docs/performance.md)
                          optimize=True)
    return path


def _feed(x: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    xs = x if isinstance(x, (tuple, list)) else (x,)
    return {n: np.ascontiguousarray(v.numpy(), dtype=np.uint8) for n, v in zip(names, xs)}


def calibration_feeds(dataset: Dataset, names: Sequence[str], limit: int = 128, batch_size: int = 16,
                      seed: int = 0) -> list[dict[str, np.ndarray]]:
    """A seeded random subset of a dataset of (views, label, index) as ONNX Runtime feeds."""
    idx = np.random.default_rng(seed).permutation(len(dataset))[: min(limit, len(dataset))]
    loader = DataLoader(torch.utils.data.Subset(dataset, idx.tolist()), batch_size=batch_size, num_workers=0)
    return [_feed(x, names) for x, *_ in loader]


def _weights_block(check: dict[str, Any], recipe: str, feeds: Sequence[dict]) -> dict[str, Any]:
    cpu = cpu_flags()
    return {"method": "onnxruntime static QDQ", "recipe": recipe, "per_channel": True, "activations": "uint8",
            "weights": "int8, 7-bit range [-64, 64]" if INT8_RECIPES[recipe]["reduce_range"] else "int8",
            "bias_correction": INT8_RECIPES[recipe]["bias_correction"], "calibration": "MinMax",
            "calibration_images": int(sum(len(next(iter(f.values()))) for f in feeds)),
            "saturation_safe": check["saturation_safe"], "files": {FILES["int8"]: check},
            "validated_on": {"cpu": cpu["cpu"], "arch": cpu["arch"], "flags": cpu["flags"], "vnni": cpu["vnni"],
                             "at": time.strftime("%Y-%m-%dT%H:%M:%S")}}


def export_fused(model_dir: Path, calibration: Dataset, *, recipe: str = DEFAULT_INT8_RECIPE,
                 calibration_size: int = CALIBRATION_IMAGES) -> dict[str, Any]:
    """Write `model_dir/fused/` with the fp32 and INT8 graphs of an ensemble of checkpoint members.

    `calibration`: training images in the ensemble's view(s) (`LoadedModel.transform()`). The
    folder's manifest serves the fp32 graph until :func:`choose_variant` picks. Returns
    {'dir', 'files', 'int8_check', 'export_seconds'}.
    """
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    members = load_ensemble(model_dir, manifest, "cpu", fused=False)
    if not isinstance(members.module, EnsembleModule):
        raise ValueError("only an ensemble of torch checkpoint members can be fused into one graph")
    views = list(members.views)
    out = model_dir / FUSED_DIR
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    names = input_names(len(views))
    with torch.inference_mode():
        export_fused_fp32(FusedEnsembleModule(members.module, views), views, out / FILES["fp32"])
    feeds = calibration_feeds(calibration, names, calibration_size)
    if not feeds:
        raise ValueError("no calibration images for the fused ensemble's INT8 graph")
    with tempfile.TemporaryDirectory() as tmp:
        pre = prepare_for_quantization(out / FILES["fp32"], Path(tmp) / "pre.onnx")
        quantize_static_int8(pre, out / FILES["int8"], feeds, recipe)
    check = int8_weight_check(out / FILES["int8"])
    embedded = {"class_names": list(manifest["class_names"]), "preprocessing": views[0].to_dict(),
                "uncertainty_threshold": manifest.get("uncertainty_threshold"), "model_name": "ensemble"}
    for f in FILES.values():
        embed_metadata(out / f, embedded)
    write_manifest(out, "onnx", FILES["fp32"], name=manifest.get("name"), **embedded,
                   views=[v.to_dict() for v in views], files=dict(FILES),
                   input={"names": names, "dtype": "uint8", "layout": "NCHW", "sizes": [v.image_size for v in views]},
                   output={"name": OUTPUT_NAME, "meaning": "weighted mean of the members' softmax probabilities"},
                   members=[m["name"] for m in manifest["members"]], weights=manifest.get("weights"),
                   quantization=_weights_block(check, recipe, feeds), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    seconds = time.perf_counter() - t0
    log.info("fused ensemble graphs (fp32, INT8 %s, saturation-safe %s) written to %s in %.1fs", recipe,
             check["saturation_safe"], out, seconds)
    return {"dir": out, "files": dict(FILES), "int8_check": check, "export_seconds": seconds}


def load_fused_variant(model_dir: Path, variant: str) -> LoadedModel:
    """The fused `fp32` or `int8` graph of an ensemble folder as a LoadedModel (for comparisons)."""
    fused = Path(model_dir) / FUSED_DIR
    manifest = read_manifest(fused)
    return load_onnx(fused / manifest["files"][variant], {**manifest, "file": manifest["files"][variant]}, "cpu")


def compare_latency(models: dict[str, LoadedModel], batches: Sequence[int] = (1, 8),
                    iters: int = 20, max_seconds: float = 5.0) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {batch: {p50_ms, p95_ms, images_per_s, iters, loadavg}}}, single process, this CPU
    (`loadavg`: the 1-minute load average after the measurement: other processes slow it)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, m in models.items():
        out[name] = {}
        for b in batches:
            with torch.inference_mode():
                out[name][str(b)] = latency(m.predict_proba, m.example_batch(b), iters=iters, warmup=2,
                                            max_seconds=max_seconds)
            out[name][str(b)]["loadavg"] = os.getloadavg()[0]
    return out


def choose_variant(members_top1: float, int8_top1: float, int8_check: dict[str, Any],
                   tolerance_points: float = INT8_TOLERANCE_POINTS, int8_ms: float | None = None,
                   fp32_ms: float | None = None) -> tuple[str, str]:
    """('int8' | 'fp32', why): INT8 when it is saturation-safe, within the tolerance of the fp32 vote,
    and (when both batch-1 latencies are given) not slower than the fused fp32 graph on this CPU."""
    gap = 100 * (members_top1 - int8_top1)
    if not int8_check.get("saturation_safe", False):
        return "fp32", "the INT8 weights can saturate on CPUs without VNNI"
    if gap > tolerance_points:
        return "fp32", f"INT8 top-1 is {gap:.2f} points below the fp32 members' vote (> {tolerance_points})"
    if int8_ms is not None and fp32_ms is not None and int8_ms > fp32_ms:
        return "fp32", f"INT8 is slower than fp32 here (batch-1 p50 {int8_ms:.1f} vs {fp32_ms:.1f} ms)"
    return "int8", f"INT8 top-1 is {gap:+.2f} points from the fp32 members' vote (<= {tolerance_points})"


def record_choice(model_dir: Path, variant: str, record: dict[str, Any]) -> dict[str, Any]:
    """Point the fused folder at `variant` and write the ensemble manifest's `fused` entry."""
    model_dir = Path(model_dir)
    fused = model_dir / FUSED_DIR
    update_manifest(fused, file=FILES[variant], comparison=record)
    entry = {"folder": FUSED_DIR, "variant": variant, "file": f"{FUSED_DIR}/{FILES[variant]}", **record}
    update_manifest(model_dir, fused=entry)  # the nested manifest changed: the ensemble's checksums too
    return entry


def fuse_and_compare(model_dir: Path, calibration: Dataset, test: Dataset, members_test: np.ndarray,
                     labels: np.ndarray, *, batch_size: int = 64, workers: int = 0,
                     latency_iters: int = 20) -> dict[str, Any]:
    """Export the fused graphs, test both against the fp32 members' vote, time all three, pick one.

    `test`: the test images in the ensemble's view(s); `members_test`: the fp32 members' vote on
    them (the stage has it already). Returns the manifest's `fused` entry.
    """
    from flowers.inference.predict import predict_dataset

    t0 = time.perf_counter()
    made = export_fused(model_dir, calibration)
    graphs = {k: load_fused_variant(model_dir, k) for k in FILES}
    # small batches: a 3-member graph at batch 64 grew past 21 GiB here (OOM-killed) in ONNX Runtime
    probs = {k: predict_dataset(m.predict_proba, test, batch_size=min(batch_size, EVAL_BATCH), workers=workers)[0]
             for k, m in graphs.items()}
    top1 = {"members_fp32": float((members_test.argmax(1) == labels).mean()),
            **{f"fused_{k}": float((p.argmax(1) == labels).mean()) for k, p in probs.items()}}
    evaluated = time.perf_counter()
    members = load_ensemble(model_dir, read_manifest(model_dir), "cpu", fused=False)
    lat = compare_latency({"members_fp32": members, **{f"fused_{k}": m for k, m in graphs.items()}},
                          iters=latency_iters)
    variant, why = choose_variant(top1["members_fp32"], top1["fused_int8"], made["int8_check"],
                                  int8_ms=lat["fused_int8"]["1"]["p50_ms"], fp32_ms=lat["fused_fp32"]["1"]["p50_ms"])
    record = {
        "test_top1": top1, "test_images": int(len(labels)), "int8_tolerance_points": INT8_TOLERANCE_POINTS,
        "why": why, "fp32_max_abs_prob_diff": float(np.abs(probs["fp32"] - members_test).max()),
        "int8_top1_agreement_with_members": float((probs["int8"].argmax(1) == members_test.argmax(1)).mean()),
        "latency": lat, "cpu": describe_cpu(), "int8_saturation_safe": made["int8_check"]["saturation_safe"],
        "seconds": {"export": made["export_seconds"], "evaluate": evaluated - t0 - made["export_seconds"],
                    "latency": time.perf_counter() - evaluated, "total": time.perf_counter() - t0},
    }
    entry = record_choice(model_dir, variant, record)
    log.info("fused ensemble: test top-1 members %.4f, fused fp32 %.4f, fused INT8 %.4f; batch-1 p50 %.1f / %.1f / "
             "%.1f ms; serving %s (%s); %.0fs added", top1["members_fp32"], top1["fused_fp32"], top1["fused_int8"],
             lat["members_fp32"]["1"]["p50_ms"], lat["fused_fp32"]["1"]["p50_ms"], lat["fused_int8"]["1"]["p50_ms"],
             variant, why, record["seconds"]["total"])
    return entry


def fused_metrics(entry: dict[str, Any] | None) -> dict[str, float]:
    """The `fused` entry as flat run metrics (fused_test_top1_*, fused_latency_*_b{1,8}_p50_ms, ...)."""
    if not entry:
        return {"fused_served": 0.0}
    out = {f"fused_test_top1_{k}": v for k, v in entry["test_top1"].items()}
    for model, by_batch in entry["latency"].items():
        for b, d in by_batch.items():
            out[f"fused_latency_{model}_b{b}_p50_ms"] = d["p50_ms"]
            out[f"fused_latency_{model}_b{b}_images_per_s"] = d["images_per_s"]
    out.update({"fused_served": 1.0, "fused_served_int8": float(entry["variant"] == "int8"),
                "fused_fp32_max_abs_prob_diff": entry["fp32_max_abs_prob_diff"],
                "fused_int8_top1_agreement_with_members": entry["int8_top1_agreement_with_members"],
                **{f"fused_seconds_{k}": v for k, v in entry["seconds"].items()}})
    return out


def fuse_for_stage(model_dir: Path, data: Any, ensemble: LoadedModel, members_test: np.ndarray,
                   labels: np.ndarray, **kwargs: Any) -> dict[str, float]:
    """`fuse_and_compare` for the L4 stage (`data`: its DataBundle; calibration on training images, in
    the ensemble's views): a failure costs the fused graph (the members serve), never the stage."""
    try:
        calibration, test = (data.eval_part(s, ensemble.transform(), ensemble.draft_size) for s in ("train", "test"))
        return fused_metrics(fuse_and_compare(model_dir, calibration, test, members_test, labels, **kwargs))
    except Exception as e:
        log.warning("fused ensemble graph not built (%s: %s); the ensemble serves its members", type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        shutil.rmtree(Path(model_dir) / FUSED_DIR, ignore_errors=True)
        if any(k.startswith(f"{FUSED_DIR}/") for k in read_manifest(model_dir).get("sha256", {})):
            update_manifest(model_dir, fused=None)  # no checksum of a removed file may stay behind
        return fused_metrics(None)
