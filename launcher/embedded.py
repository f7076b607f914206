"""Serving entry: build the app for the configured role and run it under uvicorn."""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from launcher.roles import build_app
from launcher.settings import ServeSettings
from prad.loading import LoadedModel

log = logging.getLogger(__name__)


def build_embedded_app(settings: ServeSettings, loaded: LoadedModel | None = None) -> FastAPI:
    """Kept for callers of the embedded mode; same as build_app (role=all, inproc by default)."""
    return build_app(settings, loaded)


def serve(settings: ServeSettings) -> None:
    app = build_app(settings)
    log.info("role=%s transport=%s serving HTTP on http://%s:%d", settings.role, settings.transport,
             settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None)
