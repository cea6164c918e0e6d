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

INT8 that holds on every x86 CPU: ONNX Runtime multiplies uint8 activations by int8 weights.
CPUs with VNNI (avx512_vnni, avx_vnni) or AMX accumulate those products in 32 bits; older x86
CPUs (AVX2 / AVX-512 without VNNI) add each pair of products into a *saturating* 16-bit integer
first, and 255 x 127 x 2 = 64,770 does not fit in 32,767. The default recipe, `u8s8_7bit_bc`,
quantizes weights to 7 bits (`reduce_range`: [-64, 64]), so a pair is at most 255 x 64 x 2 =
32,640 and cannot saturate on any x86 CPU, in any runtime: safe by construction, checked on the
written file (`int8_weight_check`). The coarser weights cost accuracy; bias correction (each
convolution's bias absorbs the expected shift of its weights' rounding) wins it back. The
manifest's `quantization` block records the recipe, that check, and the CPU flags of the machine
that exported and validated the model. `load_onnx` inspects the file: an INT8 model with full
8-bit weights (recipe `u8s8`, or exported before the 7-bit default) on an x86 CPU without VNNI
logs one warning, carries it in `meta["warnings"]`, and gets ONNX Runtime's
`session.x64quantprecision`, which keeps it exact through slower u8 x u8 kernels. Only then: that
option also switches 8-bit models to the slow kernels on VNNI CPUs.

Class names, preprocessing and the uncertainty threshold are also embedded in each ONNX file's
metadata, so the file alone is enough. Loading without this package (numpy, Pillow, onnxruntime)::

    import json, numpy as np, onnxruntime as ort
    from PIL import Image
    meta = json.load(open("student/flowers_model.json"))
    pp = meta["preprocessing"]                          # resize short side, centre crop; uint8 input
    sess = ort.InferenceSession("student/" + meta["file"], providers=["CPUExecutionProvider"])
    img = Image.open("flower.jpg").convert("RGB")
    s = pp["resize_size"] / min(img.size); img = img.resize((round(img.width * s), round(img.height * s)), Image.BILINEAR)
    left, top = (img.width - pp["image_size"]) // 2, (img.height - pp["image_size"]) // 2
    x = np.asarray(img.crop((left, top, left + pp["image_size"], top + pp["image_size"]))).transpose(2, 0, 1)[None]
    probs = sess.run(None, {"images": x})[0][0]
    p = np.clip(probs, 1e-12, 1); h = -(p * np.log(p)).sum() / np.log(len(p))   # normalized entropy
    print(meta["class_names"][probs.argmax()], probs.max(), "uncertain" if h > meta["uncertainty_threshold"] else "")

(`tests/test_export.py` runs this in a fresh interpreter that cannot import `flowers`.)
"""
from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from flowers.checkpoint import (ModelLoadError, load_checkpoint, model_from_checkpoint, read_manifest, update_manifest,
                                write_manifest)
from flowers.data.transforms import Preprocessing
from flowers.predict import LoadedModel, TorchProbModel
from flowers.runtime import cpu_share

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "probs"
# manifest keys that also travel inside each ONNX file (a bare .onnx is enough to serve)
EMBEDDED_KEYS = ("class_names", "preprocessing", "uncertainty_threshold", "model_name")
REGISTERED_NAME = "flowers-student"
FILES = {
    "fp32": "model_fp32.onnx",
    "int8": "model_int8.onnx",
    "dynamic_int8": "model_dynamic_int8.onnx",
    "torchscript": "model_fp32.torchscript.pt",
}
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
DEFAULT_INT8_RECIPE = "u8s8_7bit_bc"
_Q7_MAX = 64  # ORT's reduced int8 range for symmetric weights: [-64, 64]
# x86 instruction sets INT8 inference depends on (reported by exports, loads and benches)
INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # 32-bit accumulation of u8 x s8 products
_INT16_MAX = 32767
X64_PRECISION_OPTION = "session.x64quantprecision"  # ONNX Runtime session config key
_U8_MAX = 255


class _ProbModel(torch.nn.Module):
    """uint8 NCHW → probabilities: what every exported graph computes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.inner(x), dim=1)


# ----------------------------------------------------------------------------- CPU and INT8 safety


