"""The batch model: `Scorer`, the callable a Ray Data actor (or this process) runs on each batch of inputs.

A batch goes through two stages, `decode` (read, decode, eval preprocessing: needs only the
model's preprocessing, which its manifest carries) and `predict` (the model, then one output row
per input). `__call__` runs both; the in-process engine (`flowers.scoring.local`) runs `decode` on
threads while `predict` works on the batch before, and both start before the model has loaded.
"""
from __future__ import annotations

import io
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import pyarrow as pa

from flowers import storage
from flowers.scoring.schema import SCHEMA, metadata
from flowers.scoring.sources import read_bytes

log = logging.getLogger(__name__)


def image_size(data: bytes) -> tuple[int, int]:
    """Stored width/height from the header (cheap: PIL does not decode pixels for this)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.size


class Decoder:
    """Bytes → the model's uint8 input, view by view: what `Predictor.load_image` does, built from the
    preprocessing alone so that decoding can start while the model still loads."""

    def __init__(self, views: Sequence[Any]) -> None:
        from flowers.data.transforms import Preprocessing, eval_transform

        self.views = [v if isinstance(v, Preprocessing) else Preprocessing.from_dict(v) for v in views]
        if not self.views:
            raise ValueError("Decoder: the model names no preprocessing")
        self.draft_size = max(v.resize_size for v in self.views)
        self.transforms = [eval_transform(v) for v in self.views]

    def __call__(self, data: bytes) -> Any:
        from flowers.data import open_image

        img = open_image(data, draft_size=self.draft_size).convert("RGB")
        xs = tuple(tf(img) for tf in self.transforms)
        return xs[0] if len(xs) == 1 else xs


@dataclass
class Decoded:
    """One batch after `Scorer.decode`: its output columns so far, and the inputs of its good rows."""

    cols: dict[str, list]
    inputs: list[Any] = field(default_factory=list)  # decoded images (a tensor, or a tuple per view)
    ok: list[int] = field(default_factory=list)      # their row numbers
    data: list[bytes] = field(default_factory=list)  # their bytes, kept when decoded by the manifest's
    views: list[Any] | None = None                   # preprocessing (again if the loaded model disagrees)
    decode_s: float = 0.0


class Scorer:
    """Loads the Predictor once; `__call__` scores a batch of `{path[, bytes, read_error]}` rows.

    The reader (`read_objects`) hands over `bytes`, or `read_error` for an object it could not
    read; a row with neither is read from `path` here. Either way an unreadable or undecodable
    input becomes an error row, never a failed job.

    `model` is the model's reference, resolved once on the driver (a `ModelRef`, or a URI).
    Given `views` (the preprocessing, from the manifest), the model loads on a thread of its own
    and the first batch decodes meanwhile; `predict` waits for it. A load error surfaces there.
    """

    def __init__(self, model: Any, top_k: int = 5, threads: int | None = None, device: str = "cpu",
                 views: Sequence[Any] | None = None) -> None:
        from flowers.runtime import configure_torch_threads

        # Ray sets OMP_NUM_THREADS to the actor's num_cpus; torch follows it unless told otherwise
        self.threads = configure_torch_threads(threads)
        self.model_ref, self.device, self.top_k = model, device, int(top_k)
        self.model_uri = str(getattr(model, "pinned", model))
        self.schema = SCHEMA.with_metadata(metadata(self.model_uri, self.top_k))
        self.load_s: float | None = None
        self.wait_s = 0.0  # time `predict` spent waiting for the model
        self._loading: Future = Future()
        self.decoder = Decoder(views) if views else None
        if self.decoder is None:
            self._load()
        else:
            threading.Thread(target=self._load, name="scorer-model-load", daemon=True).start()

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            from flowers.inference.predict import Predictor

            # the scorer's own thread count, not the process's share: the in-process engine runs one
            # 1-thread model call per lane in a process that may have more CPUs
            predictor = Predictor.from_ref(self.model_ref, self.device, threads=self.threads)
        except BaseException as e:
            self._loading.set_exception(e)
            if self.decoder is None:
                raise
            return
        self.load_s = time.perf_counter() - t0
        log.debug("model %s loaded in %.2f s", self.model_uri, self.load_s)
        self._loading.set_result(predictor)

    @property
    def predictor(self) -> Any:
        """The loaded Predictor (waits for the load; raises its error)."""
        if not self._loading.done():
            t0 = time.perf_counter()
            self._loading.result()
            self.wait_s += time.perf_counter() - t0
        return self._loading.result()

    @property
    def model_name(self) -> str:
        return self.predictor.model.name

    @property
    def model_version(self) -> str | None:
        return self.predictor.model.version

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        return self.predict(self.decode(batch))

    def decode(self, batch: dict[str, Any]) -> Decoded:
        """Read (when the row has no bytes), decode and preprocess every row; error rows for the rest."""
        from flowers.data import ImageDecodeError

        t0 = time.perf_counter()
        decoder = self.decoder
        decode = decoder or self.predictor.load_image
        paths = [str(p) for p in batch["path"]]
        blobs = batch.get("bytes")
        read_errors = batch.get("read_error")
        n = len(paths)
        cols: dict[str, list] = {f.name: [None] * n for f in SCHEMA}
        cols["path"] = paths
        out = Decoded(cols, views=decoder.views if decoder is not None else None)
        for i, path in enumerate(paths):
            data = None
            if read_errors is not None and read_errors[i]:
                cols["error"][i] = str(read_errors[i])
                continue
            try:
                data = blobs[i] if blobs is not None and blobs[i] is not None else read_bytes(path)
                data = bytes(data)
                out.inputs.append(decode(data))
                cols["width"][i], cols["height"][i] = image_size(data)
                out.ok.append(i)
                if decoder is not None:
                    out.data.append(data)
            except ImageDecodeError as e:
                # open_image names bytes input "<N bytes>"; the path is what the user can act on
                cols["error"][i] = str(e).replace(f"<{len(data)} bytes>", path) if data is not None else str(e)
            except (OSError, storage.StorageError) as e:  # unreadable: permission, vanished, a folder, I/O
                cols["error"][i] = f"cannot read {path}: {getattr(e, 'strerror', None) or e}"
            except Exception as e:  # a decoder bug on one odd file must not fail the whole job
                cols["error"][i] = f"cannot decode {path}: {type(e).__name__}: {e}"
        out.decode_s = time.perf_counter() - t0
        return out

    def predict(self, decoded: Decoded) -> pa.Table:
        """The model on a decoded batch, then the output rows (one per input, error rows included)."""
        from flowers.inference.loaded import collate

        predictor, cols = self.predictor, decoded.cols
        if decoded.views is not None and decoded.views != predictor.model.views:
            # decoded by the manifest's preprocessing, which the loaded model contradicts: the model is right
            if self.decoder is not None:
                log.warning("model %s: its manifest's preprocessing differs from the loaded model's; decoding "
                            "with the model's", self.model_uri)
                self.decoder = None
            decoded.inputs = [predictor.load_image(d) for d in decoded.data]
        if decoded.inputs:
            probs = predictor.predict_proba(collate(decoded.inputs))
            for i, r in zip(decoded.ok, predictor.format(probs, self.top_k)):
                cols["label"][i] = r["label"]
                cols["name"][i] = r["name"]
                cols["confidence"][i] = r["confidence"]
                cols["top_k_labels"][i] = [t["label"] for t in r["top_k"]]
                cols["top_k_probs"][i] = [t["probability"] for t in r["top_k"]]
                cols["entropy"][i] = r["entropy"]
                cols["uncertain"][i] = r["uncertain"]
        n = len(cols["path"])
        now = datetime.now(timezone.utc)
        cols["model_name"] = [predictor.model.name] * n
        cols["model_version"] = [predictor.model.version] * n
        cols["scored_at"] = [now] * n
        return pa.Table.from_pydict(cols, schema=self.schema)
