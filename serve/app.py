"""Ray Serve app: a batched ensemble and a quantized student side by side.

    HTTP ─► Student  (FastAPI ingress: /v1/predict/{ensemble,student}, /v1/compare, /v1/models,
            │         /healthz; @serve.batch over models:/flowers-student@champion, in-process)
            └─► Ensemble (@serve.batch; loads models:/flowers-ensemble@champion)

The INT8 student answers in 1.5-3 ms (decode included), about what one more process hop in
front of it costs (bench/serve_floor.py), so the Student deployment *is* the ingress. It validates every
request (content type, size, empty body), answers student requests itself and forwards
ensemble requests to the Ensemble deployment. Both load by URI through
`flowers.predict.Predictor`, so serving uses the same decoding and eval preprocessing as
training evaluation. Decoding happens per item inside the batched method, so a bad image in
a batch becomes an error for that item only.

`build_app(args)` is the import path for `serve deploy serve/config.yaml`;
`app_from_config(path)` builds the same app with the YAML's per-deployment options applied
in Python (used by `flowers serve`, `jobs.deploy` and the tests). How HTTP reaches the
Student replicas (HAProxy or Ray's Python proxy) is decided when Ray starts: see
serve/ingress_env.py.
"""
# no `from __future__ import annotations`: FastAPI must see real types (Request) through Serve's ingress wrapper

import asyncio
import collections
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
IMAGE_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png", "image/webp"})
MULTIPART = "multipart/form-data"
# curl -F and browsers label unknown files octet-stream; the decoder decides for those parts
PART_TYPES = IMAGE_TYPES | {"application/octet-stream", ""}
MODEL_ROUTES = ("ensemble", "student")
MAX_TOP_K = 102


@dataclass(frozen=True)
class AppArgs:
    """Application arguments (the `args:` block of serve/config.yaml)."""

    ensemble_uri: str = "models:/flowers-ensemble@champion"
    student_uri: str = "models:/flowers-student@champion"
    tracking_uri: str | None = None  # MLflow server for models:/ URIs; else MLFLOW_TRACKING_URI
    max_body_bytes: int = 10 * 1024 * 1024
    default_top_k: int = 5
    uncertainty_threshold: float | None = None  # None: the model's own (stored at training)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "AppArgs":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown app args {unknown}; known: {sorted(known)}")
        args = cls(**d)
        if int(args.max_body_bytes) <= 0 or not 1 <= int(args.default_top_k) <= MAX_TOP_K:
            raise ValueError(f"max_body_bytes must be > 0 and default_top_k in 1..{MAX_TOP_K}, got {args}")
        return args


# ----------------------------------------------------------------------------- model deployments


