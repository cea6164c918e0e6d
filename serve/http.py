"""The HTTP layer: request validation and JSON errors, before any model runs.

Content type, size and emptiness are checked without decoding (a declared Content-Length over
the limit is refused before reading; chunked bodies are counted while reading). Every error is
JSON: {"error": message, "status": code}. Decoding happens later, per item, inside the batched
model call, so a bad image fails only its own request.
"""
# no `from __future__ import annotations`: FastAPI must see real types (Request) in the handlers

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import schemas, web

IMAGE_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png", "image/webp"})
MULTIPART = "multipart/form-data"
# curl -F and browsers label unknown files octet-stream; the decoder decides for those parts
PART_TYPES = IMAGE_TYPES | {"application/octet-stream", ""}
MODEL_ROUTES = ("ensemble", "student")
ROUTES = ("GET / (web page), GET /v1/models, POST /v1/predict/{ensemble,student}, POST /v1/compare, "
          "POST /v1/explain/{ensemble,student}, GET /healthz, GET /docs")


class ApiError(Exception):
    """An HTTP error with a JSON body {'error': message, 'status': code}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def make_api() -> FastAPI:
    """The FastAPI app of the ingress, with every error answered as JSON, its web page, and API docs
    whose assets it serves itself (serve/web.py)."""
    api = FastAPI(title="flowers", version="1", docs_url=None, redoc_url=None,
                  description="Flowers-102 classification: a soft-voting ensemble and its INT8 student, side by "
                              "side. Every error is JSON {\"error\": message, \"status\": code}. "
                              "The web page is at `/`.")

    @api.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = (f"no route {request.method} {request.url.path}; see {ROUTES}" if exc.status_code == 404
               else str(exc.detail))
        return error_response(exc.status_code, msg)

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        for e in errors:  # a path naming no model is a resource that does not exist
            if tuple(e["loc"][:2]) == ("path", "model"):
                return error_response(404, unknown_model(str(e.get("input"))))
        return error_response(400, "; ".join(validation_message(e) for e in errors))

    schemas.install_openapi(api)
    web.add_routes(api)
    return api


def validation_message(e: dict[str, Any]) -> str:
    """One pydantic error as a line: 'query parameter top_k: Input should be ..., got '0''."""
    where = f"{e['loc'][0]} parameter {'.'.join(map(str, e['loc'][1:]))}" if len(e["loc"]) > 1 else str(e["loc"][0])
    got = f", got {e['input']!r}" if "input" in e and e["input"] is not None else ""
    return f"{where}: {e['msg']}{got}"


def media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


async def read_image(request: Request, limit: int) -> bytes:
    """Image bytes from a raw or multipart body, validated without decoding."""
    ctype = media_type(request.headers.get("content-type"))
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
        return await multipart_file(request, bytes(body))
    return bytes(body)


async def multipart_file(request: Request, body: bytes) -> bytes:
    """The uploaded file of a multipart body (field `file`, else the first file part)."""
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
    ptype = media_type(part.content_type)
    if ptype not in PART_TYPES:
        raise ApiError(415, f"unsupported file type '{ptype}' for '{part.filename}'; send JPEG, PNG or WebP")
    data = await part.read()
    if not data:
        raise ApiError(400, f"uploaded file '{part.filename}' is empty")
    return data


def unknown_model(model: str) -> str:
    return f"unknown model '{model}'; use one of: {', '.join(MODEL_ROUTES)}"


def answer(result: dict[str, Any], route: str) -> dict[str, Any]:
    """A model's result as the route's answer; a per-image decoder error becomes a 400."""
    if "error" in result:
        raise ApiError(400, result["error"])
    return {"route": route, **result}


def curl_examples(base_url: str) -> str:
    return "\n".join([
        f"  open {base_url}/ in a browser (the web page; API docs at {base_url}/docs)",
        f"  curl -s -H 'Content-Type: image/jpeg' --data-binary @flower.jpg '{base_url}/v1/predict/ensemble?top_k=3'",
        f"  curl -s -F file=@flower.jpg {base_url}/v1/predict/student",
        f"  curl -s -H 'Content-Type: image/jpeg' --data-binary @flower.jpg {base_url}/v1/compare",
        f"  curl -s -F file=@flower.jpg '{base_url}/v1/explain/ensemble' (Grad-CAM, base64 PNG)",
        f"  curl -s {base_url}/v1/models",
        f"  curl -s {base_url}/healthz",
    ])
