"""gRPC receiver on the decode side: one bidirectional stream per request, KV chunks in, tokens out.

A version-4 (streamed) handoff's KV arrives while prefill is still computing it; the request is admitted
only once its trailer has arrived and the CRC-32C of everything received matches the trailer's.

The servicer only converts protobuf <-> dataclasses and delegates to a DecodeBackend. A client that
cancels (or whose deadline passes) cancels the handler, which aborts the request in decode. The KV a
header announces is checked against decode's own limits before a byte of it is read: memory per call
is bounded by decode's layout and max_seq_len, never by what a client claims.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from kv_transfer.base import DecodeBackend, TokenEvent
from kv_transfer.handoff import HandoffError
from kv_transfer.outcome import EngineUnavailableError, QueueFullError
from kv_transfer.protos import kv_handoff_pb2 as pb
from kv_transfer.protos import kv_handoff_pb2_grpc as pb_grpc
from kv_transfer.wire import (
    STREAMED_FORMAT_VERSION,
    KVLimits,
    KVReceived,
    check_header,
    event_to_proto,
    handoff_from_proto,
    parse_header,
)

log = logging.getLogger(__name__)
SECRET_HEADER = "x-prad-secret"
MAX_MESSAGE_BYTES = 8 << 20
# Both ends: messages up to 8 MiB (KV chunks are 4 MiB; larger messages are refused by gRPC before
# they reach a handler) and a 16 MiB HTTP/2 stream window, so a KV handoff is not paced by window
# updates from a 64 KiB start.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.http2.lookahead_bytes", 16 << 20)]


@dataclass(frozen=True)
class TLSFiles:
    cert: str | None = None  # server certificate (PEM)
    key: str | None = None  # server private key (PEM)
    ca: str | None = None  # CA bundle the client trusts (PEM)


class SecretInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the shared secret header before any handler runs."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()

        async def deny_unary(request: object, context: grpc.aio.ServicerContext) -> None:
            context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            context.set_details(f"bad or missing {SECRET_HEADER}")

        async def deny_stream(request_iterator: object, context: grpc.aio.ServicerContext) -> None:
            context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            context.set_details(f"bad or missing {SECRET_HEADER}")

        self._deny_unary: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(deny_unary)
        self._deny_stream: grpc.RpcMethodHandler[Any, Any] = grpc.stream_stream_rpc_method_handler(deny_stream)

    async def intercept_service(self, continuation, handler_call_details):
        given = dict(handler_call_details.invocation_metadata or ()).get(SECRET_HEADER, "")
        if hmac.compare_digest(str(given).encode(), self.secret):
            return await continuation(handler_call_details)
        return self._deny_stream if handler_call_details.method.endswith("/Decode") else self._deny_unary


class DecodeServicer(pb_grpc.DecodeServiceServicer):
    def __init__(self, backend: DecodeBackend, health: Callable[[], pb.HealthReply], secret: str | None,
                 limits: KVLimits | None = None) -> None:
        self.backend = backend
        self.health = health
        self.secret = secret  # enforced by SecretInterceptor, which GrpcDecodeServer installs
        self.limits = limits  # decode's layout and max length; None: only the header's own consistency

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthReply:
        return self.health()

    async def Decode(self, request_iterator: AsyncIterator[pb.DecodeRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TokenEvent]:
        await context.send_initial_metadata(())  # tells the client the call was accepted: send the KV
        requests = request_iterator.__aiter__()
        try:
            header, data, crc = await _read_handoff(requests, self.limits)
        except HandoffError as e:
            yield event_to_proto(TokenEvent.refused("", e), 0)
            return
        if header is None:
            return  # cancelled before the KV arrived: nothing was admitted
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def sink(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        refusal = await loop.run_in_executor(None, self._submit, header, data, crc, sink)
        if refusal is not None:
            yield refusal
            return
        watcher = asyncio.ensure_future(_watch_cancel(requests, lambda: self.backend.abort(header.request_id)))
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = event.is_final
                yield event_to_proto(event, event.first_token_index)
        finally:
            watcher.cancel()
            if not finished:
                self.backend.abort(header.request_id)

    def _submit(self, header: pb.HandoffHeader, data: bytearray, crc: int, sink: Callable[[TokenEvent], None]) -> \
            pb.TokenEvent | None:
        """Admit the handoff; an error event when refused (nothing half-admitted)."""
        try:
            self.backend.submit(handoff_from_proto(header, data, crc), sink)
        except (ValueError, QueueFullError, EngineUnavailableError) as e:  # HandoffError is a ValueError
            return event_to_proto(TokenEvent.refused(header.request_id, e), 0)
        return None


async def _read_handoff(requests: AsyncIterator[pb.DecodeRequest], limits: KVLimits | None) -> \
        tuple[pb.HandoffHeader | None, bytearray, int]:
    """The header and KV bytes of one call; HandoffError for a header outside `limits` (before any KV
    is read) or a stream that does not deliver exactly the bytes it announced."""
    try:
        first = await requests.__anext__()
    except StopAsyncIteration:
        return None, bytearray(), 0
    if first.WhichOneof("kind") != "header":
        raise HandoffError("the stream must start with a handoff header")
    header = parse_header(first.header.SerializeToString())
    check_header(header, limits)
    received = KVReceived(header)
    while not received.is_complete:
        try:
            msg = await requests.__anext__()
        except StopAsyncIteration:
            raise HandoffError(f"stream ended after {len(received.data)} of {header.num_kv_bytes} KV bytes") \
                from None
        kind = msg.WhichOneof("kind")
        if kind == "cancel":
            return None, received.data, 0
        if kind != "chunk":
            raise HandoffError(f"unexpected {kind!r} message while receiving KV")
        received.add(msg.chunk.data)
    if header.format_version == STREAMED_FORMAT_VERSION:  # the first token and checksum come last
        try:
            msg = await requests.__anext__()
        except StopAsyncIteration:
            raise HandoffError("stream ended after the KV, before its trailer") from None
        kind = msg.WhichOneof("kind")
        if kind == "cancel":
            return None, received.data, 0
        if kind != "trailer":
            raise HandoffError(f"expected the handoff trailer after the KV, got {kind!r}")
        header = received.finish(msg.trailer)
    return header, received.data, received.crc


async def _watch_cancel(requests: AsyncIterator[pb.DecodeRequest], abort: Callable[[], None]) -> None:
    """A Cancel message from the client aborts the request; the end of its writes does not."""
    async for msg in requests:
        if msg.WhichOneof("kind") == "cancel":
            abort()
            return


class GrpcDecodeServer:
    """Runs the aio gRPC server on its own event-loop thread."""

    def __init__(self, servicer: DecodeServicer, host: str, port: int, tls: TLSFiles | None = None) -> None:
        self.servicer = servicer
        self.address = f"{host}:{port}"
        self.tls = tls
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-server", daemon=True)
        self._server: grpc.aio.Server | None = None
        self.port = port

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)

    async def _start(self) -> None:
        interceptors = [SecretInterceptor(self.servicer.secret)] if self.servicer.secret else []
        self._server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=interceptors)
        pb_grpc.add_DecodeServiceServicer_to_server(self.servicer, self._server)
        if self.tls is not None:
            if not (self.tls.cert and self.tls.key):
                raise ValueError("gRPC TLS server needs a certificate and its private key")
            with open(self.tls.key, "rb") as k, open(self.tls.cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            self.port = self._server.add_secure_port(self.address, creds)
        else:
            self.port = self._server.add_insecure_port(self.address)
        await self._server.start()
        log.info("gRPC decode server on %s (port %d)", self.address, self.port)

    def stop(self, grace_s: float = 2.0) -> None:
        """Refuse new calls at once; calls in flight (requests being decoded) get `grace_s` to finish."""
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace=grace_s), self._loop).result(timeout=grace_s + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