class BatchedModel:
    """One model behind `@serve.batch`: per-item decode, one forward pass per batch."""

    role = "model"
    # Run the forward pass in a worker thread so the event loop keeps taking requests (and
    # health checks) meanwhile. For a ~1 ms pass the thread handoff costs about as much as the
    # pass itself, so the student runs inline; requests arriving meanwhile wait in the socket
    # and still enter the next batch together.
    offload = True

    def __init__(self, model_uri: str, tracking_uri: str | None = None,
                 uncertainty_threshold: float | None = None) -> None:
        import torch

        from flowers.predict import Predictor
        from flowers.runtime import configure_torch_threads

        if tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
        # Ray sets OMP_NUM_THREADS from num_cpus; more torch threads than that oversubscribe the node
        self.threads = configure_torch_threads()
        self.uri = model_uri
        self.predictor = Predictor.from_uri(model_uri, threshold=uncertainty_threshold)
        s = self.predictor.model.preprocessing.image_size
        self.predictor.predict_proba(torch.zeros(1, 3, s, s, dtype=torch.uint8))  # warm-up: lazy init off the request path
        self._init_gate()
        self.uncertain = Counter("flowers_uncertain_predictions",
                                 description="predictions flagged uncertain (entropy above threshold)",
                                 tag_keys=("model",))
        self.uncertain.set_default_tags({"model": self.role})
        self.batch_hist = Histogram("flowers_batch_size", description="items per batched forward pass",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("model",))
        self.batch_hist.set_default_tags({"model": self.role})
        log.info("%s: loaded %s (%s v%s) with %d torch threads", self.role, model_uri,
                 self.predictor.model.name, self.predictor.model.version, self.threads)

    def _init_gate(self) -> None:
        """Counters and the admission gate (see predict()); Serve's own batch wait stays 0."""
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # debug: observed batch sizes
        self.max_wait_s = 0.0      # user_config batch_wait_timeout_s
        self._active = 0           # requests inside predict()
        self._peak = 0             # most requests inside predict() during the running pass
        self._expected = 1         # requests the next batch waits for: the last pass's peak
        self._held = 0
        self._busy = False
        self._open = asyncio.Event()
        self._open.set()
        self._timer: asyncio.TimerHandle | None = None

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Live `user_config`: batching parameters and the uncertainty threshold."""
        config = config or {}
        if "max_batch_size" in config:
            self.predict_batch.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            self.max_wait_s = max(0.0, float(config["batch_wait_timeout_s"]))
        if config.get("uncertainty_threshold") is not None:
            self.predictor.threshold = float(config["uncertainty_threshold"])
        log.info("%s: batching %s", self.role, self.batching())

    def batching(self) -> dict[str, Any]:
        return {"max_batch_size": self.predict_batch._get_max_batch_size(), "batch_wait_timeout_s": self.max_wait_s}

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

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._held = 0
        self._open.set()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def predict_batch(self, images: list[bytes], top_ks: list[int]) -> list[dict[str, Any]]:
        self._open.clear()
        if self._timer is not None:  # a timer from an earlier pass must not open the gate during this one
            self._timer.cancel()
            self._timer = None
        self._busy = True
        self._peak = self._active
        try:
            results = await asyncio.to_thread(self._run, images, top_ks) if self.offload else self._run(images, top_ks)
        finally:
            self._busy = False
            # as many requests as were here during this pass will want the next one (in a closed
            # loop the clients of this batch come straight back); wait for them, at most max_wait_s
            self._expected = max(1, min(self._peak, self.predict_batch._get_max_batch_size()))
            if self._held >= self._expected or self.max_wait_s <= 0:
                self._release()
            else:
                self._timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._release)
        self.batch_sizes[len(images)] += 1
        self.batch_hist.observe(len(images))
        flagged = sum(1 for r in results if r.get("uncertain"))
        if flagged:
            self.uncertain.inc(flagged)
        return results

    async def predict(self, image: bytes, top_k: int = 5) -> dict[str, Any]:
        """One image → result dict, or {'error': decoder message} for that image alone."""
        # Serve forms a batch as soon as requests arrive, not when the model is free: requests
        # landing during a pass would each become a size-1 batch queued behind it, and a closed
        # loop of clients stays fragmented. So requests that arrive while a pass runs are held
        # here; after the pass they enter Serve's queue together, as soon as as many are waiting
        # as were in flight during the pass, or after max_wait_s. An idle replica admits at once.
        self._active += 1
        self._peak = max(self._peak, self._active)
        try:
            if not self._open.is_set():
                self._held += 1
                if not self._busy and self._held >= self._expected:
                    self._release()
                await self._open.wait()
            result = await self.predict_batch(image, top_k)
        finally:
            self._active -= 1
        m = self.predictor.model
        return {"model": m.name, "version": m.version, **result}

    def info(self) -> dict[str, Any]:
        m = self.predictor.model
        return {"route": self.role, "name": m.name, "version": m.version, "alias": m.meta.get("alias"),
                "uri": self.uri, "kind": m.meta.get("kind"), "test_accuracy": m.meta.get("test_accuracy"),
                "num_classes": len(m.class_names), "image_size": m.preprocessing.image_size,
                "uncertainty_threshold": self.predictor.threshold, "torch_threads": self.threads,
                **self.batching(), "batch_sizes_seen": {str(k): v for k, v in sorted(self.batch_sizes.items())}}

    async def ping(self) -> str:
        return "ok"

    async def check_health(self) -> None:
        """Serve restarts the replica if this raises: the model must be loaded and the batcher alive."""
        if getattr(self, "predictor", None) is None:
            raise RuntimeError(f"{self.role}: model not loaded")
        if self.batch_sizes and not await self.predict_batch._is_batching_task_alive():
            raise RuntimeError(f"{self.role}: batching task died")


@serve.deployment(name="Ensemble", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1},
                  user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.03})
class Ensemble(BatchedModel):
    """Soft-voting ensemble (manifest kind 'ensemble'), or any model URI."""

    role = "ensemble"


# ----------------------------------------------------------------------------- ingress

api = FastAPI(title="flowers", description="Flowers-102 classification: ensemble and INT8 student")


class ApiError(Exception):
    """An HTTP error with a JSON body {'error': message, 'status': code}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    msg = (f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/predict/{{ensemble,student}}, "
           "POST /v1/compare, GET /healthz") if exc.status_code == 404 else str(exc.detail)
    return _error(exc.status_code, msg)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


