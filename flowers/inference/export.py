"""Export a student checkpoint to portable artifacts: ONNX fp32, ONNX static INT8, dynamic INT8, TorchScript.

Every ONNX graph takes the raw uint8 NCHW batch (normalization baked in, dynamic batch) and
returns softmax probabilities, so serving needs only the shared resize + centre crop. The
folder written by :func:`export_student`::

    flowers_model.json          {"kind": "onnx", "file": "model_int8.onnx", "class_names", "preprocessing",
                                 "uncertainty_threshold", "files": {...}, ...}
    model_fp32.onnx             torch.onnx.export (dynamo path)
    model_int8.onnx             ONNX Runtime static INT8, QDQ, per-channel weights, calibrated on training images
    model_dynamic_int8.onnx     dynamic INT8 of Linear/MatMul only: the seed's method, kept as a comparison row
    model_fp32.torchscript.pt   traced TorchScript, for seed compatibility (TorchScript is deprecated)

INT8 recipes and why the default holds on every x86 CPU: `flowers.inference.onnx_models`.

Loading the files, with or without this package: `flowers.inference.onnx_models`.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from flowers.models.checkpoint import (load_checkpoint, model_from_checkpoint, read_manifest, update_manifest,
                                write_manifest)
from flowers.data.transforms import Preprocessing
from flowers.inference.onnx_models import (DEFAULT_INT8_RECIPE, EMBEDDED_KEYS, FILES, REGISTERED_NAME, cpu_flags, describe_cpu,
                                 int8_weight_check, onnx_session)
from flowers.inference.loaded import TorchProbModel
from flowers.runtime import cpu_share

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "probs"
# How the weights are quantized (activations are always uint8): the 7-bit recipes cannot saturate
# the 16-bit pair sums of x86 CPUs without VNNI; `u8s8_7bit_bc` adds bias correction (each
# convolution's bias absorbs the expected output shift of its weights' rounding; it recovered the
# 7-bit loss on the study's student, README). `u8s8` (full 8-bit weights) is exact without VNNI only
# through ORT's slower u8 x u8 kernels; `u8u8` is safe too but ORT runs it far slower. The others
# are kept for comparison (bench/int8_recipes.py).
INT8_RECIPES = {"u8s8_7bit_bc": {"weights": "int8", "reduce_range": True, "bias_correction": True},
                "u8s8_7bit": {"weights": "int8", "reduce_range": True, "bias_correction": False},
                "u8s8": {"weights": "int8", "reduce_range": False, "bias_correction": False},
                "u8u8": {"weights": "uint8", "reduce_range": False, "bias_correction": False}}
_Q7_MAX = 64  # ORT's reduced int8 range for symmetric weights: [-64, 64]


class _ProbModel(torch.nn.Module):
    """uint8 NCHW → probabilities: what every exported graph computes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.inner(x), dim=1)


# ----------------------------------------------------------------------------- individual exports


def export_onnx_fp32(module: torch.nn.Module, path: Path, image_size: int) -> Path:
    """torch.onnx.export through torch.export (dynamo), dynamic batch, uint8 input."""
    module = _ProbModel(module).eval()
    x = torch.randint(0, 256, (2, 3, image_size, image_size), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    return path


def as_feed(batch: Any, input_name: str = INPUT_NAME) -> dict[str, np.ndarray]:
    """An ONNX Runtime feed: a dict of named inputs as is, a single array under `input_name`."""
    return batch if isinstance(batch, dict) else {input_name: batch}


def feed_len(batch: Any) -> int:
    return len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)


class _Calibration:
    """onnxruntime CalibrationDataReader over uint8 batches (duck-typed: get_next / rewind)."""

    def __init__(self, batches: Sequence[Any]) -> None:
        self.batches = list(batches)
        self._it: Iterator[Any] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self._it, None)
        return None if b is None else as_feed(b)

    def rewind(self) -> None:
        self._it = iter(self.batches)


