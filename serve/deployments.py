"""The two Serve deployments: a batched ensemble, and the INT8 student that is also the HTTP ingress.

    HTTP ─► Student  (FastAPI ingress: /v1/predict/{ensemble,student}, /v1/compare, /v1/models,
            │         /v1/explain/{model}, /healthz, the web page and API docs (serve/web.py);
            │         @serve.batch over models:/flowers-student@champion, in-process)
            ├─► Ensemble (@serve.batch; loads models:/flowers-ensemble@champion)
            ├─► Explainer (Grad-CAM, one at a time; serve/explainer.py)
            └─► Follower (the registry poller; each model replica asks it every second what to hold:
                          serving, target, canary, shadow; serve/follower.py, serve/versions.py)

The student's forward pass costs about what one more process hop in front of it would
(docs/serving.md), so the Student deployment *is* the ingress: it validates every request
(serve/http.py), answers student requests itself and forwards ensemble requests to the
Ensemble deployment. Both load the `ModelRef` the edge resolved through
`flowers.inference.predict.Predictor` (never the registry), so serving uses the
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

import numpy as np

from flowers.data import ImageDecodeError
from flowers.inference.calibration import DEFAULT_BUDGET_S, DEFAULT_MAX_BATCH, BatchingChoice, choose_batching
from flowers.inference.predict import Predictor, collate
from flowers.registry.uris import ModelRef
from flowers.runtime import configure_torch_threads
from serve import http, schemas
from serve.config import MAX_TOP_K, app_config
from serve.explainer import MAX_WAITING
from serve.gate import AdmissionGate
from serve.follower import REPLICA_POLL_S
from serve.metrics import CompareMetrics, ExplainMetrics, ModelMetrics, ShadowMetrics
from serve.versions import SHADOW_MAX_PENDING, Slot, Versions, compare

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = DEFAULT_MAX_BATCH  # 16, the cap until user_config sets one (serve/config.yaml: 16)
serve_log = logging.getLogger("ray.serve")  # the logger Serve writes to the replica's log file
STALL_S = 30.0  # requests admitted this long with no forward pass: the batcher has stopped


class BatchedModel:
    """One model behind `@serve.batch` and the admission gate: per-item decode, one forward pass per batch."""

    role = "model"
    # Run the forward pass in a worker thread so the event loop keeps taking requests (and
    # health checks) meanwhile. For a pass as short as the student's the thread handoff costs
    # about as much as the pass itself, so the student runs inline; requests arriving
    # meanwhile wait in the socket and still enter the next batch together.
    offload = True

    def __init__(self, ref: ModelRef, follower: DeploymentHandle | None = None,
                 uncertainty_threshold: float | None = None) -> None:
        """`ref`: the version the edge resolved (serve/run.py); `follower`: where later versions come from."""
        # Ray sets OMP_NUM_THREADS from num_cpus; more torch threads than that oversubscribe the node
        self.threads = configure_torch_threads()
        # a replica given a GPU (ray_actor_options.num_gpus) runs its model there
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.versions = Versions(self.role, ref, self.device, uncertainty_threshold)  # loads + warms up `ref`
        self.gate = AdmissionGate(DEFAULT_MAX_BATCH_SIZE)
        self.batching: BatchingChoice | None = None  # measured in reconfigure (Serve calls it before the first request)
        self._calibrated_for: tuple | None = None  # (calibrate, budget, serving version) of self.batching
        self._user_config: dict[str, Any] = {}
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # debug: observed batch sizes
        self.metrics = ModelMetrics(self.role)
        self.shadow_metrics = ShadowMetrics(self.role)
        self.follower = follower
        self.follow_error: str | None = None
        try:
            self.replica_id = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # outside Serve (unit use): one replica
            self.replica_id = "local"
        if follower is not None:  # the constructor runs on the replica's event loop
            self._follow_task = asyncio.get_running_loop().create_task(self._follow())
        log.info("%s: loaded %s with %d torch threads", self.role, ref.label, self.threads)

    @property
    def predictor(self) -> Predictor:
        """The version answering now (what /v1/models describes)."""
        return self.versions.serving.predictor

    async def _follow(self) -> None:
        """Tell the Follower what this replica holds; load and switch to what it says (serve/follower.py)."""
        while True:
            try:
                desired = await self.follower.report.remote(self.role, self.replica_id, *self.versions.report())
                await self.versions.apply(desired)
                if self._calibrated_for and self._calibrated_for[2] != self.versions.serving.key:
                    # a new serving version: measure it (off the event loop; the old choice serves meanwhile)
                    self._apply_batching(await asyncio.to_thread(self._choose_batching, self._user_config))
                self.follow_error = None
            except Exception as e:  # the Follower restarting: keep answering with what is loaded
                if self.follow_error is None:
                    log.warning("%s: follower unreachable: %s", self.role, e)
                self.follow_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            await asyncio.sleep(REPLICA_POLL_S)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Live `user_config`: batching (max_batch_size = the cap, batch_wait_timeout_s = the fallback
        wait, calibrate, calibration_budget_s, admission_gate) and the uncertainty threshold.
        Serve awaits the first call before the replica takes requests, so the calibration
        (flowers/inference/calibration.py, about 3 s) measures an idle replica."""
        self._user_config = dict(config or {})
        self._apply_batching(await asyncio.to_thread(self._choose_batching, self._user_config))
        if self._user_config.get("uncertainty_threshold") is not None:
            self.versions.set_threshold(float(self._user_config["uncertainty_threshold"]))

    def _choose_batching(self, config: dict[str, Any]) -> BatchingChoice:
        """Calibrated for the serving model under the config's cap; a lower cap re-chooses from the
        table already measured; the config's values when `calibrate` is false or calibration fails."""
        cap = int(config.get("max_batch_size") or DEFAULT_MAX_BATCH_SIZE)
        key = (bool(config.get("calibrate", True)), float(config.get("calibration_budget_s", DEFAULT_BUDGET_S)),
               self.versions.serving.key)
        if self.batching is not None and key == self._calibrated_for:
            lower = self.batching.capped(cap)
            if lower is not None:
                return lower
        self._calibrated_for = key
        return choose_batching(self.predictor.model, cap, float(config.get("batch_wait_timeout_s") or 0.0),
                               calibrate=key[0], budget_s=key[1], label=self.role)

    def _apply_batching(self, choice: BatchingChoice) -> None:
        self.batching = choice
        self.gate.configure(choice.max_batch_size, choice.batch_wait_timeout_s, self._user_config.get("admission_gate"))
        self.predict_batch.set_max_batch_size(self.gate.max_batch_size)  # @serve.batch's public setters
        self.predict_batch.set_batch_wait_timeout_s(self.gate.serve_wait_s)
        serve_log.info("%s: %s", self.role, choice.log_line())

    def _run(self, slot: Slot, images: list[bytes], top_ks: list[int], keep: bool) -> list[dict[str, Any]]:
        """One forward pass of one version; `keep`: leave each item's probabilities in `_probs` (shadow)."""
        t0 = time.perf_counter()
        pred, tensors, ok = slot.predictor, [], []
        results: list[dict[str, Any]] = [{} for _ in images]
        for i, src in enumerate(images):
            try:
                tensors.append(pred.load_image(src))
                ok.append(i)
            except ImageDecodeError as e:  # this item alone fails
                results[i] = {"error": str(e)}
        if tensors:
            probs = pred.predict_proba(collate(tensors))
            for j, (i, r) in enumerate(zip(ok, pred.format(probs, max(top_ks)))):
                results[i] = {**r, "_probs": probs[j]} if keep else r
        ms = (time.perf_counter() - t0) * 1e3
        for r, k in zip(results, top_ks):
            if "error" not in r:
                r["top_k"] = r["top_k"][:k]
            r["batch_size"] = len(images)
            r["batch_ms"] = round(ms, 3)
        return results

    async def _pass(self, slot: Slot, images: list[bytes], top_ks: list[int]) -> list[dict[str, Any]]:
        keep = self.versions.shadow is not None
        if self.offload:
            return await asyncio.to_thread(self._run, slot, images, top_ks, keep)
        return self._run(slot, images, top_ks, keep)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=0.0)
    async def predict_batch(self, images: list[bytes], top_ks: list[int], slots: list[Slot]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{} for _ in images]
        groups: dict[int, list[int]] = {}  # a canary splits a batch: one pass per version
        for i, s in enumerate(slots):
            groups.setdefault(id(s.predictor), []).append(i)
        with self.gate.running_pass():
            for idx in groups.values():
                out = await self._pass(slots[idx[0]], [images[i] for i in idx], [top_ks[i] for i in idx])
                for i, r in zip(idx, out):
                    results[i] = r
        self.batch_sizes[len(images)] += 1
        self.metrics.record_batch(results)
        return results

    async def predict(self, image: bytes, top_k: int = 5) -> dict[str, Any]:
        """One image → result dict (with the name, version and alias that answered), or {'error': ...}."""
        slot, alias = self.versions.pick()
        async with self.gate.admission():
            result = await self.predict_batch(image, top_k, slot)
        probs = result.pop("_probs", None)
        if probs is not None:
            self._shadow(image, probs, slot, result["batch_ms"])
        return {"model": slot.name, "version": slot.version, "alias": alias, **result}

    def _shadow(self, image: bytes, probs: np.ndarray, primary: Slot, primary_ms: float) -> None:
        """Send a copy to the shadow version, off the answer's path (bounded: a busy replica skips copies)."""
        shadow = self.versions.shadow
        if shadow is None:
            return
        pair = f"{primary.version}->{shadow.version}"
        if self.versions.shadow_pending >= SHADOW_MAX_PENDING:
            self.versions.shadow_stats.skip(pair)
            self.shadow_metrics.skip(primary.version, shadow.version)
            return
        self.versions.shadow_pending += 1

        def run() -> tuple[np.ndarray, float]:
            t0 = time.perf_counter()
            q = shadow.predictor.predict_proba(collate([shadow.predictor.load_image(image)]))[0]
            return q, (time.perf_counter() - t0) * 1e3

        async def copy() -> None:
            try:
                q, ms = await asyncio.to_thread(run)
                agree, diff = compare(probs, q)
                if diff != diff:  # NaN: the two versions do not have the same classes
                    raise ValueError(f"{len(probs)} classes vs {len(q)}: not comparable")
                self.versions.shadow_stats.record(pair, agree, diff, primary_ms, ms)
                self.shadow_metrics.record(primary.version, shadow.version, agree, diff, primary_ms, ms)
            except Exception as e:  # the shadow never answers: its failures are counted, not raised
                log.warning("%s: shadow %s failed: %s", self.role, shadow.ref.label, e)
                self.versions.shadow_stats.skip(pair)
            finally:
                self.versions.shadow_pending -= 1

        asyncio.get_running_loop().create_task(copy())

    def info(self) -> dict[str, Any]:
        s = self.versions.serving
        m = s.predictor.model
        return {"route": self.role, "name": s.name, "version": s.version, "alias": s.ref.alias,
                "uri": s.ref.uri, "pinned": s.ref.pinned, "kind": m.meta.get("kind"),
                "test_accuracy": m.meta.get("test_accuracy"),
                "num_classes": len(m.class_names), "image_size": m.preprocessing.image_size,
                "uncertainty_threshold": s.predictor.threshold, "uncertainty_temperature": s.predictor.temperature,
                "torch_threads": self.threads, "device": self.device,
                **self.gate.settings(), "batching": self.batching.as_dict() if self.batching else None,
                "batch_sizes_seen": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                # an INT8 file's own weight check, and what loading it on this replica's CPU had to say
                # (e.g. 8-bit weights on a CPU without VNNI: exact only through ORT's slower kernels)
                "int8_check": m.meta.get("int8_check"), "warnings": list(m.meta.get("warnings") or []),
                "loaded_versions": [x.version for x in self.versions.slots.values()],
                "failed_here": dict(self.versions.failed), "follower_error": self.follow_error}

    async def ping(self) -> str:
        return "ok"

    async def check_health(self) -> None:
        """Serve restarts the replica if this raises: the model must be loaded and the batcher working."""
        if getattr(self, "predictor", None) is None:
            raise RuntimeError(f"{self.role}: model not loaded")
        if self.gate.stalled(STALL_S):
            raise RuntimeError(f"{self.role}: requests waited over {STALL_S:.0f} s with no forward pass")


