"""Schemathesis over every operation of the OpenAPI document (/generate, /tasks, /metrics, probes, /v1/*,
/admin/*), against a real server with real SmolLM2 engines, an API key and an admin token.

Each operation is fuzzed with valid and invalid inputs, with the right credentials and with none.
Every response must be documented (status code, media type, body schema) and no 5xx may occur but
the documented 503s. The task / model fields are drawn from the served tasks so that requests reach
the engines; generated token counts are capped so the fuzz stays short.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from launcher.embedded import build_embedded_app
from launcher.settings import ServeSettings
from prefill_service.admin_api import AdminService, build_admin_router
from prefill_service.app import create_app
from prefill_service.service import PrefillService
from tests.helpers import running_server, write_adapter

API_KEY = "fuzz-api-key"
ADMIN_TOKEN = "fuzz-admin-token"
TASKS = ["base", "alpha"]
MAX_FUZZ_TOKENS = 4
TOKEN_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FUZZ_SETTINGS = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def fuzz_server(smollm2, tmp_path_factory) -> Iterator[tuple[str, FastAPI]]:
    root = tmp_path_factory.mktemp("fuzz-adapters")
    write_adapter(root, "alpha", "prad-pa", smollm2.config, smollm2.fingerprint, 5, 0.3)
    settings = ServeSettings(adapters=root, dtype="float32", device="cpu", max_seq_len=128, api_key=API_KEY,
                             admin_token=ADMIN_TOKEN, store=tmp_path_factory.mktemp("fuzz-store"),
                             max_adapter_bytes=4096, max_waiting=8, http_body_timeout_s=10.0)
    app = build_embedded_app(settings, smollm2)
    with running_server(app) as url:
        yield url, app
    # the server still serves a normal request after the fuzz: checked in test_still_serves_after_fuzz


def _focus(document: dict[str, Any]) -> dict[str, Any]:
    """The served document, with the task fields limited to served tasks and token counts to a few,
    so that valid requests reach the engines and finish fast."""
    doc = copy.deepcopy(document)
    for name, component in doc["components"]["schemas"].items():
        properties = component.get("properties", {})
        for field in ("task", "model"):
            if field in properties and name in ("GenerateRequest", "CompletionRequest", "ChatRequest"):
                properties[field] = {"type": "string", "enum": TASKS}
        for field in TOKEN_FIELDS:
            if field in properties:
                properties[field] = {"type": "integer", "minimum": 1, "maximum": MAX_FUZZ_TOKENS}
    return doc


@pytest.fixture(scope="module")
def api_schema(fuzz_server) -> schemathesis.BaseSchema:
    url, app = fuzz_server
    config = schemathesis.Config.from_dict({
        "base-url": url,
        "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
        "generation": {"mode": "all"},
        "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
    })
    return schemathesis.openapi.from_dict(_focus(app.openapi()), config=config)


def _operations() -> list[tuple[str, str]]:
    """(method, path) of every documented operation. The document depends on the routes only, so an
    app built without engines gives it (schemathesis' lazy pytest loader needs pytest < 9)."""
    app = create_app(cast(PrefillService, None), admin_router=build_admin_router(cast(AdminService, None), "x"))
    return [(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item]


OPERATIONS = _operations()


def _fuzz(schema: schemathesis.BaseSchema, method: str, path: str, headers: dict[str, str],
          max_examples: int) -> list[schemathesis.Response]:
    """Valid and invalid cases of one operation, each sent and checked; returns the responses."""
    operation = schema[path][method]
    responses: list[schemathesis.Response] = []
    # invalid cases need something that can be invalid: a body (any string is a valid path parameter here)
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if operation.body else [GenerationMode.POSITIVE]
    for mode in modes:
        @settings(FUZZ_SETTINGS, max_examples=max_examples)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            _cap_tokens(case)
            responses.append(case.call_and_validate(headers=headers, checks=CHECKS, timeout=60))

        run()
    return responses


def _cap_tokens(case: schemathesis.Case) -> None:
    """Keep every run short: cap token counts (invalid-mode bodies may carry huge valid ones) and give
    one where it is left out (the defaults run to dozens or hundreds of tokens)."""
    if not isinstance(case.body, dict):
        return
    for field in TOKEN_FIELDS:
        value = case.body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_FUZZ_TOKENS:
            case.body[field] = MAX_FUZZ_TOKENS
    default_field = "max_new_tokens" if case.path == "/generate" else "max_tokens"
    if case.path in ("/generate", "/v1/completions", "/v1/chat/completions") and not set(TOKEN_FIELDS) & set(case.body):
        case.body[default_field] = MAX_FUZZ_TOKENS


def _credentials(path: str) -> dict[str, str]:
    token = ADMIN_TOKEN if path.startswith("/admin") else API_KEY
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_fuzz_with_credentials(api_schema: schemathesis.BaseSchema, method: str, path: str) -> None:
    _fuzz(api_schema, method, path, _credentials(path), max_examples=50)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_fuzz_without_credentials(api_schema: schemathesis.BaseSchema, method: str, path: str) -> None:
    for response in _fuzz(api_schema, method, path, {}, max_examples=3):
        if path.startswith(("/admin", "/v1/", "/generate", "/tasks")):
            assert response.status_code == 401, (method, path, response.text)


def test_still_serves_after_fuzz(fuzz_server) -> None:
    url, _ = fuzz_server
    r = httpx.post(url + "/generate", json={"task": "base", "prompt": "Hello", "max_new_tokens": 3},
                   headers=_credentials("/generate"), timeout=60)
    assert r.status_code == 200 and len(r.json()["token_ids"]) == 3