def calibration_batches(calibration: Dataset | Sequence[torch.Tensor], limit: int = 256, batch_size: int = 16,
                        seed: int = 0) -> list[np.ndarray]:
    """uint8 NCHW numpy batches from a dataset of (image, label, index) (a seeded random subset) or tensors."""
    if isinstance(calibration, Dataset):
        n = len(calibration)
        idx = np.random.default_rng(seed).permutation(n)[: min(limit, n)]
        loader = DataLoader(torch.utils.data.Subset(calibration, idx.tolist()), batch_size=batch_size, num_workers=0)
        return [x.numpy().astype(np.uint8) for x, *_ in loader]
    out, seen = [], 0
    for t in calibration:
        t = t if t.ndim == 4 else t[None]
        out.append(t.numpy().astype(np.uint8))
        seen += len(t)
        if seen >= limit:
            break
    return out


def prepare_for_quantization(src: Path, dst: Path) -> Path:
    """ORT's recommended pre-pass (shape inference + graph optimization: BatchNormalization folded into
    its Conv, constants folded). Symbolic shape inference fails on some exported graphs (a fused
    ensemble's); the pass is then run with ONNX's own shape inference, and only if that fails too is the
    raw graph quantized, with a warning: its BatchNormalization ops would be quantized on their own."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    err = ""
    for skip_symbolic in (False, True):
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
            return dst
        except Exception as e:  # an unsupported op in symbolic shape inference is not fatal
            err = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.info("quant_pre_process (skip_symbolic_shape=%s) failed: %s", skip_symbolic, err)
    log.warning("quant_pre_process failed (%s); quantizing the unprocessed graph", err)
    return src


def _recipe(name: str) -> dict[str, Any]:
    if name not in INT8_RECIPES:
        raise ValueError(f"unknown INT8 recipe '{name}'; use one of: {', '.join(INT8_RECIPES)}")
    return INT8_RECIPES[name]


def conv_input_means(graph: Any, batches: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-channel mean of every Conv input (over images and positions) of an fp32 ONNX model
    (an `onnx.ModelProto`, left unchanged)."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(graph)  # the probe's extra outputs go on a copy
    inits = {i.name for i in model.graph.initializer}
    wanted = sorted({n.input[0] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits})
    outputs = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in outputs:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cpu_share()
    # no fusions: every requested intermediate must stay a real tensor
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    sums: dict[str, np.ndarray] = {}
    count = 0
    for x in batches:
        values = sess.run(wanted, as_feed(x, input_name))
        for name, v in zip(wanted, values):
            sums[name] = sums.get(name, 0) + v.astype(np.float64).mean(axis=(2, 3)).sum(axis=0)
        count += feed_len(x)
    return {name: v / max(1, count) for name, v in sums.items()}


def bias_correct_7bit(fp32: Path, out: Path, batches: Sequence[np.ndarray]) -> Path:
    """An fp32 model whose Conv biases absorb the expected output error of 7-bit weight rounding.

    Per output channel o, rounding weights to the symmetric per-channel 7-bit grid that
    quantization will use (scale max|w|/64) shifts the output by sum_i (w_q - w)[o, i] * E[x_i],
    with E[x] each input channel's mean over the calibration images. Subtracting that from the
    bias removes the systematic part of the error (bias correction, Nagel et al. 2019); the
    random part is what remains. Quantizing the result with the same 7-bit recipe gives the
    `u8s8_7bit_bc` model.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fp32))
    means = conv_input_means(model, batches)
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        flat = w.reshape(len(w), -1)
        scale = np.abs(flat).max(axis=1) / _Q7_MAX
        scale[scale == 0] = 1.0
        err = (np.clip(np.round(flat / scale[:, None]), -_Q7_MAX, _Q7_MAX) * scale[:, None] - flat).reshape(w.shape)
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        per_group_in, per_group_out = w.shape[1], len(w) // group
        # each output channel sees its group's slice of input channels
        mu = means[node.input[0]].reshape(group, per_group_in).repeat(per_group_out, axis=0)
        shift = (err.sum(axis=(2, 3)) * mu).sum(axis=1)
        if len(node.input) > 2 and node.input[2] in inits:
            name = node.input[2]
            bias = numpy_helper.to_array(inits[name]).astype(np.float64)
            inits[name].CopyFrom(numpy_helper.from_array((bias - shift).astype(np.float32), name))
        else:
            name = node.input[1] + "_bias_correction"
            model.graph.initializer.append(numpy_helper.from_array((-shift).astype(np.float32), name))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name
    onnx.save(model, str(out))
    return out


