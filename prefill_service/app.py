"""HTTP routes of the front door (FastAPI). Handlers translate and delegate to PrefillService."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters_store.base import UnknownTaskError
from kv_transfer.base import TokenEvent
from kv_transfer.outcome import ErrorKind, FinishReason
from prefill_service.admin_api import AdminRouter, admin_token_problem
from prefill_service.api_models import (
    SSE,
    GenerateRequest,
    GenerateResponse,
    TaskList,
    Usage,
    error_responses,
)
from prefill_service.deps import RouteHintsDep, ServiceDep
from prefill_service.engine import PrefillRequest
from prefill_service.http_errors import CLIENT_CLOSED_REQUEST, error_response, http_status, openai_error, stream_error
from prefill_service.openai_api import build_router
from prefill_service.service import (
    PrefillService,
    ServiceError,
    collect_unless,
    wait_disconnect,
)

MAX_REQUEST_BYTES = 1 << 20
DEFAULT_BODY_TIMEOUT_S = 60.0  # a request body must arrive within this long of its headers
CLOSE = {"Connection": "close"}  # a refused body is not drained: the connection goes
GENERATE_ERRORS = (400, 401, 403, 404, 408, 413, 422, 429, 502, 503, 504)


KEYED_PATHS = ("/v1/", "/generate", "/tasks")  # what --api-key protects


def create_app(service: PrefillService, on_start: Callable[[], None] | None = None,
               on_stop: Callable[[], None] | None = None,
               readiness: Callable[[], dict[str, str]] | None = None, api_key: str | None = None,
               admin_router: APIRouter | None = None, max_admin_body_bytes: int = MAX_REQUEST_BYTES, *,
               liveness: Callable[[], dict[str, str]] | None = None,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> FastAPI:
    """readiness() returns {component: problem} for what is not ready (empty = ready); liveness()
    the same for what is broken beyond recovery in this process (a dead or stalled engine): /healthz
    answers 503 then, so the orchestrator restarts it.
    api_key, when set, is required as `Authorization: Bearer <key>` on the serving API: /generate,
    /tasks and /v1/* (probes and /metrics stay open; /admin has its own token).
    body_timeout_s bounds how long a request body may take to arrive (408 after); it is read from
    app.state per request, so a launcher may set app.state.body_timeout_s after building the app."""

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
    app.state.body_timeout_s = body_timeout_s
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request.url.path, http_status(exc.kind), exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        return error_response(request.url.path, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        request.app.state.service.count_error("invalid", ErrorKind.INVALID)
        errors = exc.errors()
        if request.url.path.startswith("/v1/"):
            first = errors[0] if errors else {}
            param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
            return openai_error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors), param)
        return JSONResponse({"detail": [{k: e[k] for k in ("loc", "msg", "type")} for e in errors]}, status_code=422)

    admin_token = admin_router.token if isinstance(admin_router, AdminRouter) else None
    app.state.admin_token = admin_token
    app.add_middleware(RequestGuard, api_key=api_key, max_admin_body_bytes=max_admin_body_bytes,
                       admin_token=admin_token)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics(service: ServiceDep) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", responses={503: {"description": "an engine died or stalled: restart the process "
                                                            "(body: status, problems)"}})
    async def healthz(request: Request) -> JSONResponse:
        return health_response(request.app.state.liveness())

    @app.get("/readyz", responses={503: {"description": "not ready to take traffic (body: ready, not_ready)"}})
    async def readyz(request: Request) -> JSONResponse:
        problems = request.app.state.readiness()
        status = 200 if not problems else 503
        return JSONResponse({"ready": not problems, "not_ready": problems}, status_code=status)

    @app.get("/tasks", response_model=None, responses={200: {"model": TaskList}, **error_responses(401)})
    async def tasks(service: ServiceDep) -> dict[str, Any]:
        rows = await run_in_threadpool(_task_rows, service)  # may read adapter configs from the store
        return {"tasks": [{"task": "base", "adapter_version": "base", "variant": None}, *rows]}

    @app.post("/generate", response_model=None,
              responses={200: {"model": GenerateResponse, "content": SSE}, **error_responses(*GENERATE_ERRORS)})
    async def generate(body: GenerateRequest, request: Request, service: ServiceDep,
                       hints: RouteHintsDep) -> Response | GenerateResponse:
        service.check_admission(body.task)  # cheap 429/503 before the adapter and the tokenizer
        # may load an adapter from the store
        prepared = await run_in_threadpool(service.prepare, body, hints.routing_key, hints.may_pin)
        events = service.submit(prepared)  # 429 here, before any response starts
        if body.stream:
            return StreamingResponse(_sse(prepared, events), media_type="text/event-stream")
        return await _collect(prepared, events, request)

    app.include_router(build_router())
    if admin_router is not None:
        app.include_router(admin_router)
    return app


def health_response(problems: dict[str, str]) -> JSONResponse:
    """/healthz: 200 while the process works, 503 naming what broke (then a restart is the cure)."""
    if problems:
        return JSONResponse({"status": "failing", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ok"})


class BodyRejected(HTTPException):
    """Raised from the guarded `receive` when the body is too big or too slow; the route's body parsing
    re-raises HTTPExceptions, so the app's handler answers it (in the route's error shape)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message, headers=CLOSE)


class RequestGuard:
    """Checks every request before a route sees it: credentials (401 without an API key on the serving
    API; 401/403 without the right admin token on /admin) before any body is read, a declared body
    size over the limit (413), and, while the body arrives, the bytes actually received (413 as soon
    as they cross the limit, chunked bodies included) and the time taken (408 past the body timeout).

    Plain ASGI on purpose: Starlette's `@app.middleware("http")` (BaseHTTPMiddleware) would pipe every
    chunk of every streamed response through a memory stream and an extra task; with 64 concurrent
    streams that was most of the server's per-token Python cost (cProfile, bench/multitask.py).
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_admin_body_bytes: int,
                 admin_token: str | None = None) -> None:
        self.app, self.api_key, self.max_admin_body_bytes = app, api_key, max_admin_body_bytes
        self.admin_token = admin_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = Headers(scope=scope)
        limit = self.max_admin_body_bytes if _is_admin(path) else MAX_REQUEST_BYTES
        rejection = self.rejection(path, headers, limit)
        if rejection is not None:
            await rejection(scope, receive, send)
            return
        timeout_s: float = getattr(scope["app"].state, "body_timeout_s", DEFAULT_BODY_TIMEOUT_S)
        await self.app(scope, GuardedBody(receive, limit, timeout_s), send)

    def rejection(self, path: str, headers: Headers, limit: int) -> Response | None:
        if self.admin_token and _is_admin(path):
            problem = admin_token_problem(headers.get("authorization"), self.admin_token)
            if problem is not None:
                status, message = problem
                return JSONResponse({"detail": message}, status_code=status,
                                    headers={**CLOSE, **({"WWW-Authenticate": "Bearer"} if status == 401 else {})})
        if self.api_key and path.startswith(KEYED_PATHS) and not _has_key(headers, self.api_key):
            message = "missing or invalid API key (Authorization: Bearer <key>)"
            return error_response(path, 401, message, {**CLOSE, "WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error_response(path, 413, f"request body over {limit} bytes", CLOSE)
        return None


class GuardedBody:
    """An ASGI `receive` that counts body bytes as they arrive and bounds the time they take: 413 the
    moment the count crosses `limit`, 408 when the body is not complete `timeout_s` after the
    headers; nothing more is read after either. Messages after the body (disconnect) pass through."""

    def __init__(self, receive: Receive, limit: int, timeout_s: float) -> None:
        self.receive, self.limit, self.timeout_s = receive, limit, timeout_s
        self.deadline_s = asyncio.get_running_loop().time() + timeout_s
        self.num_bytes = 0
        self.is_complete = False

    async def __call__(self) -> Message:
        if self.is_complete:
            return await self.receive()
        try:
            async with asyncio.timeout_at(self.deadline_s):
                message = await self.receive()
        except TimeoutError:
            raise BodyRejected(408, f"request body not received within {self.timeout_s:g}s") from None
        if message["type"] == "http.request":
            self.num_bytes += len(message.get("body", b""))
            if self.num_bytes > self.limit:
                raise BodyRejected(413, f"request body over {self.limit} bytes")
            self.is_complete = not message.get("more_body", False)
        else:
            self.is_complete = True
        return message


def _is_admin(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


def _has_key(headers: Headers, api_key: str) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key.encode())


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, less the 422 it adds to every route with a body: /v1/* answers validation
    errors with OpenAI's 400 (listed by each route), never 422."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                if path.startswith("/v1/"):
                    operation["responses"].pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema


def _task_rows(service: PrefillService) -> list[dict[str, Any]]:
    """One row per task from its metadata (no weights are loaded, no cached adapter is evicted)."""
    rows: list[dict[str, Any]] = []
    for task in service.adapters.tasks():
        try:
            info = service.adapters.describe(task)
        except UnknownTaskError:  # removed while listing
            continue
        if info.error is not None:  # listed, with why it cannot be served
            rows.append({"task": task, "adapter_version": None, "variant": None, "error": info.error})
        else:
            rows.append({"task": task, "adapter_version": info.version, "variant": info.variant, "rank": info.rank})
    return rows


async def _collect(req: PrefillRequest, events: AsyncIterator[TokenEvent],
                   request: Request) -> Response | GenerateResponse:
    """The whole output as one JSON body; a client that hangs up first aborts the request."""
    result = await collect_unless(events, wait_disconnect(request.receive))
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return GenerateResponse(request_id=req.request_id, task=req.task, adapter_version=req.adapter_version,
                            text=result.text, token_ids=result.token_ids, finish_reason=result.finish_reason or "abort",
                            usage=Usage(prompt_tokens=len(req.prompt_token_ids),
                                        completion_tokens=len(result.token_ids)))


async def _sse(req: PrefillRequest, events: AsyncIterator[TokenEvent]) -> AsyncIterator[str]:
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
                if event.finish_reason is FinishReason.ERROR:
                    payload["error"] = stream_error(event.error_kind, event.error or "request failed")
            yield f"data: {json.dumps(payload)}\n\n"
    except ServiceError as e:
        payload = {"request_id": req.request_id, "error": stream_error(e.kind, e.message), "finish_reason": "error"}
        yield f"data: {json.dumps(payload)}\n\n"
