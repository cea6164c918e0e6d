"""The two Serve deployments: a batched ensemble, and the INT8 student that is also the HTTP ingress.

    HTTP ─► Student  (FastAPI ingress: /v1/predict/{ensemble,student}, /v1/compare, /v1/models,
            │         /v1/explain/{model}, /healthz, the web page and API docs (serve/web.py);
            │         @serve.batch over models:/flowers-student@champion, in-process)
            ├─► Ensemble (@serve.batch; loads models:/flowers-ensemble@champion)
            └─► Explainer (Grad-CAM, one at a time; serve/explainer.py)

The student's forward pass costs about what one more process hop in front of it would
(docs/serving.md), so the Student deployment *is* the ingress: it validates every request
(serve/http.py), answers student requests itself and forwards ensemble requests to the
Ensemble deployment. Both load by URI through `flowers.inference.predict.Predictor`, so serving uses the
same decoding and eval preprocessing as training evaluation. Decoding happens per item inside
the batched method, so a bad image in a batch becomes an error for that item only.
"""
# no `from __future__ import annotations`: FastAPI must see real types (Request) through Serve's ingress wrapper

import asyncio
import collections
import logging
import time
from typing import Any

import ray
from fastapi import Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from flowers.registry import uris as registry
from flowers.inference.predict import Predictor
from flowers.runtime import configure_torch_threads
from serve import http, schemas
from serve.config import MAX_TOP_K, app_config
from serve.explainer import MAX_WAITING
from serve.gate import AdmissionGate
from serve.metrics import CompareMetrics, ExplainMetrics, ModelMetrics

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 8  # until user_config sets it
STALL_S = 30.0  # requests admitted this long with no forward pass: the batcher has stopped


