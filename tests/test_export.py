"""Export: INT8 ONNX agrees with fp32, the folder loads through load_model and in a fresh Python without flowers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from flowers.inference.export import export_student
from flowers.inference.onnx_models import load_variant
from flowers.inference.predict import load_model


@pytest.fixture(scope="module")
def exported(trained_checkpoint, tmp_path_factory, synth_root):
    from flowers.data import LabeledImages
    from flowers.data.transforms import Preprocessing, eval_transform

    ckpt = torch.load(trained_checkpoint, weights_only=False)
    pp = Preprocessing.from_dict(ckpt["preprocessing"])
    imgs = sorted((synth_root / "jpg").glob("*.jpg"))
    calib = LabeledImages(imgs[:32], None, eval_transform(pp), pp.resize_size)
    return export_student(trained_checkpoint, tmp_path_factory.mktemp("export") / "student", calib, threshold=0.42,
                          calibration_size=32)


def _images(synth_root, pp_size: int) -> torch.Tensor:
    from flowers.data import LabeledImages
    from flowers.data.transforms import Preprocessing, eval_transform

    pp = Preprocessing.for_size(pp_size)
    ds = LabeledImages(sorted((synth_root / "jpg").glob("*.jpg")), None, eval_transform(pp), pp.resize_size)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_int8_agrees_with_fp32(exported, trained_checkpoint, synth_root):
    manifest = json.loads((exported / "flowers_model.json").read_text())
    assert manifest["kind"] == "onnx" and manifest["file"] == "model_int8.onnx"
    assert set(manifest["files"]) == {"fp32", "int8", "dynamic_int8", "torchscript"}
    torch_model = load_model(trained_checkpoint)
    x = _images(synth_root, torch_model.preprocessing.image_size)
    p_torch = torch_model.predict_proba(x)
    p_fp32 = load_variant(exported, "fp32").predict_proba(x)
    int8 = load_model(exported)  # the manifest's default file: static INT8
    p_int8 = int8.predict_proba(x)
    np.testing.assert_allclose(p_fp32, p_torch, atol=1e-4)
    assert (p_int8.argmax(1) == p_torch.argmax(1)).mean() >= 0.95
    assert np.allclose(p_int8.sum(1), 1.0, atol=1e-4)  # softmax kept in float
    assert int8.meta["uncertainty_threshold"] == 0.42 and int8.class_names == torch_model.class_names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated; kept only for the seed's consumers
        ts = torch.jit.load(str(exported / "model_fp32.torchscript.pt"))
    np.testing.assert_allclose(ts(x).numpy(), p_torch, atol=1e-4)


def test_loads_in_fresh_process_without_flowers(exported, synth_root, tmp_path):
    """The module docstring's snippet, run by a plain interpreter that cannot import flowers."""
    import flowers.inference.onnx_models as E

    doc = E.__doc__
    snippet = doc[doc.index("    import json, numpy"):doc.index("(`tests/test_export.py`")]
    code = "\n".join(line[4:] for line in snippet.splitlines())
    code = code.replace("student/", str(exported) + "/").replace("flower.jpg", str(sorted((synth_root / "jpg").glob("*.jpg"))[0]))
    guard = "import sys\nclass _Block:\n    def find_spec(self, name, *a):\n        if name.split('.')[0] == 'flowers': raise ImportError('flowers blocked')\nsys.meta_path.insert(0, _Block())\n"
    script = tmp_path / "standalone.py"
    script.write_text(guard + code)
    from flowers.runtime import allocator_env

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(allocator_env())
    out = subprocess.run([sys.executable, "-I", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "synthetic" in out.stdout  # a class name came back


def test_bare_onnx_file_carries_metadata(exported):
    m = load_model(exported / "model_int8.onnx")
    assert m.class_names and m.preprocessing.image_size > 0 and m.meta["uncertainty_threshold"] == 0.42


# ----------------------------------------------------------------------------- INT8 on every x86 CPU

NO_VNNI = {"cpu": "Simulated EPYC", "arch": "x86_64", "flags": ["avx2"], "known": True, "vnni": False}
VNNI = {"cpu": "Simulated Xeon", "arch": "x86_64", "flags": ["avx2", "avx512f", "avx512_vnni"], "known": True,
        "vnni": True}


def test_manifest_records_recipe_weight_range_and_cpu_flags(exported):
    from flowers.inference.export import DEFAULT_INT8_RECIPE
    from flowers.inference.onnx_models import cpu_flags, int8_weight_check

    q = json.loads((exported / "flowers_model.json").read_text())["quantization"]
    assert q["recipe"] == DEFAULT_INT8_RECIPE == "u8s8_7bit_bc" and q["activations"] == "uint8"
    assert q["bias_correction"] is True
    # safe by construction, and checked on the written files: 7-bit weights, so 2 x 255 x 64 <= 32767
    assert q["saturation_safe"] is True
    for f in ("model_int8.onnx", "model_dynamic_int8.onnx"):
        assert q["files"][f] == int8_weight_check(exported / f)
        assert q["files"][f]["int8"] and 0 < q["files"][f]["max_abs_weight"] <= 64
    here = cpu_flags()
    v = q["validated_on"]
    assert (v["cpu"], v["flags"], v["vnni"]) == (here["cpu"], here["flags"], here["vnni"])
    assert set(v["flags"]) <= {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"}
    assert 0.9 <= v["int8_fp32_agreement_calibration"] <= 1.0
    assert int8_weight_check(exported / "model_fp32.onnx") == {"int8": False, "max_abs_weight": None,
                                                              "saturation_safe": True}


@pytest.fixture(scope="module")
def unsafe_int8(exported, tmp_path_factory):
    """The same fp32 graph quantized with full 8-bit weights (the recipe that saturates without VNNI)."""
    from flowers.inference.export import quantize_static_int8

    size = json.loads((exported / "flowers_model.json").read_text())["preprocessing"]["image_size"]
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (4, 3, size, size), dtype=np.uint8) for _ in range(2)]
    return quantize_static_int8(exported / "model_fp32.onnx", tmp_path_factory.mktemp("unsafe") / "int8.onnx",
                                batches, recipe="u8s8")


def _load_logged(path, manifest, caplog):
    from flowers.inference.onnx_models import load_onnx

    caplog.clear()
    with caplog.at_level("WARNING", logger="flowers.inference.onnx_models"):
        model = load_onnx(path, manifest, "cpu")
    return model, [r for r in caplog.records if r.name == "flowers.inference.onnx_models" and r.levelname == "WARNING"]


def test_unsafe_int8_on_a_cpu_without_vnni_logs_one_line(exported, unsafe_int8, monkeypatch, caplog):
    import flowers.inference.onnx_models as E

    manifest = json.loads((exported / "flowers_model.json").read_text())
    assert E.int8_weight_check(unsafe_int8)["max_abs_weight"] > 64
    monkeypatch.setattr(E, "cpu_flags", lambda: dict(NO_VNNI))
    model, logged = _load_logged(unsafe_int8, manifest, caplog)
    assert len(logged) == 1 and "\n" not in logged[0].getMessage()
    assert "without VNNI" in logged[0].getMessage() and "Simulated EPYC" in logged[0].getMessage()
    assert model.meta["warnings"] == [logged[0].getMessage()]
    assert model.meta["int8_check"]["saturation_safe"] is False
    # the default export on the same CPU: nothing to say
    model, logged = _load_logged(exported / "model_int8.onnx", manifest, caplog)
    assert logged == [] and "warnings" not in model.meta and model.meta["int8_check"]["saturation_safe"] is True
    # fp32 is never at risk
    model, logged = _load_logged(exported / "model_fp32.onnx", manifest, caplog)
    assert logged == [] and "int8_check" not in model.meta
    # with VNNI the 8-bit model is exact: no warning
    monkeypatch.setattr(E, "cpu_flags", lambda: dict(VNNI))
    model, logged = _load_logged(unsafe_int8, manifest, caplog)
    assert logged == [] and "warnings" not in model.meta


def test_exact_kernels_only_for_an_8bit_model_on_a_cpu_without_vnni(exported, unsafe_int8, monkeypatch):
    """ORT's session.x64quantprecision keeps an 8-bit model exact without VNNI, but also slows it
    down on VNNI CPUs: asked for exactly when the file can saturate on this CPU."""
    import flowers.inference.onnx_models as E

    on = E.onnx_session(exported / "model_int8.onnx", precise=True).get_session_options()
    off = E.onnx_session(exported / "model_int8.onnx").get_session_options()
    assert on.get_session_config_entry(E.X64_PRECISION_OPTION) == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        off.get_session_config_entry(E.X64_PRECISION_OPTION)
    manifest = json.loads((exported / "flowers_model.json").read_text())
    for cpu, path, expect in ((NO_VNNI, unsafe_int8, True), (VNNI, unsafe_int8, False),
                              (NO_VNNI, exported / "model_int8.onnx", False),
                              ({**NO_VNNI, "known": False, "vnni": None}, unsafe_int8, True),
                              ({**NO_VNNI, "arch": "aarch64"}, unsafe_int8, False)):
        monkeypatch.setattr(E, "cpu_flags", lambda cpu=cpu: dict(cpu))
        assert E.load_onnx(path, manifest, "cpu").meta["int8_check"]["exact_u8u8_kernels"] is expect, (cpu, path)


def test_unknown_or_non_x86_cpu_claims_nothing(unsafe_int8):
    from flowers.inference.onnx_models import int8_weight_check, saturation_warning

    check = int8_weight_check(unsafe_int8)
    assert saturation_warning(unsafe_int8, check, NO_VNNI)
    assert saturation_warning(unsafe_int8, check, {**NO_VNNI, "arch": "aarch64"}) is None
    assert saturation_warning(unsafe_int8, check, {**NO_VNNI, "known": False, "vnni": None}) is None


def test_cpu_flags_from_cpuinfo():
    from flowers.inference.onnx_models import cpu_flags, describe_cpu

    avx2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n"
    info = cpu_flags(avx2, "x86_64")
    assert info == {"cpu": "AMD EPYC 7B12", "arch": "x86_64", "flags": ["avx2"], "known": True, "vnni": False}
    assert "VNNI NO" in describe_cpu(info)
    vnni = cpu_flags(avx2.replace("fma", "avx512f avx512bw avx512_vnni amx_int8 amx_tile"), "x86_64")
    assert vnni["flags"] == ["avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"] and vnni["vnni"] is True
    assert cpu_flags("", "x86_64")["known"] is False
    here = cpu_flags()  # this machine: whatever it is, the line says it
    assert {"cpu", "arch", "flags", "known", "vnni"} <= set(here) and describe_cpu(here)


def _two_conv_model(path, rng):
    """X (N,4,6,6) -> grouped 1x1 Conv with bias -> 3x3 Conv without bias (padded): a bias-correction probe."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1 = rng.normal(0, 0.1, (6, 2, 1, 1)).astype(np.float32)
    w1[:, 0, 0, 0] = 1.0  # one large weight per channel: a coarse 7-bit grid, so rounding matters
    w2 = rng.normal(0, 0.1, (3, 6, 3, 3)).astype(np.float32)
    w2[:, 0, 0, 0] = 1.0
    b1 = rng.normal(0, 0.1, 6).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], group=2),
             helper.make_node("Conv", ["h", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
                               numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run_with_rounded_weights(path, x, rounded: bool):
    """Outputs of both convs, with every conv weight rounded to the 7-bit per-channel grid (as the
    quantizer will) or as stored."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name in ("w1", "w2") and rounded:
            w = numpy_helper.to_array(init).astype(np.float64)
            s = np.abs(w.reshape(len(w), -1)).max(1).reshape(-1, 1, 1, 1) / 64
            init.CopyFrom(numpy_helper.from_array((np.clip(np.round(w / s), -64, 64) * s).astype(np.float32), init.name))
    model.graph.output.append(helper.make_empty_tensor_value_info("h"))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["h", "y"], {"x": x})


