"""Registered versions as MLflow Models: a pyfunc around the flowers model folder, no pickle.

`save(folder, out)` writes an MLflow Model directory::

    MLmodel                         flavors: python_function (+ onnx for an exported student),
                                    signature, input example, flowers metadata (kind, lineage)
    flowers_pyfunc.py               "models from code": three lines that build the pyfunc
    code/flowers/                   the flowers package that wrote the model (MLflow's code_paths)
    input_example.json, serving_input_example.json, requirements.txt, python_env.yaml, conda.yaml
    model_card.md                   (when given)
    artifacts/flowers_model/        the flowers model folder itself: manifest, weights, per-image results

The pyfunc is built from code (`python_model=` a .py file), so MLflow writes no cloudpickle
file; it loads `artifacts/flowers_model` with `flowers.inference.predict.load_model`, the same loader
(and checksum verification) as Serve, scoring and `flowers predict`, which also read
`models:/...` URIs of these versions directly (one format, not two).

Input: a DataFrame with one column `image` holding raw encoded image bytes (JPEG, PNG, ...);
over HTTP (`mlflow models serve`) the bytes go base64-encoded, as MLflow does for binary
columns::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 of the JPEG file>"]]}}

Output: one row per image with `label` (class index), `name`, `confidence` (top-1
probability), `entropy` (normalized, 0..1), `uncertain` (entropy above the model's threshold)
and `error` (null, or why the image could not be decoded; then label is -1).
"""
from __future__ import annotations

import base64
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from flowers.registry.uris import MODEL_FOLDER

log = logging.getLogger(__name__)

FOLDER = MODEL_FOLDER  # artifact key and folder name of the flowers model inside the MLflow Model
FOLDER_PATH = f"artifacts/{FOLDER}"
CARD = "model_card.md"
OUTPUT_COLUMNS = ("label", "name", "confidence", "entropy", "uncertain", "error")
# the models-from-code file copied into every version: it only names the class below
CODE = '''"""MLflow models-from-code entry for a flowers model (see flowers/registry/flavor.py)."""
import mlflow

from flowers.registry.flavor import pyfunc_model

mlflow.models.set_model(pyfunc_model())
'''
# what the pyfunc imports at serving time besides the flowers package, which travels inside the model
# (`code/flowers`, MLflow's code_paths): `mlflow models serve` with its default environment manager
# builds a virtualenv from these and the model's own copy of the code, nothing else
REQUIREMENTS = ("mlflow", "torch", "torchvision", "numpy", "pandas", "pillow", "onnxruntime", "onnx", "safetensors",
                "scipy", "pyyaml", "tqdm")


def signature():
    """Input: `image` (binary, encoded image bytes); output: the per-image prediction columns."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("long", "label"), ColSpec("string", "name"), ColSpec("double", "confidence"),
                        ColSpec("double", "entropy"), ColSpec("boolean", "uncertain"),
                        ColSpec("string", "error", required=False)]))


def example_image(size: int = 64) -> bytes:
    """A small synthetic JPEG (a green-on-magenta blob) for the input example."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[:size, :size]
    blob = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2
    img = np.zeros((size, size, 3), np.uint8)
    img[...] = (200, 40, 160)
    img[blob] = (40, 180, 60)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def input_example():
    import pandas as pd

    return pd.DataFrame({"image": [example_image()]})


def requirements() -> list[str]:
    """Pinned to what is installed here: the serving environment must match the one that wrote the model."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def package_source(tmp: str | Path) -> str:
    """A copy of the installed `flowers` package (no bytecode) in `tmp`, for the model's `code/` folder:
    the pyfunc imports the very code that wrote the model, wherever it is served."""
    import shutil

    import flowers

    dst = Path(tmp) / "flowers"
    shutil.copytree(Path(flowers.__file__).parent, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(dst)


def pyfunc_model():
    """The pyfunc (a PythonModel) that serves a flowers model folder; built by the code file above."""
    import mlflow
    import pandas as pd

    class FlowersPyfunc(mlflow.pyfunc.PythonModel):
        """Encoded image bytes in, one prediction row per image out (see the module docstring)."""

        def load_context(self, context) -> None:
            from flowers.inference.predict import Predictor

            self.predictor = Predictor.from_uri(context.artifacts[FOLDER])

        def predict(self, context, model_input, params=None):
            frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            if "image" not in frame.columns:
                raise ValueError("input needs a column 'image' of encoded image bytes")
            images = [base64.b64decode(v) if isinstance(v, str) else bytes(v) for v in frame["image"]]
            rows = []
            for r in self.predictor.predict(images, top_k=1):
                if "error" in r:
                    rows.append({"label": -1, "name": "", "confidence": float("nan"), "entropy": float("nan"),
                                 "uncertain": True, "error": r["error"]})
                else:
                    rows.append({**{k: r[k] for k in OUTPUT_COLUMNS[:-1]}, "error": None})
            return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))

    return FlowersPyfunc()


def save(folder: str | Path, out: str | Path, card: str | Path | None = None,
         metadata: dict[str, Any] | None = None) -> Path:
    """Write the MLflow Model for the flowers model folder `folder` into `out` (which must not exist).

    The folder is copied to `artifacts/flowers_model/`; an exported student (manifest kind
    `onnx`) also gets MLflow's ONNX flavor, pointing at its INT8 graph in that same folder.
    """
    import mlflow
    from mlflow.models import Model

    from flowers.models.checkpoint import read_manifest

    folder, out = Path(folder), Path(out)
    if folder.name != FOLDER:
        raise ValueError(f"the model folder must be named '{FOLDER}' (MLflow names the artifact after it)")
    manifest = read_manifest(folder)
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "flowers_pyfunc.py"
        code.write_text(CODE)
        mlflow.pyfunc.save_model(
            str(out), python_model=str(code), artifacts={FOLDER: str(folder)}, signature=signature(),
            input_example=input_example(), pip_requirements=requirements(), code_paths=[package_source(tmp)],
            metadata={"flowers": json.loads(json.dumps(metadata or {}, default=str))})
    if manifest.get("kind") == "onnx" and manifest.get("file"):
        import onnx

        mlmodel = Model.load(str(out / "MLmodel"))
        mlmodel.add_flavor("onnx", onnx_version=onnx.__version__, data=f"{FOLDER_PATH}/{manifest['file']}",
                           providers=["CPUExecutionProvider"], code=None)
        mlmodel.save(str(out / "MLmodel"))
    if card:
        (out / CARD).write_text(Path(card).read_text())
    return out
