"""Serving entry: build the app for the configured role and run it under uvicorn, with bounds on slow
clients: request headers (HeaderTimeoutProtocol), request bodies (the app's RequestGuard, 408) and
idle keep-alive connections."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from launcher.roles import build_app
from launcher.settings import ServeSettings
from prad.loading import LoadedModel

log = logging.getLogger(__name__)

_TIMEOUT_BODY = json.dumps({"detail": "request headers not received in time"}).encode()
REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                   b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol plus the header deadline uvicorn lacks: a request's headers must be
    complete within `header_timeout_s` of the connection opening or of the request's first byte, else
    the client gets a 408 and the connection is closed. Without it a client that sends half a header
    line (or nothing) holds its connection for ever (slowloris)."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # never inside another request's response
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


def header_timeout_protocol(timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """HeaderTimeoutProtocol with this deadline (uvicorn builds protocols from a class)."""
    class Bounded(HeaderTimeoutProtocol):
        header_timeout_s = timeout_s

    return Bounded


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    """uvicorn.Config / uvicorn.run options bounding slow or idle clients."""
    return {"http": header_timeout_protocol(settings.http_header_timeout_s),
            "timeout_keep_alive": max(1, math.ceil(settings.http_keep_alive_s))}


def configure_http(app: FastAPI, settings: ServeSettings) -> FastAPI:
    """The app-side bounds: how long a request body may take (RequestGuard answers 408 after)."""
    app.state.body_timeout_s = settings.http_body_timeout_s
    return app


def build_embedded_app(settings: ServeSettings, loaded: LoadedModel | None = None) -> FastAPI:
    """Kept for callers of the embedded mode; same as build_app (role=all, inproc by default)."""
    return configure_http(build_app(settings, loaded), settings)


def serve(settings: ServeSettings) -> None:
    app = configure_http(build_app(settings), settings)
    log.info("role=%s transport=%s serving HTTP on http://%s:%d", settings.role, settings.transport,
             settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
                **uvicorn_options(settings))