def test_bias_correction_removes_the_mean_shift_of_7bit_weights(tmp_path):
    """With weights on the 7-bit grid, the corrected model's mean output per channel equals the fp32
    model's (a grouped 1x1 conv: exactly, up to float error); uncorrected, it is off. The second conv
    (3x3, padded: the mean is then approximate) gets the bias it lacked, and its mean error shrinks.
    A no-op or sign-flipped correction fails."""
    from flowers.inference.export import bias_correct_7bit

    rng = np.random.default_rng(0)
    src = _two_conv_model(tmp_path / "fp32.onnx", rng)
    x = (rng.random((32, 4, 6, 6)) * 2 + 1).astype(np.float32)  # inputs with a clearly non-zero mean
    batches = [x[:16], x[16:]]
    fixed = bias_correct_7bit(src, tmp_path / "bc.onnx", batches)
    h_ref, y_ref = _run_with_rounded_weights(src, x, rounded=False)
    h_raw, y_raw = _run_with_rounded_weights(src, x, rounded=True)
    h_bc, _ = _run_with_rounded_weights(fixed, x, rounded=True)
    mean = lambda a: a.astype(np.float64).mean(axis=(0, 2, 3))
    shift_raw = np.abs(mean(h_raw) - mean(h_ref))
    assert shift_raw.max() > 1e-3  # the probe's rounding does shift the mean
    np.testing.assert_allclose(mean(h_bc), mean(h_ref), atol=1e-5)
    import onnx
    conv2 = [n for n in onnx.load(str(fixed)).graph.node if n.op_type == "Conv"][1]
    assert len(conv2.input) == 3 and conv2.input[2]  # a bias was added where there was none
    # the second conv's correction uses the fp32 means of its input
    _, y_bc = _run_with_rounded_weights(fixed, x, rounded=True)
    assert np.abs(mean(y_bc) - mean(y_ref)).max() < 0.5 * np.abs(mean(y_raw) - mean(y_ref)).max()
