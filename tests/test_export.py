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

from flowers.export import export_student, load_variant
from flowers.predict import load_model


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
    import flowers.export as E

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
