"""Grad-CAM on request, in a deployment of its own so that it cannot starve prediction.

    Student (ingress) ── POST /v1/explain/{model} ──► Explainer (one Grad-CAM at a time per replica)

A Grad-CAM pass is a forward and a backward pass in fp32 (the ensemble: one per member), tens
of times a prediction's cost. It runs here, not in the Ensemble or Student replicas: their
batches never wait behind it. The ingress lets at most `MAX_WAITING` explain requests wait per
replica and answers 503 beyond that; this replica runs one at a time (`max_ongoing_requests`
and a lock), in a worker thread so its event loop keeps answering health checks. It reserves
no CPU by default (idle most of the time; one torch thread) so it fits beside the model
replicas on any node; give it `ray_actor_options.num_cpus` in the Serve config to reserve some.

The INT8 ONNX student has no gradients: its manifest's fp32 `source_checkpoint` is explained
instead when that file is reachable from the replica; otherwise the route answers 501.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve

from flowers.registry.uris import ModelRef
from flowers.models.checkpoint import ModelLoadError
from flowers.data import ImageDecodeError
from flowers.inference.explain import explain_batch, explainable_modules, overlay
from flowers.inference.predict import LoadedModel, Predictor, collate, load_model
from flowers.runtime import configure_torch_threads
from serve.metrics import ExplainMetrics

log = logging.getLogger(__name__)

MAX_WAITING = 4  # explain requests per ingress replica in flight; more get 503
DISPLAY_PX = 256  # the map is drawn on the model's crop (e.g. 128 px), enlarged for the page


class ExplainError(Exception):
    """A request the explainer refuses: (HTTP status, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def explainable(uri: "str | ModelRef") -> tuple[LoadedModel, LoadedModel | None, str]:
    """(the served model, the PyTorch model Grad-CAM runs on or None, what that is or why there is none)."""
    served = load_model(uri)
    try:
        explainable_modules(served)
        return served, served, f"{served.name} ({served.meta.get('kind') or 'checkpoint'})"
    except ModelLoadError as e:
        src = served.meta.get("source_checkpoint")
        if src and Path(src).is_file():  # the INT8 student's fp32 checkpoint, where this node can read it
            try:
                fp32 = load_model(src)
                explainable_modules(fp32)
            except Exception as e2:  # a broken source file must not take the whole app down: 501 for it
                log.warning("explainer: cannot use %s for %s: %s", src, served.name, e2)
                return served, None, f"{e}; its source checkpoint {src} did not load: {e2}"
            return served, fp32, f"fp32 source checkpoint of {served.name} ({Path(src).name})"
        return served, None, str(e)


def gradcam_png(model: LoadedModel, image: bytes, label: int | None) -> dict[str, Any]:
    """Grad-CAM of `label` (None: the model's top class) over the model's centre crop, as a base64 PNG.

    An ensemble's members each give a map on their own input view; the page shows their mean."""
    from PIL import Image

    pred = Predictor(model)
    try:
        x = collate([pred.load_image(image)])
    except ImageDecodeError as e:
        raise ExplainError(400, str(e)) from None
    n = len(model.class_names)
    if label is not None and not 0 <= label < n:
        raise ExplainError(400, f"query parameter label: must be a class index in 0..{n - 1}, got {label}")
    probs = pred.predict_proba(x)[0]
    target = int(np.argmax(probs)) if label is None else int(label)
    panels = explain_batch(model, x, [target])
    maps = [m[0] for name, m in panels.items() if name.startswith("gradcam") and m is not None]
    view = (x[0] if isinstance(x, tuple) else x)[0]
    img = Image.fromarray(overlay(view, np.mean(maps, axis=0)))
    if img.width < DISPLAY_PX:
        img = img.resize((DISPLAY_PX, DISPLAY_PX), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return {"label": target, "name": model.class_names[target], "probability": float(probs[target]),
            "maps": len(maps), "image_size": int(view.shape[-1]),
            "png_base64": base64.b64encode(buf.getvalue()).decode("ascii")}


@serve.deployment(name="Explainer", max_ongoing_requests=2, ray_actor_options={"num_cpus": 0})
class Explainer:
    """Grad-CAM for the ensemble and the student, one at a time."""

    def __init__(self, ensemble: ModelRef, student: ModelRef) -> None:
        """The refs the edge resolved (serve/run.py); it explains those versions (it does not follow the registry)."""
        # the CPUs this replica reserved (Ray sets no thread count for a 0-CPU actor): at least one thread
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        self.threads = configure_torch_threads(max(1, int(cpus)))
        self.models = {"ensemble": explainable(ensemble), "student": explainable(student)}
        self.lock = asyncio.Lock()  # Grad-CAM hooks the network: one pass at a time
        self.metrics = ExplainMetrics()
        for route, (_, net, what) in self.models.items():
            log.info("explainer %s: %s", route, what if net is not None else f"none ({what})")

    async def explain(self, route: str, image: bytes, label: int | None) -> dict[str, Any]:
        """The Explanation fields, or {'error', 'status'} for a refused request."""
        served, net, what = self.models[route]
        if net is None:
            return {"error": f"no Grad-CAM for the {route}: {what}", "status": 501}
        t0 = time.perf_counter()
        async with self.lock:
            try:
                out = await asyncio.to_thread(gradcam_png, net, image, label)
            except ExplainError as e:
                return {"error": e.message, "status": e.status}
        self.metrics.record(route)
        return {"route": route, "model": served.name, "version": served.version, "explained": what, **out,
                "latency_ms": round((time.perf_counter() - t0) * 1e3, 3)}

    async def ping(self) -> str:
        return "ok"
