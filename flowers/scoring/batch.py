"""The batch model: `Scorer`, the callable a Ray Data actor (or this process) runs on each batch of inputs."""
from __future__ import annotations

import io
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from flowers import storage
from flowers.scoring.schema import SCHEMA, metadata
from flowers.scoring.sources import read_bytes

def image_size(data: bytes) -> tuple[int, int]:
    """Stored width/height from the header (cheap: PIL does not decode pixels for this)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.size


class Scorer:
    """Loads the Predictor once; `__call__` scores a batch of `{path[, bytes, read_error]}` rows.

    The reader (`read_objects`) hands over `bytes`, or `read_error` for an object it could not
    read; a row with neither is read from `path` here. Either way an unreadable or undecodable
    input becomes an error row, never a failed job.
    """

    def __init__(self, model_uri: str, top_k: int = 5, threads: int | None = None, device: str = "cpu") -> None:
        from flowers.inference.predict import Predictor
        from flowers.runtime import configure_torch_threads

        # Ray sets OMP_NUM_THREADS to the actor's num_cpus; torch follows it unless told otherwise
        self.threads = configure_torch_threads(threads)
        self.predictor = Predictor.from_uri(model_uri, device)
        self.top_k = int(top_k)
        self.model_name = self.predictor.model.name
        self.model_version = self.predictor.model.version
        self.schema = SCHEMA.with_metadata(metadata(str(model_uri), self.top_k))

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        import torch

        from flowers.data import ImageDecodeError

        paths = [str(p) for p in batch["path"]]
        blobs = batch.get("bytes")
        read_errors = batch.get("read_error")
        n = len(paths)
        cols: dict[str, list] = {f.name: [None] * n for f in SCHEMA}
        cols["path"] = paths
        tensors, ok = [], []
        for i, path in enumerate(paths):
            data = None
            if read_errors is not None and read_errors[i]:
                cols["error"][i] = str(read_errors[i])
                continue
            try:
                data = blobs[i] if blobs is not None and blobs[i] is not None else read_bytes(path)
                tensors.append(self.predictor.load_image(bytes(data)))
                cols["width"][i], cols["height"][i] = image_size(data)
                ok.append(i)
            except ImageDecodeError as e:
                # open_image names bytes input "<N bytes>"; the path is what the user can act on
                cols["error"][i] = str(e).replace(f"<{len(data)} bytes>", path) if data is not None else str(e)
            except (OSError, storage.StorageError) as e:  # unreadable: permission, vanished, a folder, I/O
                cols["error"][i] = f"cannot read {path}: {getattr(e, 'strerror', None) or e}"
            except Exception as e:  # a decoder bug on one odd file must not fail the whole job
                cols["error"][i] = f"cannot decode {path}: {type(e).__name__}: {e}"
        if tensors:
            probs = self.predictor.predict_proba(torch.stack(tensors))
            for i, r in zip(ok, self.predictor.format(probs, self.top_k)):
                cols["label"][i] = r["label"]
                cols["name"][i] = r["name"]
                cols["confidence"][i] = r["confidence"]
                cols["top_k_labels"][i] = [t["label"] for t in r["top_k"]]
                cols["top_k_probs"][i] = [t["probability"] for t in r["top_k"]]
                cols["entropy"][i] = r["entropy"]
                cols["uncertain"][i] = r["uncertain"]
        now = datetime.now(timezone.utc)
        cols["model_name"] = [self.model_name] * n
        cols["model_version"] = [self.model_version] * n
        cols["scored_at"] = [now] * n
        return pa.Table.from_pydict(cols, schema=self.schema)