async def read_image(request: Request, limit: int) -> bytes:
    """Image bytes from a raw or multipart body, validated without decoding."""
    ctype = _media_type(request.headers.get("content-type"))
    if ctype not in IMAGE_TYPES and ctype != MULTIPART:
        raise ApiError(415, f"unsupported content type '{ctype or '(none)'}'; send raw image/jpeg, image/png "
                            "or image/webp bytes, or a multipart/form-data file upload")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refuse before reading a byte
        raise ApiError(413, f"body of {int(declared):,} bytes exceeds the {limit:,} byte limit; send a smaller image")
    body = bytearray()
    async for chunk in request.stream():  # chunked uploads carry no length: count while reading
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body exceeds the {limit:,} byte limit; send a smaller image")
    if not body:
        raise ApiError(400, "empty body; send the image bytes (curl --data-binary @flower.jpg) or -F file=@flower.jpg")
    if ctype == MULTIPART:
        return await _multipart_file(request, bytes(body))
    return bytes(body)


async def _multipart_file(request: Request, body: bytes) -> bytes:
    async def replay() -> dict:  # the stream is spent; hand the parser the bytes we already hold
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as e:  # malformed multipart: starlette raises several types
        raise ApiError(400, f"malformed multipart body: {e}") from None
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if not files:
        raise ApiError(400, "multipart body has no file part; send -F file=@flower.jpg")
    part = form.get("file") if isinstance(form.get("file"), UploadFile) else files[0]
    ptype = _media_type(part.content_type)
    if ptype not in PART_TYPES:
        raise ApiError(415, f"unsupported file type '{ptype}' for '{part.filename}'; send JPEG, PNG or WebP")
    data = await part.read()
    if not data:
        raise ApiError(400, f"uploaded file '{part.filename}' is empty")
    return data


def _unknown_model(model: str) -> ApiError:
    return ApiError(404, f"unknown model '{model}'; use one of: {', '.join(MODEL_ROUTES)}")


def _top_k(raw: str | None, default: int) -> int:
    if raw is None:
        return default
    try:
        k = int(raw)
    except ValueError:
        raise ApiError(400, f"top_k must be an integer in 1..{MAX_TOP_K}, got '{raw}'") from None
    if not 1 <= k <= MAX_TOP_K:
        raise ApiError(400, f"top_k must be in 1..{MAX_TOP_K}, got {k}")
    return k


@serve.deployment(name="Student", max_ongoing_requests=128, ray_actor_options={"num_cpus": 1},
                  user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.0})
