"""What the HTTP API says about itself: response models, request bodies and error answers for OpenAPI.

The routes read their image bodies by hand (serve/http.py: size and type checks before a byte is
read, multipart parsed only after), so FastAPI cannot infer the request body; `IMAGE_BODY` declares
it (raw image bytes, or a multipart file part). The handlers answer with `JSONResponse` (no response
validation on the hot path); the models here describe those answers, and tests/test_openapi.py checks
real answers against them. FastAPI's default 422 is never sent (validation errors are 400s with the
JSON error body), so `install_openapi` drops it from the schema.
"""
# no `from __future__ import annotations`: pydantic and FastAPI must see real types

from typing import Any, Literal, Optional

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

ModelRoute = Literal["ensemble", "student"]


class ErrorBody(BaseModel):
    """Every error answer: one line saying what was wrong and what to do."""

    model_config = ConfigDict(extra="forbid")
    error: str = Field(description="what was wrong and what to do, one line")
    status: int = Field(description="the HTTP status code again")


class TopClass(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: int = Field(ge=0, description="class index")
    name: str = Field(description="class name")
    probability: float = Field(ge=0, le=1)


class Prediction(BaseModel):
    """One model's answer for one image."""

    model_config = ConfigDict(extra="forbid")
    route: ModelRoute
    model: str = Field(description="the model's registered name (or its file's name)")
    version: Optional[str] = Field(description="registered version; null for a model served from a file")
    alias: Optional[str] = Field(description="the alias this answer was served under: champion (or the alias the "
                                             "app follows), canary; null for a file or a pinned version")
    label: int = Field(ge=0, description="top-1 class index")
    name: str = Field(description="top-1 class name")
    confidence: float = Field(ge=0, le=1, description="top-1 probability")
    top_k: list[TopClass] = Field(description="the top_k classes, most probable first")
    entropy: float = Field(ge=0, le=1, description="normalised entropy of the probabilities (0: certain, 1: uniform)")
    uncertain: bool = Field(description="entropy above the model's uncertainty_threshold (GET /v1/models)")
    batch_size: int = Field(ge=1, description="images in the forward pass this one rode in")
    batch_ms: float = Field(description="that forward pass's time, decode included")
    latency_ms: float = Field(description="time in the ingress for this model's call")


class Comparison(BaseModel):
    """Both models on the same image."""

    model_config = ConfigDict(extra="forbid")
    agree: bool = Field(description="the two models' top-1 classes are the same")
    ensemble: Prediction
    student: Prediction
    latency_ms: float = Field(description="time in the ingress for the whole comparison")


class ShadowPair(BaseModel):
    """A shadow comparison, over the live requests of one (answering version, shadow version) pair."""

    model_config = ConfigDict(extra="allow")
    requests: int = Field(description="copies compared")
    skipped: int = Field(description="copies not made: the replica's shadow queue was full, or the shadow failed")
    top1_agreement: Optional[float] = Field(description="share of copies whose top-1 class equals the answer's")
    mean_abs_prob_diff: Optional[float] = Field(description="mean over copies of mean over classes |p - q|")
    primary_ms_mean: Optional[float] = Field(description="the answering version's forward pass, ms")
    shadow_ms_mean: Optional[float] = Field(description="the shadow's forward pass on the copy, ms")


class Rollout(BaseModel):
    """What the route serves and where it is going (serve/follower.py)."""

    model_config = ConfigDict(extra="allow")
    following: Optional[str] = Field(description="the registry alias followed (null: a file or --no-follow)")
    serving_version: Optional[str]
    target_version: Optional[str] = Field(description="the version being loaded and warmed up; null when steady")
    state: Literal["steady", "rolling out"]
    replicas: dict[str, int] = Field(description="live replicas per version they answer with")
    canary: Optional[dict[str, Any]] = Field(description="{version, percent} while a canary runs")
    shadow: Optional[dict[str, Any]] = Field(description="{version, pairs: {'<answering>-><shadow>': ShadowPair}}")
    failed: dict[str, dict[str, Any]] = Field(description="version → {reason, replica, at}: not rolled out")
    last_switch: Optional[dict[str, Any]]


class ModelInfo(BaseModel):
    """One served model as its replica describes it (more diagnostic fields may follow)."""

    model_config = ConfigDict(extra="allow")
    route: ModelRoute
    name: str
    version: Optional[str]
    alias: Optional[str] = Field(description="the registry alias the URI names (e.g. champion), if any")
    uri: str
    kind: Optional[str] = Field(description="manifest kind: checkpoint, ensemble, onnx ...")
    test_accuracy: Optional[float]
    num_classes: int
    image_size: int
    uncertainty_threshold: float = Field(description="entropy above this is flagged uncertain")
    torch_threads: int
    device: str
    max_batch_size: int
    batch_wait_timeout_s: float
    admission_gate: bool
    batch_sizes_seen: dict[str, int]
    int8_check: Optional[dict[str, Any]]
    warnings: list[str]
    pinned: Optional[str] = Field(None, description="the version answering, as models:/name/<version> or a path")
    loaded_versions: list[Optional[str]] = Field([], description="versions loaded on the replica that answered "
                                                                 "(serving, and any target, canary or shadow)")
    rollout: Optional[Rollout] = Field(None, description="the route's rollout state (the app's Follower)")


class Models(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[ModelInfo] = Field(description="the ensemble, then the student")
    max_body_bytes: int = Field(description="larger request bodies get 413")
    default_top_k: int = Field(description="top_k when the query leaves it out")
    max_top_k: int


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["ok", "degraded"]
    models: dict[str, str] = Field(description="per model route: 'ok' or why not")


class Explanation(BaseModel):
    """Grad-CAM of one class for one image, as a PNG over the model's own input crop."""

    model_config = ConfigDict(extra="forbid")
    route: ModelRoute
    model: str
    version: Optional[str]
    explained: str = Field(description="the network the gradients come from (the INT8 student's fp32 source)")
    label: int = Field(ge=0, description="the class explained")
    name: str
    probability: float = Field(ge=0, le=1, description="that class's probability under the explained network")
    maps: int = Field(ge=1, description="Grad-CAM maps averaged (one per ensemble member)")
    image_size: int = Field(description="side of the model's centre crop the map is drawn on")
    png_base64: str = Field(description="the heat map over the crop, PNG, base64")
    latency_ms: float


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


BAD_IMAGE = {
    400: _error("bad input: empty body, not a recognised image, truncated, over the pixel limit, malformed "
                "multipart, or a query parameter out of range"),
    413: _error("body over max_body_bytes (GET /v1/models); refused from Content-Length before reading"),
    415: _error("content type (or multipart part type) not JPEG, PNG or WebP"),
    500: _error("the model failed"),
}
PREDICT_ERRORS = {**BAD_IMAGE, 404: _error("unknown model (use ensemble or student)")}
EXPLAIN_ERRORS = {**PREDICT_ERRORS, 501: _error("the model has no PyTorch network to take gradients from"),
                  503: _error("too many explanations waiting; retry later")}

_BINARY = {"type": "string", "format": "binary"}
IMAGE_BODY = {"requestBody": {
    "required": True,
    "description": "The photo: raw JPEG/PNG/WebP bytes with their Content-Type, or a multipart/form-data upload "
                   "(field `file`, else the first file part). Bodies over max_body_bytes get 413 before reading.",
    "content": {
        "image/jpeg": {"schema": _BINARY},
        "image/png": {"schema": _BINARY},
        "image/webp": {"schema": _BINARY},
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["file"],
                       "properties": {"file": {**_BINARY, "description": "JPEG, PNG or WebP file"}}},
            "encoding": {"file": {"contentType": "image/jpeg, image/png, image/webp, application/octet-stream"}},
        },
    },
}}


def install_openapi(api: FastAPI) -> None:
    """Generate the schema once, without the 422 answers FastAPI adds (this API answers 400)."""
    def openapi() -> dict[str, Any]:
        if api.openapi_schema:
            return api.openapi_schema
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
                for param in op.get("parameters", []):
                    # Swagger UI 5 pre-fills an optional integer without an example with '{}' (a 400 on
                    # Execute), and inside a Serve replica the parameters come with `example: {}`;
                    # an explicit null example leaves the field empty, i.e. the default
                    if param.get("in") == "query" and param.get("example") in (None, {}):
                        param["example"] = None
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        api.openapi_schema = schema
        return schema

    api.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema
