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


def quantize_static_int8(fp32: Path, out: Path, batches: Sequence[np.ndarray]) -> Path:
    """Post-training static INT8: QDQ format, per-channel int8 weights, uint8 activations (MinMax calibration).

    `fp32` should have been through :func:`prepare_for_quantization`. The final Softmax stays in
    float: quantized probabilities (steps of 1/256) would spoil the entropy.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    softmax = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Softmax"]
    quantize_static(str(fp32), str(out), _Calibration(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=softmax)
    return out


def quantize_dynamic_linear(fp32: Path, out: Path) -> Path:
    """The seed's dynamic quantization: only Linear layers (Gemm/MatMul) become INT8; convolutions stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
    return out


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
                   torchscript: bool = True, dynamic: bool = True, extra: dict[str, Any] | None = None) -> Path:
    """Export a flowers checkpoint to `out_dir` (see the module docstring); returns the folder.

    `calibration`: training images (a dataset yielding uint8 (image, label, index) with the eval
    transform, or uint8 NCHW tensors). `threshold`: the entropy flag threshold chosen on val.
    """
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
        files["int8"] = quantize_static_int8(pre, out_dir / FILES["int8"], batches).name
        if dynamic:
            files["dynamic_int8"] = quantize_dynamic_linear(pre, out_dir / FILES["dynamic_int8"]).name
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
        quantization={"method": "onnxruntime static QDQ", "per_channel": True, "activations": "uint8",
                      "weights": "int8", "calibration": "MinMax",
                      "calibration_images": int(sum(len(b) for b in batches))},
        fp32_test_accuracy=test.get("top1"),
        config=ckpt["config"],
        source_checkpoint=str(checkpoint),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        lineage=lineage,
        **extra,
    )
    log.info("exported %s to %s in %.1fs (%s)", checkpoint, out_dir, time.perf_counter() - t0, ", ".join(files.values()))
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


def onnx_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session using this process's CPU share (Ray worker / Serve replica)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or cpu_share()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def load_onnx(path: Path, manifest: dict, device: str) -> LoadedModel:
    """Loader for manifest kind `onnx` (or a bare .onnx file with embedded metadata)."""
    path = Path(path)
    if path.is_dir():
        path = path / manifest.get("file", FILES["int8"])
    if not path.is_file():
        raise ModelLoadError(f"ONNX model file not found: {path}")
    sess = onnx_session(path)
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
