"""The prefill engine: a thread running schedule -> execute -> update, handing KV to decode."""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from kv_transfer.base import EventSink, KVSender, TokenEvent
from kv_transfer.handoff import HandoffError, KVHandoff, KVLayout
from prad.adapters import Adapter
from prad.engine_loop import EngineLoop
from prad.errors import QueueFullError
from prad.loading import LoadedModel
from prad.metrics import Metrics
from prad.sampling import SamplingParams, sample_one
from prefill_service.runner import ChunkInput, PrefillRunner
from prefill_service.scheduler import PrefillBatch, PrefillRequest, PrefillScheduler

log = logging.getLogger(__name__)


@dataclass
class PrefillConfig:
    max_prefill_tokens: int = 2048  # prompt tokens per forward pass (longer prompts are chunked)
    max_batch_size: int = 64  # prompts per forward pass
    max_waiting: int = 256  # queued requests; beyond that, 429


@dataclass
class _Job:
    """Engine-side state of one request."""

    adapter: Adapter | None  # pinned at admission: hot swaps never change a running request
    adapter_version: str
    sampling: SamplingParams
    sink: EventSink
    deadline_s: float | None
    arrived_s: float
    past_kv: object = None  # torch.Tensor of earlier chunks, when chunked
    started_s: float | None = None  # when its first chunk was scheduled


