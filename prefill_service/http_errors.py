"""The one place where failures become HTTP: each ErrorKind's status, and the two error body shapes
(`{"detail": ...}` for our routes, OpenAI's `{"error": {...}}` under /v1/). Nothing below the front
door's HTTP layer knows a status code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from kv_transfer.outcome import ErrorKind

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up before the answer (never sent)

HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID: 400,
    ErrorKind.UNKNOWN_TASK: 404,
    ErrorKind.UNKNOWN_VERSION: 404,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.TOO_LONG: 413,
    ErrorKind.QUEUE_FULL: 429,
    ErrorKind.INTERNAL: 500,
    ErrorKind.KV_REJECTED: 502,
    ErrorKind.TRANSPORT: 502,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.TIMEOUT: 504,
}

OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                      404: "not_found_error", 408: "invalid_request_error", 409: "invalid_request_error",
                      413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


def http_status(kind: ErrorKind | None) -> int:
    """The status a failure of this kind is answered with (a failure without a kind is internal)."""
    return HTTP_STATUS[kind or ErrorKind.INTERNAL]


def stream_error(kind: ErrorKind | None, message: str) -> dict[str, Any]:
    """The `error` object of a failed stream's last SSE event (the response status is already 200)."""
    return {"message": message, "kind": str(kind or ErrorKind.INTERNAL), "status": http_status(kind)}


def openai_error(status: int, message: str, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape; 422 (our validation status) is answered as OpenAI's 400."""
    status = 400 if status == 422 else status
    body = {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(path: str, status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error body: OpenAI's shape under /v1/, {"detail": message} elsewhere."""
    if path.startswith("/v1/"):
        return openai_error(status, message, headers=headers)
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def openai_stream_error(kind: ErrorKind | None, message: str) -> dict[str, Any]:
    """The last SSE event of a failed /v1 stream, in OpenAI's error shape."""
    status = http_status(kind)
    return {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "server_error"), "param": None,
                      "code": status}}
