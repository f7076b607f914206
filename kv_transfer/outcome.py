"""How a request can end, in the transport contract's own terms (no torch, no HTTP).

The last event of every request carries a FinishReason; a failed one also carries an ErrorKind and a
message. Engines and transports refuse work by raising the errors below, and `error_kind` classifies
any exception into a kind. Only the front door turns kinds into HTTP statuses and error bodies
(prefill_service/http_errors.py), so nothing below it knows about HTTP.
"""

from __future__ import annotations

import enum


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # the client went away, or the request's deadline passed
    ERROR = "error"  # failed: the event's error_kind and error say how and why


class ErrorKind(enum.StrEnum):
    """Why a request failed; also the `kind` label of prad:request_errors_total."""

    INVALID = "invalid"  # malformed or out-of-range request
    UNKNOWN_TASK = "unknown_task"  # no adapter serves this task id
    UNKNOWN_VERSION = "unknown_version"  # the task has no such adapter version (a pinned request)
    FORBIDDEN = "forbidden"  # allowed to the operator only (e.g. pinning a version)
    TOO_LONG = "too_long"  # prompt + output exceed the context limit
    QUEUE_FULL = "queue_full"  # a bounded queue is full: retry later
    KV_REJECTED = "kv_rejected"  # decode refused the KV handoff (fingerprint, layout, size, checksum)
    UNAVAILABLE = "unavailable"  # a component is down, stopped or unreachable
    TIMEOUT = "timeout"  # no answer within the request's deadline
    TRANSPORT = "transport"  # the link to decode broke mid-request (a stream closed early, a failed call)
    INTERNAL = "internal"  # a step failed, or a bug: this request alone is lost


class QueueFullError(RuntimeError):
    """A bounded queue is full (ErrorKind.QUEUE_FULL)."""


class EngineUnavailableError(RuntimeError):
    """An engine's loop has stopped (ErrorKind.UNAVAILABLE)."""


class HandoffError(ValueError):
    """A handoff the receiver refuses: fingerprint, layout, size or checksum mismatch (ErrorKind.KV_REJECTED)."""


def error_kind(e: BaseException) -> ErrorKind:
    """The kind of failure an exception raised by an engine or a transport stands for. A ValueError is
    the request's own fault; anything unrecognised is a transport that could not deliver."""
    if isinstance(e, QueueFullError):
        return ErrorKind.QUEUE_FULL
    if isinstance(e, HandoffError):
        return ErrorKind.KV_REJECTED
    if isinstance(e, ValueError):
        return ErrorKind.INVALID
    return ErrorKind.UNAVAILABLE


def refusal_message(e: BaseException) -> str:
    """What a client is told when decode refuses or cannot take its handoff."""
    kind = error_kind(e)
    if kind is ErrorKind.QUEUE_FULL:
        return f"server busy: {e}; retry later"
    if kind is ErrorKind.KV_REJECTED:
        return f"decode refused the KV handoff: {e}"
    if kind is ErrorKind.UNAVAILABLE:
        return f"decode service unavailable: {e}"
    return str(e)


def parse_finish_reason(value: str) -> FinishReason | None:
    """A finish reason read off the wire: '' while running; one this build does not know is an error."""
    if not value:
        return None
    try:
        return FinishReason(value)
    except ValueError:
        return FinishReason.ERROR


def parse_error_kind(value: str) -> ErrorKind:
    """An error kind read off the wire; one this build does not know (a newer peer's) is INTERNAL."""
    try:
        return ErrorKind(value)
    except ValueError:
        return ErrorKind.INTERNAL