class PrefillEngine(EngineLoop):
    thread_name = "prefill-engine"

    def __init__(self, loaded: LoadedModel, sender: KVSender, config: PrefillConfig,
                 compute_lock: AbstractContextManager[object] | None = None, metrics: Metrics | None = None) -> None:
        self.loaded = loaded
        self.metrics = metrics or Metrics()
        self.sender = sender
        self.config = config
        self.runner = PrefillRunner(loaded.model)
        self.scheduler = PrefillScheduler(config.max_prefill_tokens, config.max_batch_size, config.max_waiting)
        self.compute_lock = compute_lock or nullcontext()
        super().__init__()
        self._by_id: dict[str, PrefillRequest] = {}
        self.num_steps = 0

    def submit(self, request_id: str, task: str, prompt_token_ids: list[int], adapter: Adapter | None,
               adapter_version: str, sampling: SamplingParams, sink: EventSink,
               deadline_s: float | None = None) -> None:
        """Queue a request; raises QueueFullError when the queue is at its bound."""
        job = _Job(adapter, adapter_version, sampling, sink, deadline_s, time.monotonic())
        request = PrefillRequest(request_id, task, list(prompt_token_ids), payload=job)
        with self._lock:
            self.scheduler.add(request)
            self._by_id[request_id] = request
            self.metrics.num_waiting.labels("prefill").set(self.scheduler.num_waiting)
            self._lock.notify_all()

    def abort(self, request_id: str) -> None:
        """Abort wherever the request is: queued here, being handed over, or already with decode."""
        with self._lock:
            request = self._by_id.get(request_id)
            if request is not None:
                request.is_abort_requested = True  # the scheduler drops it, or _hand_off forwards it
                self._lock.notify_all()
                return
        self.sender.abort(request_id)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"num_waiting": self.scheduler.num_waiting, "num_steps": self.num_steps}

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self.scheduler.waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                batch = self.scheduler.schedule()
                for request in batch.aborted:
                    self._by_id.pop(request.request_id, None)
                    request.payload.sink(TokenEvent(request.request_id, [], "", finish_reason="abort",
                                                    num_prompt_tokens=len(request.prompt_token_ids)))
            if not batch.chunks:
                continue
            try:
                outputs = self._execute(batch)
            except Exception as e:  # a failed step fails its requests, never the engine
                log.exception("prefill step failed")
                self._fail(batch, f"prefill failed: {e}")
                continue
            self._update(batch, outputs)

    def _execute(self, batch: PrefillBatch):
        now = time.monotonic()
        for chunk in batch.chunks:
            job: _Job = chunk.request.payload
            if job.started_s is None:
                job.started_s = now
                self.metrics.queue_s.labels(self.metrics.task(chunk.request.task)).observe(now - job.arrived_s)
        inputs = [ChunkInput(c.request.prompt_token_ids[c.start:c.end], c.start, c.request.payload.adapter,
                             c.request.payload.past_kv) for c in batch.chunks]
        with self.compute_lock:
            outputs = self.runner.run(inputs)
        self.num_steps += 1
        return outputs

    def _update(self, batch: PrefillBatch, outputs) -> None:
        with self._lock:
            self.scheduler.update(batch)  # completed prompts stay in _by_id until handed off
            for chunk, out in zip(batch.chunks, outputs, strict=True):
                chunk.request.payload.past_kv = None if chunk.is_last else out.kv
            self.metrics.num_waiting.labels("prefill").set(self.scheduler.num_waiting)
        for chunk, out in zip(batch.chunks, outputs, strict=True):
            if chunk.is_last:
                self._hand_off(chunk.request, out)

    def _hand_off(self, request: PrefillRequest, out) -> None:
        try:
            self._send(request, out)
        finally:
            # An abort that arrived while the KV was being handed over is forwarded now that decode
            # knows the request; one arriving after this point goes straight to the sender.
            with self._lock:
                self._by_id.pop(request.request_id, None)
                is_aborted = request.is_abort_requested
            if is_aborted:
                self.sender.abort(request.request_id)

    def _send(self, request: PrefillRequest, out) -> None:
        job: _Job = request.payload
        first = sample_one(out.logits, job.sampling, 0)
        c = self.loaded.config
        layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, str(out.kv.dtype).removeprefix("torch."),
                          len(request.prompt_token_ids))
        handoff = KVHandoff(request.request_id, request.task, job.adapter_version, self.loaded.fingerprint,
                            request.prompt_token_ids, first, job.sampling, job.deadline_s, layout, out.kv)
        m, transport = self.metrics, self.sender.transport_name
        m.prefill_s.labels(m.task(request.task)).observe(time.monotonic() - (job.started_s or job.arrived_s))
        m.prompt_tokens.labels(m.task(request.task)).inc(len(request.prompt_token_ids))
        sent_s = time.monotonic()
        try:
            self.sender.send(handoff, job.sink)
        except QueueFullError as e:
            self._send_failed(request, "queue_full", str(e), 429)
        except HandoffError as e:
            self._send_failed(request, "rejected", f"decode refused the KV handoff: {e}", 502)
        except ValueError as e:
            self._send_failed(request, "invalid", str(e), 400)
        except Exception as e:  # transport down: the client gets a 503 with the reason
            log.warning("handoff of %s failed: %s", request.request_id, e)
            self._send_failed(request, "unavailable", f"decode service unavailable: {e}", 503)
        else:
            m.kv_transfer_s.labels(transport).observe(time.monotonic() - sent_s)
            m.kv_transfer_bytes.labels(transport).inc(out.kv.numel() * out.kv.element_size())

    def _send_failed(self, request: PrefillRequest, reason: str, message: str, status: int) -> None:
        self.metrics.kv_transfer_failures.labels(self.sender.transport_name, reason).inc()
        request.payload.sink(_error(request, message, status))

    def _fail(self, batch: PrefillBatch, message: str) -> None:
        with self._lock:
            for chunk in batch.chunks:
                if chunk.request in self.scheduler.waiting:
                    self.scheduler.waiting.remove(chunk.request)
                self._by_id.pop(chunk.request.request_id, None)
        for chunk in batch.chunks:
            chunk.request.payload.sink(_error(chunk.request, message, 500))


def _error(request: PrefillRequest, message: str, status: int) -> TokenEvent:
    return TokenEvent(request.request_id, [], "", finish_reason="error", error=message, error_status=status,
                      num_prompt_tokens=len(request.prompt_token_ids))
