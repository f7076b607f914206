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

import grpc

from kv_transfer.base import EventSink, KVSender, TokenEvent
from kv_transfer.grpc_server import CHANNEL_OPTIONS, SECRET_HEADER, TLSFiles
from kv_transfer.handoff import KVHandoff
from kv_transfer.outcome import ErrorKind
from kv_transfer.protos import kv_handoff_pb2 as pb
from kv_transfer.protos import kv_handoff_pb2_grpc as pb_grpc
from kv_transfer.wire import (
    check_wire_format,
    chunks,
    encode_handoff,
    event_from_proto,
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
        timeout = self.timeout_s if handoff.deadline_s is None else max(handoff.deadline_s - time.time(), 0.1)
        asyncio.run_coroutine_threadsafe(self._run(handoff.request_id, header, data, timeout, sink), self._loop)

    async def _run(self, request_id: str, header: bytes, data: bytes, timeout: float, sink: EventSink) -> None:
        call = self._stub.Decode(metadata=self._metadata(), timeout=timeout)
        self._calls[request_id] = call
        finished = False
        try:
            if not await self._write_all(call, header, data):
                sink(await _refusal(request_id, call) or await _status_error(request_id, call))
                return
            async for msg in call:
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
            is_ours = e.code() == grpc.StatusCode.CANCELLED and request_id not in self._calls
            if not finished and not is_ours:
                sink(_rpc_error(request_id, e.code(), e.details()))
        except Exception as e:  # anything else still ends the request, never leaves it waiting
            if not finished:
                sink(TokenEvent.failure(request_id, ErrorKind.TRANSPORT, f"gRPC transport failed: {e!r}"))
        finally:
            self._calls.pop(request_id, None)

    @staticmethod
    async def _write_all(call: grpc.aio.StreamStreamCall, header: bytes, data: bytes) -> bool:
        """Send header and KV chunks; False when the RPC ended first (refused, unreachable, ...)."""
        try:
            await call.write(pb.DecodeRequest(header=pb.HandoffHeader.FromString(header)))
            await call.initial_metadata()  # decode accepted the call (or refused it: no KV is sent then)
            if call.done():
                return False
            for piece in chunks(data):
                await call.write(pb.DecodeRequest(chunk=pb.KVChunk(data=bytes(piece))))
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


async def _refusal(request_id: str, call: grpc.aio.StreamStreamCall) -> TokenEvent | None:
    """The error event decode answered before the KV was all sent (e.g. a handoff over its limits), if any."""
    try:
        async for msg in call:
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