@serve.ingress(api)
class Student(BatchedModel):
    """Distilled INT8 student (manifest kind 'onnx', or any model URI) and the HTTP front."""

    role = "student"
    offload = False

    def __init__(self, model_uri: str, ensemble: DeploymentHandle, args: dict[str, Any]) -> None:
        self.args = AppArgs.from_dict(args)
        super().__init__(model_uri, self.args.tracking_uri, self.args.uncertainty_threshold)
        self.ensemble = ensemble
        self.compares = Counter("flowers_compare_requests", description="/v1/compare requests answered")
        self.disagreements = Counter("flowers_compare_disagreements",
                                     description="/v1/compare requests where ensemble and student top-1 differ")

    async def _predict(self, model: str, image: bytes, top_k: int) -> dict[str, Any]:
        """`model` is one of MODEL_ROUTES (the routes check it before reading the body)."""
        t0 = time.perf_counter()
        try:
            if model == "student":
                result = await self.predict(image, top_k)
            else:
                result = await self.ensemble.predict.remote(image, top_k)
        except Exception as e:  # a failing model or a crashed replica must still answer in JSON
            log.exception("%s prediction failed", model)
            raise ApiError(500, f"{model} model failed: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
        result["latency_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        return result

    @staticmethod
    def _ok(result: dict[str, Any], route: str) -> dict[str, Any]:
        if "error" in result:  # the decoder's message for this image
            raise ApiError(400, result["error"])
        return {"route": route, **result}

    @api.post("/v1/predict/{model}")
    async def http_predict(self, model: str, request: Request) -> JSONResponse:
        if model not in MODEL_ROUTES:  # 404 before reading the body
            raise _unknown_model(model)
        k = _top_k(request.query_params.get("top_k"), self.args.default_top_k)
        image = await read_image(request, self.args.max_body_bytes)
        # a JSONResponse skips FastAPI's response-model validation and encoder: ~0.2 ms per request
        return JSONResponse(self._ok(await self._predict(model, image, k), model))

    @api.post("/v1/compare")
    async def http_compare(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        k = _top_k(request.query_params.get("top_k"), self.args.default_top_k)
        image = await read_image(request, self.args.max_body_bytes)
        ens, stu = await asyncio.gather(*(self._predict(m, image, k) for m in MODEL_ROUTES))
        ens, stu = self._ok(ens, "ensemble"), self._ok(stu, "student")
        agree = ens["label"] == stu["label"]
        self.compares.inc()
        if not agree:
            self.disagreements.inc()
        return JSONResponse({"agree": agree, "ensemble": ens, "student": stu,
                             "latency_ms": round((time.perf_counter() - t0) * 1e3, 3)})

    @api.get("/v1/models")
    async def http_models(self) -> dict[str, Any]:
        ens = await self.ensemble.info.remote()
        return {"models": [ens, self.info()], "max_body_bytes": self.args.max_body_bytes,
                "default_top_k": self.args.default_top_k}

    @api.get("/healthz")
    async def http_healthz(self) -> JSONResponse:
        status = {"student": await self.ping()}
        try:
            status["ensemble"] = await asyncio.wait_for(self.ensemble.ping.remote(), timeout=5.0)
        except Exception as e:  # unhealthy or busy beyond 5 s: report, don't raise
            status["ensemble"] = f"unavailable: {type(e).__name__}"
        ok = all(v == "ok" for v in status.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "models": {m: status[m] for m in MODEL_ROUTES}},
                            status_code=200 if ok else 503)


# ----------------------------------------------------------------------------- app builders


def _with_runtime_env(opts: dict[str, Any]) -> dict[str, Any]:
    """Give replicas the fast-allocator environment, keeping any env vars the options set."""
    from flowers.runtime import worker_runtime_env

    opts = dict(opts)
    actor = dict(opts.get("ray_actor_options") or {})
    renv = dict(actor.get("runtime_env") or {})
    renv["env_vars"] = {**worker_runtime_env()["env_vars"], **(renv.get("env_vars") or {})}
    actor["runtime_env"] = renv
    opts["ray_actor_options"] = actor
    return opts


DEFAULT_ACTOR_OPTIONS = {"Ensemble": {"num_cpus": 1}, "Student": {"num_cpus": 1}}


def build_app(args: dict[str, Any] | None = None,
              deployment_options: dict[str, dict[str, Any]] | None = None) -> serve.Application:
    """The Serve application: `serve deploy` imports this with the config's `args:` block.

    `deployment_options` maps a deployment name (Ensemble, Student) to `.options()`
    keyword arguments, for callers that build the app in Python.
    """
    a = AppArgs.from_dict(args)
    opts = {name: {"ray_actor_options": dict(DEFAULT_ACTOR_OPTIONS[name])} for name in DEFAULT_ACTOR_OPTIONS}
    for name, o in (deployment_options or {}).items():
        if name not in opts:
            raise ValueError(f"unknown deployment '{name}' in options; known: {sorted(opts)}")
        opts[name].update(o)
    opts = {n: _with_runtime_env(o) for n, o in opts.items()}
    ens_args = (a.ensemble_uri, a.tracking_uri, a.uncertainty_threshold)
    ens = _options(Ensemble, opts["Ensemble"], ens_args).bind(*ens_args)
    # the handle is not part of the Student's version: a new ensemble URI rolls only the Ensemble
    return _options(Student, opts["Student"], (a.student_uri, asdict(a))).bind(a.student_uri, ens, asdict(a))


def _code_version(dep_name: str, init_args: tuple) -> str:
    """Same code + same constructor args → same version.

    `serve deploy` derives versions from the config this way, so a redeploy that only
    changes `user_config` reconfigures live replicas; `serve.run` would otherwise draw a
    random version and restart every replica. A new model URI (e.g. a pinned
    models:/name/<version> after an alias move) gives a new version → rolling update.
    """
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps([dep_name, init_args], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _options(dep: serve.Deployment, opts: dict[str, Any], init_args: tuple) -> serve.Deployment:
    try:  # `version` is internal in Serve's Python API; fall back to Serve's default if it goes away
        return dep.options(**opts, version=_code_version(dep.name, init_args), _internal=True)
    except (TypeError, ValueError):
        log.warning("Serve rejected an explicit version; user_config changes will restart replicas")
        return dep.options(**opts)


@dataclass
class ServeSpec:
    """What serve/config.yaml describes, ready for `serve.start` + `serve.run`."""

    app: serve.Application
    name: str
    route_prefix: str
    http_options: dict[str, Any]
    args: AppArgs
    deployment_options: dict[str, dict[str, Any]]

    def required_cpus(self) -> float:
        """CPUs the minimum replica counts ask for (a local Ray must offer at least this)."""
        total = 0.0
        for name, default in DEFAULT_ACTOR_OPTIONS.items():
            o = self.deployment_options.get(name, {})
            auto = o.get("autoscaling_config") or {}
            n = o.get("num_replicas", auto.get("min_replicas", 1))
            total += float((o.get("ray_actor_options") or default).get("num_cpus", default["num_cpus"])) * max(1, int(n))
        return total


def load_serve_config(path: str | Path = DEFAULT_CONFIG) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"serve config not found: {path}")
    cfg = yaml.safe_load(path.read_text()) or {}
    apps = cfg.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{path}: expected exactly one application, found {len(apps)}")
    return cfg


def app_from_config(path: str | Path = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None,
                    deployment_overrides: dict[str, dict[str, Any]] | None = None) -> ServeSpec:
    """Build the app as `serve deploy` would, from the YAML, with `args` overrides."""
    cfg = load_serve_config(path)
    app_cfg = cfg["applications"][0]
    args = {**(app_cfg.get("args") or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    dep_opts: dict[str, dict[str, Any]] = {}
    for d in app_cfg.get("deployments") or []:
        d = dict(d)
        dep_opts[d.pop("name")] = d
    for name, o in (deployment_overrides or {}).items():
        dep_opts.setdefault(name, {}).update(o)
    for o in dep_opts.values():  # Serve refuses both; a fixed count overrides autoscaling
        if "num_replicas" in o and o.get("autoscaling_config"):
            o.pop("autoscaling_config")
    app = build_app(args, dep_opts)
    return ServeSpec(app, app_cfg.get("name", "flowers"), app_cfg.get("route_prefix", "/"),
                     dict(cfg.get("http_options") or {}), AppArgs.from_dict(args), dep_opts)


def pin_alias(uri: str) -> str:
    """models:/name@alias → models:/name/<version>, so moving the alias and redeploying changes
    the deployment's arguments and Serve rolls the replicas onto the new model."""
    if not (uri.startswith("models:/") and "@" in uri):
        return uri
    from mlflow import MlflowClient

    from flowers.predict import ModelLoadError

    name, alias = uri[len("models:/"):].split("@", 1)
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias).version
    except Exception as e:  # MLflow raises several types; one clear line for the user
        raise ModelLoadError(f"cannot resolve '{uri}': {str(e).splitlines()[0]}; check the alias in MLflow "
                             "or set MLFLOW_TRACKING_URI") from None
    return f"models:/{name}/{version}"


def curl_examples(base_url: str) -> str:
    return "\n".join([
        f"  curl -s -H 'Content-Type: image/jpeg' --data-binary @flower.jpg '{base_url}/v1/predict/ensemble?top_k=3'",
        f"  curl -s -F file=@flower.jpg {base_url}/v1/predict/student",
        f"  curl -s -H 'Content-Type: image/jpeg' --data-binary @flower.jpg {base_url}/v1/compare",
        f"  curl -s {base_url}/v1/models",
        f"  curl -s {base_url}/healthz",
    ])
