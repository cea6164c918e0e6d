"""The API's OpenAPI document, without starting Serve: valid, and it says what the routes take and answer.

tests/test_web.py checks the served /openapi.json and real answers against these models.
"""
from __future__ import annotations

import pytest

POSTS = ("/v1/predict/{model}", "/v1/compare", "/v1/explain/{model}")


@pytest.fixture(scope="module")
def spec() -> dict:
    from serve.deployments import api

    return api.openapi()


def test_spec_passes_the_validator(spec):
    from openapi_spec_validator import validate

    validate(spec)
    assert spec["openapi"].startswith("3.")


def test_posts_declare_image_bodies_top_k_and_errors(spec):
    from serve.config import MAX_TOP_K

    for path in POSTS:
        op = spec["paths"][path]["post"]
        body = op["requestBody"]
        assert body["required"] is True
        assert {"image/jpeg", "image/png", "image/webp", "multipart/form-data"} == set(body["content"])
        assert body["content"]["image/jpeg"]["schema"] == {"type": "string", "format": "binary"}
        form = body["content"]["multipart/form-data"]["schema"]
        assert form["required"] == ["file"] and form["properties"]["file"]["format"] == "binary"
        codes = set(op["responses"])
        assert {"200", "400", "413", "415", "500"} <= codes and "422" not in codes  # 422 is never sent
        for code in codes - {"200"}:
            ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorBody", (path, code)
        params = {p["name"]: p for p in op.get("parameters", [])}
        if "{model}" in path:
            assert params["model"]["in"] == "path" and params["model"]["schema"]["enum"] == ["ensemble", "student"]
            assert "404" in codes
        if path != "/v1/explain/{model}":
            top_k = params["top_k"]["schema"]
            assert (top_k["type"], top_k["minimum"], top_k["maximum"]) == ("integer", 1, MAX_TOP_K)
            assert params["top_k"]["example"] is None  # Swagger UI leaves it empty (the default), not '{}'
    explain = spec["paths"]["/v1/explain/{model}"]["post"]
    assert {"501", "503"} <= set(explain["responses"])
    assert explain["parameters"][1]["name"] == "label"


def test_responses_name_their_models(spec):
    schemas = spec["components"]["schemas"]
    ok = {path: ops[next(iter(ops))]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
          for path, ops in spec["paths"].items()}
    assert ok == {"/v1/predict/{model}": "#/components/schemas/Prediction",
                  "/v1/compare": "#/components/schemas/Comparison",
                  "/v1/explain/{model}": "#/components/schemas/Explanation",
                  "/v1/models": "#/components/schemas/Models",
                  "/healthz": "#/components/schemas/Health"}
    assert set(schemas["ErrorBody"]["required"]) == {"error", "status"}
    pred = schemas["Prediction"]["properties"]
    assert {"top_k", "entropy", "uncertain", "latency_ms", "version"} <= set(pred)
    assert "HTTPValidationError" not in schemas
    # the page and the docs are served but are not API routes
    assert not {"/", "/docs", "/redoc", "/static/{name}"} & set(spec["paths"])