def cpu_flags(cpuinfo: str | None = None, arch: str | None = None) -> dict[str, Any]:
    """This CPU: model name, architecture, which of `INT8_CPU_FLAGS` it has, and whether it has VNNI.

    Read from /proc/cpuinfo (Linux; `cpuinfo` passes that text instead). Elsewhere `known` is
    False and `vnni` None: nothing is claimed about a CPU that could not be read.
    """
    arch = (arch or platform.machine()).lower()
    out: dict[str, Any] = {"cpu": platform.processor() or arch, "arch": arch, "flags": [], "known": False,
                           "vnni": None}
    text = cpuinfo
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return out
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name":
            out["cpu"] = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    out["flags"] = [f for f in INT8_CPU_FLAGS if f in flags]
    out["known"] = bool(flags)
    if out["known"]:
        out["vnni"] = any(f in flags for f in VNNI_FLAGS)
    return out


def describe_cpu(info: dict[str, Any] | None = None) -> str:
    """One line: 'AMD EPYC (x86_64): avx2 avx512f avx512_vnni; VNNI yes'."""
    info = info or cpu_flags()
    if not info.get("known"):
        return f"{info.get('cpu')} ({info.get('arch')}): CPU flags unknown"
    vnni = "yes" if info.get("vnni") else "NO (u8 x s8 pair sums saturate at 16 bits)"
    return f"{info['cpu']} ({info['arch']}): {' '.join(info['flags']) or 'none of ' + '/'.join(INT8_CPU_FLAGS)}; VNNI {vnni}"


def is_x86(info: dict[str, Any]) -> bool:
    return str(info.get("arch", "")).lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def int8_weight_check(path: Path) -> dict[str, Any]:
    """What an ONNX file's own int8 weights allow: {'int8', 'max_abs_weight', 'saturation_safe'}.

    Every int8 initializer counts (weights and their zero points; biases are int32). The file
    is saturation-safe when a pair of uint8 x int8 products fits in int16: 2 x 255 x max|w| <= 32767,
    i.e. weights within [-64, 64].
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    peak = None
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8:
            arr = numpy_helper.to_array(init)
            if arr.size:
                m = int(np.abs(arr.astype(np.int16)).max())
                peak = m if peak is None else max(peak, m)
    if peak is None:
        return {"int8": False, "max_abs_weight": None, "saturation_safe": True}
    return {"int8": True, "max_abs_weight": peak, "saturation_safe": 2 * _U8_MAX * peak <= _INT16_MAX}


def saturation_warning(path: Path, check: dict[str, Any], cpu: dict[str, Any]) -> str | None:
    """The one-line warning for an INT8 file that can saturate on this CPU (None when it cannot)."""
    if not check.get("int8") or check.get("saturation_safe") or not cpu.get("known") or not is_x86(cpu) \
            or cpu.get("vnni"):
        return None
    return (f"{Path(path).name} is not quantized for this CPU: full 8-bit INT8 weights (max |w| "
            f"{check['max_abs_weight']}) on a CPU without VNNI ({describe_cpu(cpu)}); ONNX Runtime stays exact only "
            f"through its slower u8 x u8 kernels ({X64_PRECISION_OPTION}, set for it here) and other runtimes lose "
            f"accuracy to saturated u8 x s8 pair sums; re-export it with `flowers export` (recipe "
            f"{DEFAULT_INT8_RECIPE}, 7-bit weights)")


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


class _Calibration:
    """onnxruntime CalibrationDataReader over uint8 batches (duck-typed: get_next / rewind)."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self.batches = list(batches)
        self._it: Iterator[np.ndarray] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self._it, None)
        return None if b is None else {INPUT_NAME: b}

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
    """ORT's recommended pre-pass (shape inference + graph optimization); falls back to the raw model."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return dst
    except Exception as e:  # an unsupported op in symbolic shape inference is not fatal
        log.warning("quant_pre_process failed (%s); quantizing the unprocessed graph", str(e).splitlines()[0])
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
        values = sess.run(wanted, {input_name: x})
        for name, v in zip(wanted, values):
            sums[name] = sums.get(name, 0) + v.astype(np.float64).mean(axis=(2, 3)).sum(axis=0)
        count += len(x)
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


def quantize_static_int8(fp32: Path, out: Path, batches: Sequence[np.ndarray],
                         recipe: str = DEFAULT_INT8_RECIPE) -> Path:
    """Post-training static INT8: QDQ format, per-channel int8 weights, uint8 activations (MinMax calibration).

    `recipe` (see `INT8_RECIPES`): the 7-bit ones keep weights in [-64, 64] so no x86 CPU can
    saturate; `u8s8_7bit_bc` also bias-corrects the convolutions first (:func:`bias_correct_7bit`,
    on the same calibration images). `fp32` should have been through
    :func:`prepare_for_quantization`. The final Softmax stays in float: quantized probabilities
    (steps of 1/256) would spoil the entropy.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    softmax = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Softmax"]
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