@serve.deployment(name="Ensemble", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1},
                  user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.03, "calibrate": True,
                               "calibration_budget_s": 8})
class Ensemble(BatchedModel):
    """Soft-voting ensemble (manifest kind 'ensemble'), or any model URI."""

    role = "ensemble"


api = http.make_api()
TopK = Query(None, ge=1, le=MAX_TOP_K, description=f"classes to return, 1..{MAX_TOP_K} (default: the app's "
                                                     "default_top_k, 5 unless configured)")


@serve.deployment(name="Student", max_ongoing_requests=128, ray_actor_options={"num_cpus": 1},
                  user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.0, "calibrate": True,
                               "calibration_budget_s": 3})
@serve.ingress(api)
class Student(BatchedModel):
    """Distilled INT8 student (manifest kind 'onnx', or any model URI) and the HTTP front."""

    role = "student"
    offload = False

    def __init__(self, ref: ModelRef, ensemble: DeploymentHandle, args: dict[str, Any],
                 explainer: DeploymentHandle | None = None, follower: DeploymentHandle | None = None) -> None:
        self.args = app_config(args)
        super().__init__(ref, follower, self.args.uncertainty_threshold)
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
        ens, stu = await self.ensemble.info.remote(), self.info()
        if self.follower is not None:  # the rollout state: serving and target versions, replicas on each
            try:
                rollout = await asyncio.wait_for(self.follower.status.remote(), timeout=5.0)
            except Exception as e:
                rollout = {r: {"error": f"follower unavailable: {type(e).__name__}"} for r in http.MODEL_ROUTES}
            ens["rollout"], stu["rollout"] = rollout.get("ensemble"), rollout.get("student")
        return JSONResponse({"models": [ens, stu], "max_body_bytes": self.args.max_body_bytes,
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
