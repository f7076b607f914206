"""The prefill engine: a thread running schedule -> execute -> update, handing KV to decode.

Failures stay with the request that caused them: a failed forward pass over a batch is retried one
request at a time, so only the requests whose own pass fails get an error; sampling the first token
and handing the KV over fail their request alone. See prad/engine_loop.py for what happens when the
loop itself fails.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from kv_transfer.base import EventSink, KVSender, TokenEvent
from kv_transfer.handoff import HandoffError, KVHandoff, KVLayout
from prad.adapters import Adapter
from prad.engine_loop import DEFAULT_STALL_TIMEOUT_S, EngineLoop
from prad.errors import EngineUnavailableError, QueueFullError
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
                 compute_lock: AbstractContextManager[object] | None = None, metrics: Metrics | None = None,
                 stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> None:
        self.loaded = loaded
        self.metrics = metrics or Metrics()
        self.sender = sender
        self.config = config
        self.runner = PrefillRunner(loaded.model)
        self.scheduler = PrefillScheduler(config.max_prefill_tokens, config.max_batch_size, config.max_waiting)
        self.compute_lock = compute_lock or nullcontext()
        super().__init__(stall_timeout_s)
        self._by_id: dict[str, PrefillRequest] = {}
        self.num_steps = 0

    def submit(self, request_id: str, task: str, prompt_token_ids: list[int], adapter: Adapter | None,
               adapter_version: str, sampling: SamplingParams, sink: EventSink,
               deadline_s: float | None = None) -> None:
        """Queue a request; raises QueueFullError when the queue is at its bound and
        EngineUnavailableError when the engine's loop has stopped."""
        self.check_accepting()
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

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting)

    def _loop(self) -> None:
        while True:
            with self._lock:
                self.note_progress()
                while not self.scheduler.waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                batch = self.scheduler.schedule()
                for request in batch.aborted:
                    self._by_id.pop(request.request_id, None)
                    _emit(request, TokenEvent(request.request_id, [], "", finish_reason="abort",
                                              num_prompt_tokens=len(request.prompt_token_ids)))
            if batch.chunks:
                self._step(batch)

    def _step(self, batch: PrefillBatch) -> None:
        try:
            outputs = self._execute(batch)
        except Exception:
            log.exception("prefill pass over %d request(s) failed; retrying them one by one", len(batch.chunks))
            self.metrics.step_failures.labels("prefill").inc()
            self._step_each(batch)
            return
        self._update(batch, outputs)

    def _step_each(self, batch: PrefillBatch) -> None:
        """Run each chunk of a failed batch alone: only requests whose own pass fails get an error."""
        for chunk in batch.chunks:
            alone = PrefillBatch([chunk])
            try:
                outputs = self._execute(alone)
            except Exception as e:
                log.exception("prefill of request %s failed", chunk.request.request_id)
                self._fail(alone, f"prefill failed: {e}")
                continue
            self._update(alone, outputs)

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
        except Exception as e:  # e.g. sampling the first token: this request fails, no other
            log.exception("hand-off of request %s failed", request.request_id)
            _emit(request, _error(request, f"prefill failed: {e}", 500))
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
        except EngineUnavailableError as e:
            self._send_failed(request, "unavailable", f"decode service unavailable: {e}", 503)
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
        _emit(request, _error(request, message, status))

    def _fail(self, batch: PrefillBatch, message: str) -> None:
        with self._lock:
            for chunk in batch.chunks:
                self.scheduler.drop(chunk.request)
                self._by_id.pop(chunk.request.request_id, None)
        for chunk in batch.chunks:
            _emit(chunk.request, _error(chunk.request, message, 500))

    def _fail_all(self, message: str) -> None:
        for request in self.scheduler.drop_all():
            _emit(request, _error(request, message, 503))
        self._by_id.clear()


def _emit(request: PrefillRequest, event: TokenEvent) -> None:
    """Deliver an event; a consumer that cannot take it (its event loop closed) is only logged."""
    try:
        request.payload.sink(event)
    except Exception:
        log.warning("could not deliver an event of request %s", request.request_id, exc_info=True)


def _error(request: PrefillRequest, message: str, status: int) -> TokenEvent:
    return TokenEvent(request.request_id, [], "", finish_reason="error", error=message, error_status=status,
                      num_prompt_tokens=len(request.prompt_token_ids))
