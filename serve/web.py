"""The web page and the API docs, served by the ingress itself from package data (serve/static/).

`GET /` is the page (plain HTML/CSS/JS, no build step); `GET /static/...` its files and the vendored
Swagger UI and ReDoc assets (serve/static/vendor/README.md); `GET /docs` and `GET /redoc` the API
docs pointing at those assets, so nothing is fetched from another host. Files are read once per
replica into memory; only names under static/ can be asked for (no path is built from the URL).
The page's Content-Security-Policy allows scripts, styles and requests from this origin only,
so even a class name or error message that carried markup could not load or run anything.
"""
# no `from __future__ import annotations`: FastAPI must see real types (Request) in the handlers

import functools
import hashlib
import mimetypes
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

STATIC = Path(__file__).with_name("static")
VENDOR = "static/vendor"
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# the docs pages: FastAPI's Swagger page starts the UI from an inline script, both UIs style inline, and
# ReDoc's sidebar shows a logo from its CDN, which this blocks (the page never contacts another host)
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".md": "text/plain; charset=utf-8",
         ".txt": "text/plain; charset=utf-8", "": "text/plain; charset=utf-8"}  # LICENSE, NOTICE


@functools.lru_cache(maxsize=1)
def assets() -> dict[str, tuple[bytes, str, str]]:
    """Every file under static/: relative path → (bytes, media type, ETag)."""
    out = {}
    for f in sorted(STATIC.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            ctype = TYPES.get(f.suffix) or mimetypes.guess_type(f.name)[0] or "application/octet-stream"
            out[f.relative_to(STATIC).as_posix()] = (data, ctype, '"' + hashlib.sha256(data).hexdigest()[:20] + '"')
    return out


def static_digest() -> str:
    """One hash over every static file (part of the ingress's deployment version)."""
    h = hashlib.sha256()
    for name, (_, _, etag) in assets().items():
        h.update(name.encode() + etag.encode())
    return h.hexdigest()[:16]


def asset_response(name: str, request: Request, extra: dict[str, str] | None = None) -> Response:
    found = assets().get(name)
    if found is None:  # the API's JSON error body (serve/http.py)
        return JSONResponse({"error": f"no static file '{name}'", "status": 404}, status_code=404)
    data, ctype, etag = found
    headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", **(extra or {})}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=ctype, headers=headers)


def add_routes(api: FastAPI) -> None:
    """GET /, /static/{name}, /docs and /redoc on the ingress's FastAPI app (left out of the schema)."""

    @api.get("/", include_in_schema=False)
    async def page(request: Request) -> Response:
        return asset_response("index.html", request, {"Content-Security-Policy": PAGE_CSP,
                                                      "Referrer-Policy": "no-referrer"})

    @api.get("/static/{name:path}", include_in_schema=False)
    async def static(name: str, request: Request) -> Response:
        return asset_response(name, request)

    @api.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return _with_csp(get_swagger_ui_html(
            openapi_url=f"{root}{api.openapi_url}", title=f"{api.title}: API (Swagger UI)",
            swagger_js_url=f"{root}/{VENDOR}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/{VENDOR}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{root}/{VENDOR}/swagger-ui/favicon-32x32.png",
            # no validator badge: it would send the spec to validator.swagger.io
            swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": True}))

    @api.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return _with_csp(get_redoc_html(openapi_url=f"{root}{api.openapi_url}", title=f"{api.title}: API (ReDoc)",
                                        redoc_js_url=f"{root}/{VENDOR}/redoc/redoc.standalone.js",
                                        redoc_favicon_url=f"{root}/{VENDOR}/swagger-ui/favicon-32x32.png",
                                        with_google_fonts=False))


def _with_csp(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page