def softmax_and_after(graph: Any) -> list[str]:
    """Names of the Softmax nodes of an ONNX graph and of every node fed by them (directly or not):
    what stays float, so probabilities (a student's, or an ensemble's weighted vote) are never quantized."""
    names, tainted = [], set()
    for node in graph.node:  # ONNX graphs are stored in topological order
        if node.op_type == "Softmax" or any(i in tainted for i in node.input):
            names.append(node.name)
            tainted.update(node.output)
    return names


def quantize_static_int8(fp32: Path, out: Path, batches: Sequence[Any],
                         recipe: str = DEFAULT_INT8_RECIPE) -> Path:
    """Post-training static INT8: QDQ format, per-channel int8 weights, uint8 activations (MinMax calibration).

    `recipe` (see `INT8_RECIPES`): the 7-bit ones keep weights in [-64, 64] so no x86 CPU can
    saturate; `u8s8_7bit_bc` also bias-corrects the convolutions first (:func:`bias_correct_7bit`,
    on the same calibration images). `fp32` should have been through
    :func:`prepare_for_quantization`. The final Softmax (and anything after it) stays in float:
    quantized probabilities (steps of 1/256) would spoil the entropy. `batches`: uint8 arrays, or
    dicts of them by input name. MinMax calibration holds every batch's intermediate tensors in
    memory (ORT 1.32's CalibMaxIntermediateOutputs drops data instead of folding it): size it.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    softmax = softmax_and_after(onnx.load(str(fp32)).graph)
    r = _recipe(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        if r["bias_correction"]:
            fp32 = bias_correct_7bit(fp32, Path(tmp) / "bias_corrected.onnx", batches)
        quantize_static(str(fp32), str(out), _Calibration(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QUInt8 if r["weights"] == "uint8" else QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=softmax,
                        reduce_range=r["reduce_range"])
    return out


def quantize_dynamic_linear(fp32: Path, out: Path, recipe: str = DEFAULT_INT8_RECIPE) -> Path:
    """The seed's dynamic quantization: only Linear layers (Gemm/MatMul) become INT8; convolutions stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    r = _recipe(recipe)
    quantize_dynamic(str(fp32), str(out), op_types_to_quantize=["MatMul", "Gemm"],
                     weight_type=QuantType.QUInt8 if r["weights"] == "uint8" else QuantType.QInt8,
                     reduce_range=r["reduce_range"])
    return out


def agreement(a: Path, b: Path, batches: Sequence[np.ndarray]) -> float:
    """Share of images on which two ONNX files predict the same class (here: INT8 vs fp32 on calibration images)."""
    sa, sb = onnx_session(a), onnx_session(b)
    same = total = 0
    for x in batches:
        pa = sa.run(None, {sa.get_inputs()[0].name: x})[0].argmax(1)
        pb = sb.run(None, {sb.get_inputs()[0].name: x})[0].argmax(1)
        same += int((pa == pb).sum())
        total += len(x)
    return same / max(1, total)


def export_torchscript(module: torch.nn.Module, path: Path, image_size: int) -> Path:
    """Traced + frozen TorchScript (uint8 in, probabilities out). TorchScript is deprecated in
    PyTorch; it is kept behind this one function only for the seed's consumers."""
    x = torch.randint(0, 256, (1, 3, image_size, image_size), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_ProbModel(module).eval(), x)
        torch.jit.save(torch.jit.freeze(traced), str(path))
    return path


def embed_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Replace an ONNX file's metadata with `meta` (JSON values), so the file alone can be served."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, json.dumps(v)
    onnx.save(model, str(path))


# ----------------------------------------------------------------------------- the student export


