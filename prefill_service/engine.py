"""The prefill engine: a thread running schedule -> execute -> update, handing KV to decode.

Failures stay with the request that caused them: a failed forward pass over a batch is retried one
request at a time, so only the requests whose own pass fails get an error; sampling the first token
and handing the KV over fail their request alone. See serving/engine_loop.py for what happens when the
loop itself fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from kv_transfer.base import EventSink, KVSender, KVStream, TokenEvent
from kv_transfer.handoff import KVHandoff, KVLayout
from kv_transfer.outcome import ErrorKind, FinishReason, error_kind, refusal_message
from prad.adapters import Adapter
from prad.cpu_decode.mixed import PromptChunks
from prad.loading import LoadedModel
from prad.sampling import SamplingParams, sample_one
from prefill_service.prefix_cache import DEFAULT_BLOCK_TOKENS, PrefixCache
from prefill_service.runner import ChunkInput, ChunkOutput, PrefillRunner
from prefill_service.scheduler import PrefillBatch, PrefillScheduler, ScheduledRequest
from serving.engine_loop import DEFAULT_STALL_TIMEOUT_S, EngineLoop
from serving.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class PrefillConfig:
    max_prefill_tokens: int = 2048  # prompt tokens per forward pass (longer prompts are chunked)
    max_batch_size: int = 64  # prompts per forward pass
    max_waiting: int = 256  # queued requests; beyond that, refused (queue_full)
    prefix_cache_bytes: int = 0  # prompt KV kept for reuse by later prompts with the same prefix (0 = off)
    prefix_block_tokens: int = DEFAULT_BLOCK_TOKENS  # prefix cache granularity
    stream_kv: bool = True  # send each layer's KV while the last pass computes the next (if the transport can)
    stream_kv_min_tokens: int = 128  # shorter prompts go whole: their pass is too short to overlap much


@dataclass(kw_only=True)
class PrefillRequest(ScheduledRequest):
    """One request on the prefill side, from `PrefillService.prepare` to the hand-off: the scheduler's
    view of it (ids, prompt, progress) plus what the engine needs."""

    adapter: Adapter | None  # pinned when prepared: hot swaps never change a request in flight
    adapter_version: str  # "base" for no adapter
    sampling: SamplingParams
    arrived_s: float  # time.monotonic() when the request arrived
    deadline_s: float | None = None  # absolute time.time(); decode aborts the request past it
    sink: EventSink | None = None  # where its events go, from submission on
    past_kv: torch.Tensor | None = None  # KV of its earlier chunks, when chunked
    started_s: float | None = None  # when its first chunk was scheduled
    stream: KVStream | None = None  # its handoff, being sent layer by layer during its last pass
    may_stream: bool = True  # False once a pass it was in failed: the retry hands the KV over whole


class PrefillEngine(EngineLoop[PrefillBatch[PrefillRequest], PrefillBatch[PrefillRequest], list[ChunkOutput]]):
    thread_name = "prefill-engine"

    def __init__(self, loaded: LoadedModel, sender: KVSender, config: PrefillConfig,
                 compute_lock: AbstractContextManager[object] | None = None, metrics: Metrics | None = None,
                 stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> None:
        self.loaded = loaded
        self.metrics = metrics or Metrics()
        self.sender = sender
        self.config = config
        self.runner = PrefillRunner(loaded.model)
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes, loaded.fingerprint, config.prefix_block_tokens)
        self.scheduler: PrefillScheduler[PrefillRequest] = PrefillScheduler(
            config.max_prefill_tokens, config.max_batch_size, config.max_waiting)
        self.compute_lock = compute_lock or nullcontext()
        super().__init__(stall_timeout_s)
        self._by_id: dict[str, PrefillRequest] = {}
        self.num_steps = 0
        # Role all with prompt chunks mixed into decode steps: while this says decode is busy, the chunks
        # go with its steps (take_chunks) and this loop runs no pass of its own.
        self.decode_is_busy: Callable[[], bool] | None = None

    def submit(self, request: PrefillRequest, sink: EventSink) -> None:
        """Queue a request whose events go to `sink`; raises QueueFullError when the queue is at its
        bound and EngineUnavailableError when the engine's loop has stopped."""
        self.check_accepting()
        request.sink = sink
        with self._lock:
            self.scheduler.add(request)
            self._by_id[request.request_id] = request
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

    def wake(self) -> None:
        """Look for work again (decode went idle: this loop's own passes may run)."""
        with self._lock:
            self._lock.notify_all()

    def take_chunks(self, max_tokens: int) -> MixedChunks | None:
        """Up to `max_tokens` prompt tokens for a decode step to compute in its own pass (role all), or None
        when nothing waits. The caller reports back with MixedChunks.done or .failed."""
        with self._lock:
            if not self.scheduler.has_schedulable():
                return None
            batch = self._schedule(max_tokens)
        if not batch.chunks:
            return None
        inputs = self._inputs(batch)
        return MixedChunks(self, batch, inputs, self.runner.prompt_chunks(inputs))

    # --- the loop's steps ------------------------------------------------------------------------
    def has_work(self) -> bool:
        if self.decode_is_busy is not None and self.decode_is_busy():
            return False  # its steps take the chunks
        return self.scheduler.has_schedulable()

    def _schedule(self, max_tokens: int | None = None) -> PrefillBatch[PrefillRequest]:
        batch = self.scheduler.schedule(max_tokens)
        for request in batch.aborted:
            self._by_id.pop(request.request_id, None)
            _emit(request, TokenEvent(request.request_id, [], "", finish_reason=FinishReason.ABORT,
                                      num_prompt_tokens=len(request.prompt_token_ids)))
        return batch

    def _step(self, batch: PrefillBatch[PrefillRequest]) -> None:
        if batch.chunks:
            self._run(batch)

    def _inputs(self, batch: PrefillBatch[PrefillRequest]) -> list[ChunkInput]:
        """The runner's view of a batch's chunks (and the queue time of requests starting now)."""
        now = time.monotonic()
        for chunk in batch.chunks:
            request = chunk.request
            if request.started_s is None:
                request.started_s = now
                self.metrics.queue_s.labels(self.metrics.task(request.task)).observe(now - request.arrived_s)
        return [ChunkInput(c.request.prompt_token_ids[c.start:c.end], c.start, c.request.adapter,
                           c.request.past_kv) for c in batch.chunks]

    def _execute(self, batch: PrefillBatch[PrefillRequest]) -> list[ChunkOutput]:
        inputs = self._inputs(batch)
        outputs = self.runner.new_outputs(inputs)
        streams = self._open_streams(batch, outputs)

        def layer_done(layer: int) -> None:
            for stream in streams:
                stream.layer_ready(layer)

        try:
            with self.compute_lock:
                result = self.runner.run(inputs, outputs, layer_done if streams else None)
        except Exception as e:
            for chunk in batch.chunks:  # the retry, one by one, sends whole handoffs
                self._cancel_stream(chunk.request, f"prefill pass failed: {e}")
                chunk.request.may_stream = False
            raise
        self.num_steps += 1
        return result

    def _open_streams(self, batch: PrefillBatch[PrefillRequest], outputs: list[torch.Tensor]) -> list[KVStream]:
        """Start the handoff of each prompt this pass completes, to be sent layer by layer as it computes
        (none when streaming is off, the transport hands KV over whole, or opening fails: then it is sent
        whole after the pass)."""
        streams: list[KVStream] = []
        if not self.config.stream_kv:
            return streams
        for chunk, kv in zip(batch.chunks, outputs, strict=True):
            request = chunk.request
            if not (chunk.is_last and request.may_stream) or request.sink is None or \
                    len(request.prompt_token_ids) < self.config.stream_kv_min_tokens:
                continue
            try:
                request.stream = self.sender.open_stream(self._handoff(request, kv, first_token_id=0),
                                                         request.sink)
            except Exception:  # e.g. no decode replica: the whole-handoff path reports it after the pass
                log.debug("no layer stream for %s", request.request_id, exc_info=True)
                request.stream = None
            if request.stream is not None:
                streams.append(request.stream)
        return streams

    def _cancel_stream(self, request: PrefillRequest, reason: str) -> None:
        stream, request.stream = request.stream, None
        if stream is not None:
            try:
                stream.cancel(reason)
            except Exception:
                log.warning("cancelling the KV stream of %s failed", request.request_id, exc_info=True)

    def _update(self, batch: PrefillBatch[PrefillRequest], outputs: list[ChunkOutput]) -> None:
        with self._lock:
            self.scheduler.update(batch)  # completed prompts stay in _by_id until handed off
            self.metrics.num_waiting.labels("prefill").set(self.scheduler.num_waiting)
        for chunk, out in zip(batch.chunks, outputs, strict=True):
            chunk.request.past_kv = None if chunk.is_last else out.kv
            if chunk.is_last:
                self._hand_off(chunk.request, out)
                self._keep_prefix(chunk.request, out)

    def _step_failed(self, batch: PrefillBatch[PrefillRequest], error: Exception) -> None:
        """Run each chunk of a failed batch alone: only requests whose own pass fails get an error."""
        if len(batch.chunks) == 1:  # alone (or retried alone): the request's own failure
            self.metrics.row_failures.labels("prefill").inc()
            self._fail(batch.chunks[0].request, ErrorKind.INTERNAL, f"prefill failed: {error}")
            return
        self.metrics.step_failures.labels("prefill").inc()
        log.warning("retrying the %d requests of a failed prefill pass one by one", len(batch.chunks))
        for chunk in batch.chunks:
            self._run(PrefillBatch([chunk]))

    def _fail_all(self, message: str) -> None:
        for request in self.scheduler.drop_all():
            _emit(request, TokenEvent.failure(request.request_id, ErrorKind.UNAVAILABLE, message,
                                              len(request.prompt_token_ids)))
        self._by_id.clear()

    # --- hand-off ----------------------------------------------------------------------------------
    def _hand_off(self, request: PrefillRequest, out: ChunkOutput) -> None:
        try:
            self._send(request, out)
        except Exception as e:  # e.g. sampling the first token: this request fails, no other
            log.exception("hand-off of request %s failed", request.request_id)
            _emit(request, TokenEvent.failure(request.request_id, ErrorKind.INTERNAL, f"prefill failed: {e}",
                                              len(request.prompt_token_ids)))
        finally:
            # An abort that arrived while the KV was being handed over is forwarded now that decode
            # knows the request; one arriving after this point goes straight to the sender.
            with self._lock:
                self._by_id.pop(request.request_id, None)
                is_aborted = request.is_abort_requested
            if is_aborted:
                self.sender.abort(request.request_id)

    def _keep_prefix(self, request: PrefillRequest, out: ChunkOutput) -> None:
        """Offer the prompt's KV to the prefix cache (after the hand-off: never on the TTFT path)."""
        try:
            self.prefix_cache.insert(request.adapter_version, request.prompt_token_ids, out.kv)
        except Exception:  # e.g. no memory: the cache is an optimisation, the request is done
            log.warning("prefix cache insert for %s failed", request.request_id, exc_info=True)
        self.metrics.prefix_cache_bytes.set(self.prefix_cache.num_bytes)

    def _handoff(self, request: PrefillRequest, kv: torch.Tensor, first_token_id: int) -> KVHandoff:
        c = self.loaded.config
        layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, str(kv.dtype).removeprefix("torch."),
                          len(request.prompt_token_ids))
        return KVHandoff(request.request_id, request.task, request.adapter_version, self.loaded.fingerprint,
                         request.prompt_token_ids, first_token_id, request.sampling, request.deadline_s, layout, kv)

    def _send(self, request: PrefillRequest, out: ChunkOutput) -> None:
        try:
            first = sample_one(out.logits, request.sampling, 0)
        except Exception:
            self._cancel_stream(request, "sampling the first token failed")
            raise
        stream, request.stream = request.stream, None
        handoff = stream.handoff if stream is not None else self._handoff(request, out.kv, first)
        m, transport = self.metrics, self.sender.transport_name
        started_s = request.started_s or request.arrived_s
        m.prefill_s.labels(m.task(request.task)).observe(time.monotonic() - started_s)
        m.prompt_tokens.labels(m.task(request.task)).inc(len(request.prompt_token_ids))
        sent_s = time.monotonic()
        assert request.sink is not None  # set by submit()
        try:
            if stream is not None:
                stream.finish(first)
            else:
                self.sender.send(handoff, request.sink)
        except Exception as e:  # refused, or the transport is down: the client hears why
            kind = error_kind(e)
            if kind is ErrorKind.UNAVAILABLE:
                log.warning("handoff of %s failed: %s", request.request_id, e)
            m.kv_transfer_failures.labels(transport, _FAILURE_REASON.get(kind, kind.value)).inc()
            _emit(request, TokenEvent.failure(request.request_id, kind, refusal_message(e),
                                              len(request.prompt_token_ids)))
        else:
            # Streamed: the time from the end of the pass to the handoff completing (what it adds to TTFT).
            m.kv_transfer_s.labels(transport).observe(time.monotonic() - sent_s)
            m.kv_transfer_bytes.labels(transport).inc(self.sender.wire_bytes(handoff))

    def _fail(self, request: PrefillRequest, kind: ErrorKind, message: str) -> None:
        log.error("request %s failed: %s", request.request_id, message)
        with self._lock:
            self.scheduler.drop(request)
            self._by_id.pop(request.request_id, None)
        _emit(request, TokenEvent.failure(request.request_id, kind, message, len(request.prompt_token_ids)))


