"""gRPC sender on the prefill side: streams the handoff to decode and relays its tokens.

One aio channel on a private event-loop thread serves every request; `send()` returns at once and
events arrive on the request's sink. Failures become error events of the kind the gRPC status stands
for: decode unreachable (unavailable), deadline passed (timeout), too busy (queue_full), a broken call
(transport).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc

from kv_transfer.base import EventSink, KVSender, KVStream, TokenEvent
from kv_transfer.grpc_server import CHANNEL_OPTIONS, SECRET_HEADER, TLSFiles
from kv_transfer.handoff import KVHandoff
from kv_transfer.outcome import ErrorKind
from kv_transfer.protos import kv_handoff_pb2 as pb
from kv_transfer.protos import kv_handoff_pb2_grpc as pb_grpc
from kv_transfer.wire import (
    check_wire_format,
    chunks,
    encode_handoff,
    encode_layer,
    event_from_proto,
    header_to_proto,
    kv_checksum,
    kv_wire_num_bytes,
    wire_encoding,
)

_KIND_FOR = {grpc.StatusCode.UNAVAILABLE: ErrorKind.UNAVAILABLE, grpc.StatusCode.CANCELLED: ErrorKind.UNAVAILABLE,
             grpc.StatusCode.DEADLINE_EXCEEDED: ErrorKind.TIMEOUT,
             grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorKind.QUEUE_FULL}


class GrpcSender(KVSender):
    transport_name = "grpc"

    def __init__(self, address: str, secret: str | None = None, tls: TLSFiles | None = None,
                 timeout_s: float = 300.0, kv_wire_format: str = "native") -> None:
        """`kv_wire_format`: how the KV bytes travel (kv_transfer.wire: native, bfloat16 or int8)."""
        self.kv_wire_format = check_wire_format(kv_wire_format)
        self.address = address
        self.secret = secret
        self.tls = tls
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-client", daemon=True)
        self._thread.start()
        self._calls: dict[str, grpc.aio.StreamStreamCall] = {}
        self._channel = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=30)
        self._stub = pb_grpc.DecodeServiceStub(self._channel)

    async def _open(self) -> grpc.aio.Channel:
        options = CHANNEL_OPTIONS
        if self.tls and self.tls.ca:
            with open(self.tls.ca, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            return grpc.aio.secure_channel(self.address, creds, options=options)
        return grpc.aio.insecure_channel(self.address, options=options)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SECRET_HEADER, self.secret),) if self.secret else ()

    def send(self, handoff: KVHandoff, sink: EventSink) -> None:
        header, data = encode_handoff(handoff, self.kv_wire_format)  # CPU work stays on the caller's thread

        async def write(call: grpc.aio.StreamStreamCall) -> bool:
            return await self._write_all(call, header, data)

        asyncio.run_coroutine_threadsafe(self._run(handoff, write, sink), self._loop)

    def open_stream(self, handoff: KVHandoff, sink: EventSink) -> KVStream:
        stream = _GrpcKVStream(handoff, sink, self._loop, wire_encoding(handoff.kv.dtype, self.kv_wire_format))
        asyncio.run_coroutine_threadsafe(self._run(handoff, stream.write_all, sink, stream), self._loop)
        return stream

    async def _run(self, handoff: KVHandoff, write: Callable[[grpc.aio.StreamStreamCall], Awaitable[bool]],
                   sink: EventSink, stream: _GrpcKVStream | None = None) -> None:
        """One call: `write` sends the handoff (False when the call ended first), then decode's events are
        relayed to `sink`. A cancelled `stream` ends quietly: its request is retried, whole, by prefill."""
        request_id = handoff.request_id
        timeout = self.timeout_s if handoff.deadline_s is None else max(handoff.deadline_s - time.time(), 0.1)
        call = self._stub.Decode(metadata=self._metadata(), timeout=timeout)
        self._calls[request_id] = call
        finished = False
        try:
            if not await write(call):
                if stream is None or not stream.is_cancelled:
                    first = None if stream is None else stream.first_reply
                    sink(await _refusal(request_id, call, first) or await _status_error(request_id, call))
                return
            async for msg in _messages(call, None if stream is None else stream.first_reply):
                event = event_from_proto(msg)
                event.request_id = request_id
                finished = event.is_final
                sink(event)
                if finished:
                    return
            sink(TokenEvent.failure(request_id, ErrorKind.TRANSPORT, "decode closed the stream before the request "
                                    "finished"))
        except asyncio.CancelledError:
            pass  # aborted by us: the client is gone
        except grpc.aio.AioRpcError as e:
            # CANCELLED is ours when abort() removed the call first; otherwise decode went away
            # (e.g. shutting down) and the client must hear it rather than wait for its deadline.
            is_ours = e.code() == grpc.StatusCode.CANCELLED and self._calls.get(request_id) is not call
            if not finished and not is_ours:
                sink(_rpc_error(request_id, e.code(), e.details()))
        except Exception as e:  # anything else still ends the request, never leaves it waiting
            if not finished:
                sink(TokenEvent.failure(request_id, ErrorKind.TRANSPORT, f"gRPC transport failed: {e!r}"))
        finally:
            if self._calls.get(request_id) is call:  # a retry of the request may have its own call by now
                del self._calls[request_id]

    @staticmethod
    async def _write_all(call: grpc.aio.StreamStreamCall, header: bytes, data: bytes) -> bool:
        """Send header and KV chunks; False when the RPC ended first (refused, unreachable, ...)."""
        try:
            await call.write(pb.DecodeRequest(header=pb.HandoffHeader.FromString(header)))
            await call.initial_metadata()  # decode accepted the call (or refused it: no KV is sent then)
            if call.done():
                return False
            for piece in chunks(data):
                await call.write(pb.DecodeRequest(chunk=pb.KVChunk(data=piece)))
            await call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return False
        return True

    def wire_bytes(self, handoff: KVHandoff) -> int:
        return kv_wire_num_bytes(handoff.layout, wire_encoding(handoff.kv.dtype, self.kv_wire_format))

    def abort(self, request_id: str) -> None:
        def cancel() -> None:
            call = self._calls.pop(request_id, None)
            if call is not None:
                call.cancel()

        self._loop.call_soon_threadsafe(cancel)

    def is_ready(self) -> tuple[bool, str]:
        async def ping() -> pb.HealthReply:
            return await self._stub.Health(pb.HealthRequest(), metadata=self._metadata(), timeout=2.0)

        try:
            asyncio.run_coroutine_threadsafe(ping(), self._loop).result(timeout=3)
        except Exception as e:
            detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else repr(e)
            return False, f"decode at {self.address} unreachable: {detail}"
        return True, "ok"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._channel.close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


class _GrpcKVStream(KVStream):
    """A version-4 handoff on one gRPC call: the header at once, each layer's bytes as prefill computes it,
    the trailer at the end. Encoding and checksumming run on the client's event loop, off the engine."""

    def __init__(self, handoff: KVHandoff, sink: EventSink, loop: asyncio.AbstractEventLoop, encoding: str) -> None:
        super().__init__(handoff, sink)
        self.encoding = encoding
        self.is_cancelled = False
        self.first_reply: asyncio.Future[pb.TokenEvent | None] | None = None  # decode's first message
        self._loop = loop
        self._items: asyncio.Queue[int | pb.HandoffTrailer | None] = asyncio.Queue()  # layer, trailer, cancel

    def layer_ready(self, layer: int) -> None:
        self._loop.call_soon_threadsafe(self._items.put_nowait, layer)

    def finish(self, first_token_id: int) -> None:
        self.handoff.first_token_id = first_token_id
        self._loop.call_soon_threadsafe(self._items.put_nowait, pb.HandoffTrailer(first_token_id=first_token_id))

    def cancel(self, reason: str) -> None:
        self.is_cancelled = True
        self._loop.call_soon_threadsafe(self._items.put_nowait, None)

    async def write_all(self, call: grpc.aio.StreamStreamCall) -> bool:
        """Header, layers as they come, trailer; False when the call ended first or the stream was cancelled
        (a Cancel message then tells decode to drop what it has)."""
        layout = self.handoff.layout
        header = header_to_proto(self.handoff, kv_wire_num_bytes(layout, self.encoding), 0, self.encoding,
                                 streamed=True)
        try:
            await call.write(pb.DecodeRequest(header=header))
            await call.initial_metadata()  # accepted (or refused: no KV is sent then)
            # Decode answers nothing before the trailer unless it refuses the handoff: a reply that comes
            # first ends the stream. The read stays pending (cancelling it would cancel the call) and is
            # the first message _run relays.
            self.first_reply = asyncio.ensure_future(_first_message(call))
            self.first_reply.add_done_callback(_retrieve)  # a cancelled call's read ends in an error nobody awaits
            crc = 0
            while True:
                getter = asyncio.ensure_future(self._items.get())
                await asyncio.wait((getter, self.first_reply), return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return False
                item = getter.result()
                if item is None:
                    await call.write(pb.DecodeRequest(cancel=pb.Cancel(reason="prefill pass failed")))
                    call.cancel()
                    return False
                if isinstance(item, pb.HandoffTrailer):
                    item.checksum = crc
                    await call.write(pb.DecodeRequest(trailer=item))
                    await call.done_writing()
                    return True
                data = encode_layer(self.handoff.kv[item], self.encoding)
                crc = kv_checksum(data, crc)
                for piece in chunks(data):
                    await call.write(pb.DecodeRequest(chunk=pb.KVChunk(data=piece)))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return False


async def _first_message(call: grpc.aio.StreamStreamCall) -> pb.TokenEvent | None:
    """Decode's first message on `call`, None when the call ended without one. It reads through the call's
    one response iterator (read() would drop messages still buffered once the call is done), which
    _messages then continues."""
    async for msg in call:
        return cast(pb.TokenEvent, msg)
    return None


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _messages(call: grpc.aio.StreamStreamCall, first: asyncio.Future[pb.TokenEvent | None] | None = None) -> \
        AsyncIterator[pb.TokenEvent]:
    """Decode's messages on `call` until it ends; `first`: a _first_message read already under way."""
    if first is not None:
        msg = await first
        if msg is None:
            return
        yield msg
    async for reply in call:  # the same iterator _first_message started
        yield cast(pb.TokenEvent, reply)


async def _refusal(request_id: str, call: grpc.aio.StreamStreamCall,
                   first: asyncio.Future[pb.TokenEvent | None] | None = None) -> TokenEvent | None:
    """The error event decode answered before the KV was all sent (e.g. a handoff over its limits), if any."""
    try:
        async for msg in _messages(call, first):
            event = event_from_proto(msg)
            if event.is_final:
                event.request_id = request_id
                return event
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        pass
    return None


async def _status_error(request_id: str, call: grpc.aio.StreamStreamCall) -> TokenEvent:
    return _rpc_error(request_id, await call.code(), await call.details())


def _rpc_error(request_id: str, code: grpc.StatusCode, details: str | None) -> TokenEvent:
    return TokenEvent.failure(request_id, _KIND_FOR.get(code, ErrorKind.TRANSPORT),
                              f"decode service unavailable ({code.name}): {details}")