def export_student(checkpoint: Path, out_dir: Path, calibration: Dataset | Sequence[torch.Tensor],
                   threshold: float | None = None, *, calibration_size: int = 256, name: str = REGISTERED_NAME,
                   torchscript: bool = True, dynamic: bool = True, extra: dict[str, Any] | None = None,
                   int8_recipe: str = DEFAULT_INT8_RECIPE) -> Path:
    """Export a flowers checkpoint to `out_dir` (see the module docstring); returns the folder.

    `calibration`: training images (a dataset yielding uint8 (image, label, index) with the eval
    transform, or uint8 NCHW tensors). `threshold`: the entropy flag threshold chosen on val.
    `int8_recipe`: how weights are quantized (`INT8_RECIPES`; the default cannot saturate).
    """
    _recipe(int8_recipe)
    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    pp = Preprocessing.from_dict(ckpt["preprocessing"])
    module = TorchProbModel(model_from_checkpoint(ckpt), pp).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    files["fp32"] = export_onnx_fp32(module, out_dir / FILES["fp32"], pp.image_size).name
    batches = calibration_batches(calibration, calibration_size)
    if not batches:
        raise ValueError("no calibration images: pass training images (a dataset or uint8 tensors)")
    with tempfile.TemporaryDirectory() as tmp:
        pre = prepare_for_quantization(out_dir / FILES["fp32"], Path(tmp) / "pre.onnx")
        files["int8"] = quantize_static_int8(pre, out_dir / FILES["int8"], batches, int8_recipe).name
        if dynamic:
            files["dynamic_int8"] = quantize_dynamic_linear(pre, out_dir / FILES["dynamic_int8"], int8_recipe).name
    # validated on this CPU: the written files' weight ranges, and INT8 vs fp32 on the calibration images
    checks = {k: int8_weight_check(out_dir / files[k]) for k in ("int8", "dynamic_int8") if k in files}
    cpu = cpu_flags()
    validated = {"cpu": cpu["cpu"], "arch": cpu["arch"], "flags": cpu["flags"], "vnni": cpu["vnni"],
                 "int8_fp32_agreement_calibration": agreement(out_dir / files["int8"], out_dir / files["fp32"], batches),
                 "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if torchscript:
        files["torchscript"] = export_torchscript(module, out_dir / FILES["torchscript"], pp.image_size).name
    embedded = {"class_names": list(ckpt["class_names"]), "preprocessing": pp.to_dict(),
                "uncertainty_threshold": threshold, "model_name": ckpt["model_name"]}
    for key in ("fp32", "int8", "dynamic_int8"):
        if key in files:
            embed_metadata(out_dir / files[key], embedded)
    test = ckpt.get("test_metrics", {})
    extra = dict(extra or {})
    # the student's data/split/config hashes from training, plus what the caller adds (its teacher)
    lineage = {**(ckpt.get("lineage") or {}), **(extra.pop("lineage", None) or {})}
    write_manifest(
        out_dir, "onnx", files["int8"],
        name=name,
        **embedded,
        files=files,
        input={"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "size": pp.image_size},
        output={"name": OUTPUT_NAME, "meaning": "softmax probabilities"},
        quantization={"method": "onnxruntime static QDQ", "recipe": int8_recipe, "per_channel": True,
                      "activations": "uint8",
                      "weights": "int8, 7-bit range [-64, 64]" if INT8_RECIPES[int8_recipe]["reduce_range"] else "int8",
                      "bias_correction": INT8_RECIPES[int8_recipe]["bias_correction"],
                      "calibration": "MinMax", "calibration_images": int(sum(len(b) for b in batches)),
                      "saturation_safe": all(c["saturation_safe"] for c in checks.values()),
                      "files": {files[k]: c for k, c in checks.items()}, "validated_on": validated},
        fp32_test_accuracy=test.get("top1"),
        config=ckpt["config"],
        source_checkpoint=str(checkpoint),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        lineage=lineage,
        **extra,
    )
    log.info("exported %s to %s in %.1fs (%s); INT8 recipe %s, saturation-safe %s, validated on %s",
             checkpoint, out_dir, time.perf_counter() - t0, ", ".join(files.values()), int8_recipe,
             all(c["saturation_safe"] for c in checks.values()), describe_cpu(cpu))
    return out_dir


def sync_onnx_metadata(model_dir: Path) -> None:
    """Copy class names, preprocessing and threshold from the manifest into every ONNX file's metadata."""
    manifest = read_manifest(model_dir)
    embedded = {k: manifest.get(k) for k in EMBEDDED_KEYS}
    for f in manifest.get("files", {}).values():
        if f.endswith(".onnx"):
            embed_metadata(Path(model_dir) / f, embedded)
    update_manifest(model_dir)  # the ONNX files changed: their checksums too
