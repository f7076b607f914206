"""In-process transport: the embedded default. Tensors are handed over as they are, no copy."""

from __future__ import annotations

from kv_transfer.base import DecodeBackend, EventSink, KVSender
from kv_transfer.handoff import KVHandoff


class InprocSender(KVSender):
    transport_name = "inproc"

    def __init__(self, backend: DecodeBackend) -> None:
        self.backend = backend

    def send(self, handoff: KVHandoff, sink: EventSink) -> None:
        self.backend.submit(handoff, sink)

    def abort(self, request_id: str) -> None:
        self.backend.abort(request_id)
