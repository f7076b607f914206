"""HTTP face of a decode-only process: /healthz, /readyz and /metrics (requests arrive by transport)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from serving.metrics import Metrics


def create_decode_app(metrics: Metrics, stats: Callable[[], dict[str, int]], readiness: Callable[[], dict[str, str]],
                      on_start: Callable[[], None], on_stop: Callable[[], None],
                      liveness: Callable[[], dict[str, str]] = dict) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        on_start()
        yield
        on_stop()

    app = FastAPI(title="PrAd Serve decode", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        problems = liveness()
        if problems:
            return JSONResponse({"status": "failing", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        problems = readiness()
        return JSONResponse({"ready": not problems, "not_ready": problems, **stats()},
                            status_code=200 if not problems else 503)

    @app.get("/metrics")
    async def render_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