@dataclass
class MixedChunks:
    """Prompt chunks a decode step computes in its own pass (role all): taken from the prefill engine's
    scheduler by `PrefillEngine.take_chunks`, finished by `done` (the step's logits for them) or, when the
    step failed, by `failed` (they are computed again in a pass of their own)."""

    engine: PrefillEngine
    batch: PrefillBatch[PrefillRequest]
    inputs: list[ChunkInput]
    chunks: PromptChunks  # what the decode step computes; their K/V land in chunks.kv

    def done(self, logits: torch.Tensor) -> None:
        self.engine.num_steps += 1
        self.engine._update(self.batch, self.engine.runner.chunk_outputs(self.inputs, self.chunks, logits))

    def failed(self, error: Exception) -> None:
        """Run the chunks in a pass of their own: the mixed pass's failure need not be theirs (a chunk whose
        own pass fails then fails alone, as in any failed pass)."""
        log.warning("a decode step mixing %d prompt chunks failed (%s); computing them apart",
                    len(self.batch.chunks), error)
        self.engine.metrics.step_failures.labels("prefill").inc()
        self.engine._run(self.batch)


# the `reason` label of prad:kv_transfer_failures_total, by kind of refusal
_FAILURE_REASON = {ErrorKind.QUEUE_FULL: "queue_full", ErrorKind.KV_REJECTED: "rejected",
                   ErrorKind.INVALID: "invalid", ErrorKind.UNAVAILABLE: "unavailable"}


def _emit(request: PrefillRequest, event: TokenEvent) -> None:
    """Deliver an event; a consumer that cannot take it (its event loop closed) is only logged."""
    if request.sink is None:
        return
    try:
        request.sink(event)
    except Exception:
        log.warning("could not deliver an event of request %s", request.request_id, exc_info=True)