def _embed_metadata(path: Path, meta: dict[str, Any]) -> None:
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
            _embed_metadata(out_dir / files[key], embedded)
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
            _embed_metadata(Path(model_dir) / f, embedded)
    update_manifest(model_dir)  # the ONNX files changed: their checksums too


# ----------------------------------------------------------------------------- loading


def onnx_session(path: Path, threads: int | None = None, precise: bool = False):
    """An ONNX Runtime CPU session using this process's CPU share (Ray worker / Serve replica).

    `precise`: run int8 weights outside [-64, 63] through ORT's exact u8 x u8 kernels instead of
    u8 x s8 ones, whose 16-bit pair sums saturate on x86 CPUs without VNNI. Slower, and ORT 1.32
    applies it on VNNI CPUs too (measured 2.8x slower there for an 8-bit student), so `load_onnx`
    asks for it only for an 8-bit model on a CPU without VNNI.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or cpu_share()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if precise:
        opts.add_session_config_entry(X64_PRECISION_OPTION, "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def load_onnx(path: Path, manifest: dict, device: str) -> LoadedModel:
    """Loader for manifest kind `onnx` (or a bare .onnx file with embedded metadata)."""
    path = Path(path)
    if path.is_dir():
        path = path / manifest.get("file", FILES["int8"])
    if not path.is_file():
        raise ModelLoadError(f"ONNX model file not found: {path}")
    # the file itself says whether its INT8 weights can saturate; this CPU says whether that matters
    check = int8_weight_check(path)
    cpu = cpu_flags() if check["int8"] else {}
    # an 8-bit model on an x86 CPU without VNNI (or one that could not be read) needs the exact kernels
    precise = bool(check["int8"] and not check["saturation_safe"] and is_x86(cpu) and not cpu.get("vnni"))
    sess = onnx_session(path, precise=precise)
    embedded = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items()
                if k in EMBEDDED_KEYS}
    meta = {**embedded, **manifest}
    if not meta.get("class_names") or not meta.get("preprocessing"):
        raise ModelLoadError(f"{path} carries no class names/preprocessing; export it with `flowers export`")
    input_name = sess.get_inputs()[0].name

    def proba(x: torch.Tensor) -> np.ndarray:
        arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return sess.run(None, {input_name: np.ascontiguousarray(arr, dtype=np.uint8)})[0]

    info = {k: v for k, v in meta.items() if k not in ("file", "class_names", "preprocessing")}
    info.update({"kind": "onnx", "onnx_file": path.name})
    if check["int8"]:
        info["int8_check"] = {**check, "cpu": describe_cpu(cpu), "exact_u8u8_kernels": precise}
        warning = saturation_warning(path, check, cpu)
        if warning:
            log.warning(warning)
            info["warnings"] = [*(info.get("warnings") or []), warning]
    return LoadedModel(proba, Preprocessing.from_dict(meta["preprocessing"]), list(meta["class_names"]),
                       meta.get("name", REGISTERED_NAME), version=meta.get("version"), meta=info, source=str(path))


def load_variant(model_dir: Path, variant: str) -> LoadedModel:
    """One of the exported files (fp32 | int8 | dynamic_int8) of a student folder as a LoadedModel."""
    manifest = read_manifest(model_dir)
    if variant not in manifest.get("files", {}):
        raise ModelLoadError(f"{model_dir} has no '{variant}' export (has {', '.join(manifest.get('files', {}))})")
    return load_onnx(Path(model_dir) / manifest["files"][variant], {**manifest, "file": manifest["files"][variant]}, "cpu")


# ----------------------------------------------------------------------------- latency


def latency(fn: Callable[[Any], Any], batch: Any, iters: int = 50, warmup: int = 5,
            max_seconds: float = 20.0) -> dict[str, float]:
    """Wall-clock latency of `fn(batch)`: p50/p95 in ms and images per second (single process)."""
    for _ in range(warmup):
        fn(batch)
    times = []
    start = time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > max_seconds and len(times) >= 5:
            break  # slow models (the fp32 ensemble) stop early instead of dominating the run
    ms = np.asarray(times) * 1000
    n = len(batch)
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "images_per_s": float(n / np.median(times)), "iters": len(times)}
