"""Load exported ONNX models with ONNX Runtime, exactly, on every CPU; what this CPU can do for INT8.

INT8 that holds on every x86 CPU (recipes: `flowers.inference.export.INT8_RECIPES`): ONNX Runtime multiplies uint8 activations by int8 weights.
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
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from flowers.models.checkpoint import ModelLoadError, read_manifest
from flowers.data.transforms import Preprocessing
from flowers.inference.loaded import LoadedModel
from flowers.runtime import cpu_share

log = logging.getLogger(__name__)

# manifest keys that also travel inside each ONNX file (a bare .onnx is enough to serve)
EMBEDDED_KEYS = ("class_names", "preprocessing", "uncertainty_threshold", "model_name")
REGISTERED_NAME = "flowers-student"
FILES = {
    "fp32": "model_fp32.onnx",
    "int8": "model_int8.onnx",
    "dynamic_int8": "model_dynamic_int8.onnx",
    "torchscript": "model_fp32.torchscript.pt",
}
DEFAULT_INT8_RECIPE = "u8s8_7bit_bc"  # the export's default (flowers.inference.export.INT8_RECIPES): 7-bit weights
# x86 instruction sets INT8 inference depends on (reported by exports, loads and benches)
INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # 32-bit accumulation of u8 x s8 products
_INT16_MAX = 32767
X64_PRECISION_OPTION = "session.x64quantprecision"  # ONNX Runtime session config key
_U8_MAX = 255


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


def load_onnx(path: Path, manifest: dict, device: str, threads: int | None = None) -> LoadedModel:
    """Loader for manifest kind `onnx` (or a bare .onnx file with embedded metadata); `threads`: the
    session's intra-op threads (default: this process's CPU share)."""
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
    sess = onnx_session(path, threads, precise=precise)
    embedded = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items()
                if k in EMBEDDED_KEYS}
    meta = {**embedded, **manifest}
    if not meta.get("class_names") or not meta.get("preprocessing"):
        raise ModelLoadError(f"{path} carries no class names/preprocessing; export it with `flowers export`")
    input_names = [i.name for i in sess.get_inputs()]  # one per input view (a fused ensemble may have several)

    def proba(x: Any) -> np.ndarray:
        xs = x if isinstance(x, (tuple, list)) else (x,)  # one batch per input view
        feed = {name: np.ascontiguousarray(v.numpy() if isinstance(v, torch.Tensor) else v, dtype=np.uint8)
                for name, v in zip(input_names, xs)}
        return sess.run(None, feed)[0]

    info = {k: v for k, v in meta.items() if k not in ("file", "class_names", "preprocessing")}
    info.update({"kind": "onnx", "onnx_file": path.name})
    if check["int8"]:
        info["int8_check"] = {**check, "cpu": describe_cpu(cpu), "exact_u8u8_kernels": precise}
        warning = saturation_warning(path, check, cpu)
        if warning:
            log.warning(warning)
            info["warnings"] = [*(info.get("warnings") or []), warning]
    views = [Preprocessing.from_dict(v) for v in meta.get("views") or []]
    if views and len(views) != len(input_names):
        raise ModelLoadError(f"{path} has {len(input_names)} inputs but its manifest lists {len(views)} views")
    return LoadedModel(proba, Preprocessing.from_dict(meta["preprocessing"]), list(meta["class_names"]),
                       meta.get("name", REGISTERED_NAME), version=meta.get("version"), meta=info, source=str(path),
                       views=views)


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
