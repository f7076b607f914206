"""HTTP routes of the front door (FastAPI). Handlers translate and delegate to PrefillService."""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from kv_transfer.base import TokenEvent
from prefill_service.api_models import GenerateRequest, GenerateResponse, Usage
from prefill_service.openai_api import build_router, openai_error
from prefill_service.service import PrefillService, PreparedRequest, ServiceError, collect

MAX_REQUEST_BYTES = 1 << 20


def get_service(request: Request) -> PrefillService:
    return request.app.state.service


ServiceDep = Annotated[PrefillService, Depends(get_service)]


KEYED_PATHS = ("/v1/", "/generate", "/tasks")  # what --api-key protects


def create_app(service: PrefillService, on_start: Callable[[], None] | None = None,
               on_stop: Callable[[], None] | None = None,
               readiness: Callable[[], dict[str, str]] | None = None, api_key: str | None = None,
               admin_router: APIRouter | None = None, max_admin_body_bytes: int = MAX_REQUEST_BYTES, *,
               liveness: Callable[[], dict[str, str]] | None = None) -> FastAPI:
    """readiness() returns {component: problem} for what is not ready (empty = ready); liveness()
    the same for what is broken beyond recovery in this process (a dead or stalled engine): /healthz
    answers 503 then, so the orchestrator restarts it.
    api_key, when set, is required as `Authorization: Bearer <key>` on the serving API: /generate,
    /tasks and /v1/* (probes and /metrics stay open; /admin has its own token)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if on_start is not None:
            on_start()
        yield
        if on_stop is not None:
            on_stop()

    app = FastAPI(title="PrAd Serve", lifespan=lifespan)
    app.state.service = service
    app.state.readiness = readiness or (lambda: {})
    app.state.liveness = liveness or (lambda: {})

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            return openai_error(exc.status, exc.message)
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        request.app.state.service.count_error("invalid", 422)
        errors = exc.errors()
        if request.url.path.startswith("/v1/"):
            first = errors[0] if errors else {}
            param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
            return openai_error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors), param)
        return JSONResponse({"detail": [{k: e[k] for k in ("loc", "msg", "type")} for e in errors]}, status_code=422)

    app.add_middleware(RequestGuard, api_key=api_key, max_admin_body_bytes=max_admin_body_bytes)

    @app.get("/metrics")
    async def metrics(service: ServiceDep) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        return health_response(request.app.state.liveness())

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        problems = request.app.state.readiness()
        status = 200 if not problems else 503
        return JSONResponse({"ready": not problems, "not_ready": problems}, status_code=status)

    @app.get("/tasks")
    async def tasks(service: ServiceDep) -> dict[str, Any]:
        return {"tasks": [{"task": "base", "adapter_version": "base", "variant": None}, *_task_rows(service)]}

    @app.post("/generate", response_model=None)
    async def generate(body: GenerateRequest, service: ServiceDep) -> GenerateResponse | StreamingResponse:
        prepared = await run_in_threadpool(service.prepare, body)  # may load an adapter from the store
        events = service.submit(prepared)  # 429 here, before any response starts
        if body.stream:
            return StreamingResponse(_sse(prepared, events), media_type="text/event-stream")
        return await _collect(prepared, events)

    app.include_router(build_router(get_service))
    if admin_router is not None:
        app.include_router(admin_router)
    return app


def health_response(problems: dict[str, str]) -> JSONResponse:
    """/healthz: 200 while the process works, 503 naming what broke (then a restart is the cure)."""
    if problems:
        return JSONResponse({"status": "failing", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ok"})


class RequestGuard:
    """Rejects a request before it reaches a route: a body over the size limit (413) or, with an API
    key set, a serving-API call without it (401).

    Plain ASGI on purpose: Starlette's `@app.middleware("http")` (BaseHTTPMiddleware) would pipe every
    chunk of every streamed response through a memory stream and an extra task; with 64 concurrent
    streams that was most of the server's per-token Python cost (cProfile, bench/multitask.py).
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_admin_body_bytes: int) -> None:
        self.app, self.api_key, self.max_admin_body_bytes = app, api_key, max_admin_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            rejection = self.rejection(Request(scope))
            if rejection is not None:
                await rejection(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def rejection(self, request: Request) -> Response | None:
        path = request.url.path
        length = request.headers.get("content-length")
        limit = self.max_admin_body_bytes if path.startswith("/admin/") else MAX_REQUEST_BYTES
        if length is not None and (not length.isdigit() or int(length) > limit):
            return JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)
        if self.api_key and path.startswith(KEYED_PATHS) and not _has_key(request, self.api_key):
            message = "missing or invalid API key (Authorization: Bearer <key>)"
            if path.startswith("/v1/"):
                return openai_error(401, message)
            return JSONResponse({"detail": message}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return None


def _has_key(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key.encode())


def _task_rows(service: PrefillService) -> list[dict[str, Any]]:
    rows = []
    for task in service.adapters.tasks():
        try:
            adapter = service.adapters.get(task)
            rows.append({"task": task, "adapter_version": adapter.version, "variant": adapter.config.variant,
                         "rank": adapter.config.rank})
        except Exception as e:  # listed, with why it cannot be served
            rows.append({"task": task, "adapter_version": None, "variant": None, "error": str(e)})
    return rows


async def _collect(req: PreparedRequest, events: AsyncIterator[TokenEvent]) -> GenerateResponse:
    result = await collect(events)
    return GenerateResponse(request_id=req.request_id, task=req.task, adapter_version=req.adapter_version,
                            text=result.text, token_ids=result.token_ids, finish_reason=result.finish_reason or "abort",
                            usage=Usage(prompt_tokens=len(req.prompt_token_ids),
                                        completion_tokens=len(result.token_ids)))


async def _sse(req: PreparedRequest, events: AsyncIterator[TokenEvent]) -> AsyncIterator[str]:
    """One `data:` event per token chunk; the last carries finish_reason, usage and adapter_version."""
    num_tokens = 0
    try:
        async for event in events:
            num_tokens += len(event.token_ids)
            payload: dict[str, Any] = {"request_id": req.request_id, "text": event.text,
                                       "token_ids": event.token_ids}
            if event.is_final:
                payload.update(finish_reason=event.finish_reason, task=req.task,
                               adapter_version=req.adapter_version,
                               usage={"prompt_tokens": len(req.prompt_token_ids), "completion_tokens": num_tokens})
                if event.error:
                    payload["error"] = {"message": event.error, "status": event.error_status}
            yield f"data: {json.dumps(payload)}\n\n"
    except ServiceError as e:
        yield f"data: {json.dumps({'request_id': req.request_id, 'error': {'message': e.message, 'status': e.status}, 'finish_reason': 'error'})}\n\n"  # noqa: E501