class BatchedModel:
    """One model behind `@serve.batch` and the admission gate: per-item decode, one forward pass per batch."""

    role = "model"
    # Run the forward pass in a worker thread so the event loop keeps taking requests (and
    # health checks) meanwhile. For a pass as short as the student's the thread handoff costs
    # about as much as the pass itself, so the student runs inline; requests arriving
    # meanwhile wait in the socket and still enter the next batch together.
    offload = True

    def __init__(self, model_uri: str, tracking_uri: str | None = None,
                 uncertainty_threshold: float | None = None) -> None:
        if tracking_uri:  # this replica resolves models:/ against that store
            registry.export_store([model_uri], explicit=tracking_uri)
        # Ray sets OMP_NUM_THREADS from num_cpus; more torch threads than that oversubscribe the node
        self.threads = configure_torch_threads()
        self.uri = model_uri
        # a replica given a GPU (ray_actor_options.num_gpus) runs its model there
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.predictor = Predictor.from_uri(model_uri, device=self.device, threshold=uncertainty_threshold)
        self.predictor.predict_proba(self.predictor.model.example_batch(1))  # warm-up: lazy init off the request path
        self.gate = AdmissionGate(DEFAULT_MAX_BATCH_SIZE)
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # debug: observed batch sizes
        self.metrics = ModelMetrics(self.role)
        log.info("%s: loaded %s (%s v%s) with %d torch threads", self.role, model_uri,
                 self.predictor.model.name, self.predictor.model.version, self.threads)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Live `user_config`: batching (max_batch_size, batch_wait_timeout_s, admission_gate)
        and the uncertainty threshold."""
        config = config or {}
        self.gate.configure(config.get("max_batch_size"), config.get("batch_wait_timeout_s"),
                            config.get("admission_gate"))
        self.predict_batch.set_max_batch_size(self.gate.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(self.gate.serve_wait_s)
        if config.get("uncertainty_threshold") is not None:
            self.predictor.threshold = float(config["uncertainty_threshold"])
        log.info("%s: batching %s", self.role, self.gate.settings())

    def _run(self, images: list[bytes], top_ks: list[int]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        results = self.predictor.predict(images, top_k=max(top_ks))
        ms = (time.perf_counter() - t0) * 1e3
        for r, k in zip(results, top_ks):
            if "error" not in r:
                r["top_k"] = r["top_k"][:k]
            r["batch_size"] = len(images)
            r["batch_ms"] = round(ms, 3)
        return results

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=0.0)
    async def predict_batch(self, images: list[bytes], top_ks: list[int]) -> list[dict[str, Any]]:
        with self.gate.running_pass():
            results = await asyncio.to_thread(self._run, images, top_ks) if self.offload else self._run(images, top_ks)
        self.batch_sizes[len(images)] += 1
        self.metrics.record_batch(results)
        return results

    async def predict(self, image: bytes, top_k: int = 5) -> dict[str, Any]:
        """One image → result dict, or {'error': decoder message} for that image alone."""
        async with self.gate.admission():
            result = await self.predict_batch(image, top_k)
        m = self.predictor.model
        return {"model": m.name, "version": m.version, **result}

    def info(self) -> dict[str, Any]:
        m = self.predictor.model
        return {"route": self.role, "name": m.name, "version": m.version, "alias": m.meta.get("alias"),
                "uri": self.uri, "kind": m.meta.get("kind"), "test_accuracy": m.meta.get("test_accuracy"),
                "num_classes": len(m.class_names), "image_size": m.preprocessing.image_size,
                "uncertainty_threshold": self.predictor.threshold, "uncertainty_temperature": self.predictor.temperature,
                "torch_threads": self.threads, "device": self.device,
                **self.gate.settings(), "batch_sizes_seen": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                # an INT8 file's own weight check, and what loading it on this replica's CPU had to say
                # (e.g. 8-bit weights on a CPU without VNNI: exact only through ORT's slower kernels)
                "int8_check": m.meta.get("int8_check"), "warnings": list(m.meta.get("warnings") or [])}

    async def ping(self) -> str:
        return "ok"

    async def check_health(self) -> None:
        """Serve restarts the replica if this raises: the model must be loaded and the batcher working."""
        if getattr(self, "predictor", None) is None:
            raise RuntimeError(f"{self.role}: model not loaded")
        if self.gate.stalled(STALL_S):
            raise RuntimeError(f"{self.role}: requests waited over {STALL_S:.0f} s with no forward pass")


@serve.deployment(name="Ensemble", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1},
                  user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.03})
class Ensemble(BatchedModel):
    """Soft-voting ensemble (manifest kind 'ensemble'), or any model URI."""

    role = "ensemble"


api = http.make_api()
TopK = Query(None, ge=1, le=MAX_TOP_K, description=f"classes to return, 1..{MAX_TOP_K} (default: the app's "
                                                     "default_top_k, 5 unless configured)")


@serve.deployment(name="Student", max_ongoing_requests=128, ray_actor_options={"num_cpus": 1},
                  user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.0})
@serve.ingress(api)
class Student(BatchedModel):
    """Distilled INT8 student (manifest kind 'onnx', or any model URI) and the HTTP front."""

    role = "student"
    offload = False

    def __init__(self, model_uri: str, ensemble: DeploymentHandle, args: dict[str, Any],
                 explainer: DeploymentHandle | None = None) -> None:
        self.args = app_config(args)
        super().__init__(model_uri, self.args.tracking_uri, self.args.uncertainty_threshold)
        self.ensemble = ensemble
        self.explainer = explainer
        self.explain_waiting = 0  # explain requests of this replica in flight (bounded: MAX_WAITING)
        self.compare_metrics = CompareMetrics()
        self.explain_metrics = ExplainMetrics()

    async def _predict(self, model: str, image: bytes, top_k: int) -> dict[str, Any]:
        """`model` is one of http.MODEL_ROUTES (the routes check it before reading the body)."""
        t0 = time.perf_counter()
        try:
            if model == "student":
                result = await self.predict(image, top_k)
            else:
                result = await self.ensemble.predict.remote(image, top_k)
        except Exception as e:  # a failing model or a crashed replica must still answer in JSON
            log.exception("%s prediction failed", model)
            raise http.ApiError(500, f"{model} model failed: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
        result["latency_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        return result

    # FastAPI validates the path and query (unknown model: 404, top_k out of range: 400) before the
    # handler runs; the handler checks the body's type and size before reading it (serve/http.py)
    @api.post("/v1/predict/{model}", response_model=schemas.Prediction, responses=schemas.PREDICT_ERRORS,
              openapi_extra=schemas.IMAGE_BODY, summary="Classify one image with one model")
    async def http_predict(self, model: schemas.ModelRoute, request: Request, top_k: int = TopK
                           ) -> JSONResponse:
        image = await http.read_image(request, self.args.max_body_bytes)
        # a JSONResponse skips FastAPI's response-model validation and encoder
        k = top_k or self.args.default_top_k
        return JSONResponse(http.answer(await self._predict(model, image, k), model))

    @api.post("/v1/compare", response_model=schemas.Comparison, responses=schemas.BAD_IMAGE,
              openapi_extra=schemas.IMAGE_BODY, summary="Classify one image with both models")
    async def http_compare(self, request: Request, top_k: int = TopK) -> JSONResponse:
        t0 = time.perf_counter()
        k = top_k or self.args.default_top_k
        image = await http.read_image(request, self.args.max_body_bytes)
        ens, stu = await asyncio.gather(*(self._predict(m, image, k) for m in http.MODEL_ROUTES))
        ens, stu = http.answer(ens, "ensemble"), http.answer(stu, "student")
        agree = ens["label"] == stu["label"]
        self.compare_metrics.record(agree)
        return JSONResponse({"agree": agree, "ensemble": ens, "student": stu,
                             "latency_ms": round((time.perf_counter() - t0) * 1e3, 3)})

    @api.post("/v1/explain/{model}", response_model=schemas.Explanation, responses=schemas.EXPLAIN_ERRORS,
              openapi_extra=schemas.IMAGE_BODY, summary="Grad-CAM heat map of one class over the image")
    async def http_explain(self, model: schemas.ModelRoute, request: Request, label: int = Query(
            None, ge=0, le=MAX_TOP_K - 1, description="class index to explain (default: the model's top class)")
                           ) -> JSONResponse:
        if self.explainer is None:
            raise http.ApiError(501, "this app was built without an explainer")
        if self.explain_waiting >= MAX_WAITING:  # before reading the body: a busy explainer costs nothing
            self.explain_metrics.reject()
            raise http.ApiError(503, f"{self.explain_waiting} explanations already waiting; retry in a few seconds")
        self.explain_waiting += 1
        try:
            image = await http.read_image(request, self.args.max_body_bytes)
            t0 = time.perf_counter()
            try:
                out = await self.explainer.explain.remote(model, image, label)
            except Exception as e:
                log.exception("%s explanation failed", model)
                raise http.ApiError(500, f"explainer failed: {type(e).__name__}: "
                                         f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
        finally:
            self.explain_waiting -= 1
        if "error" in out:
            raise http.ApiError(out["status"], out["error"])
        out["latency_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        return JSONResponse(out)

    @api.get("/v1/models", response_model=schemas.Models, summary="The served models, their versions and limits")
    async def http_models(self) -> JSONResponse:
        ens = await self.ensemble.info.remote()
        return JSONResponse({"models": [ens, self.info()], "max_body_bytes": self.args.max_body_bytes,
                             "default_top_k": self.args.default_top_k, "max_top_k": MAX_TOP_K})

    @api.get("/healthz", response_model=schemas.Health, summary="Both models answer",
             responses={503: {"model": schemas.Health, "description": "a model does not answer"}})
    async def http_healthz(self) -> JSONResponse:
        status = {"student": await self.ping()}
        try:
            status["ensemble"] = await asyncio.wait_for(self.ensemble.ping.remote(), timeout=5.0)
        except Exception as e:  # unhealthy or busy beyond 5 s: report, don't raise
            status["ensemble"] = f"unavailable: {type(e).__name__}"
        ok = all(v == "ok" for v in status.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "models": {m: status[m] for m in http.MODEL_ROUTES}},
                            status_code=200 if ok else 503)
