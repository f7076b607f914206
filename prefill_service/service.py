"""The front door's logic, apart from HTTP: resolve the task, tokenize, check limits, run a request.

`PrefillService.submit()` returns the TokenEvents of one request; the HTTP layer turns them into JSON
or SSE. Errors that the client caused or must know about are raised as ServiceError(kind, message);
prefill_service/http_errors.py alone turns kinds into HTTP statuses.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from adapters_store.base import UnknownTaskError
from kv_transfer.base import TokenEvent, merge_events
from kv_transfer.loop_events import dispatcher_for
from kv_transfer.outcome import EngineUnavailableError, ErrorKind, FinishReason, QueueFullError
from prad.adapters import Adapter
from prad.loading import LoadedModel
from prad.sampling import MAX_SEED, SamplingParams
from prefill_service.adapter_cache import AdapterCache
from prefill_service.api_models import GenerateRequest
from prefill_service.engine import PrefillEngine, PrefillRequest
from prefill_service.versions import VersionError, VersionRouter
from serving.metrics import Metrics, VersionSeries

if TYPE_CHECKING:
    import torch

BASE_TASK = "base"

log = logging.getLogger("prad.requests")


class ServiceError(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


async def collect(events: AsyncIterator[TokenEvent]) -> TokenEvent:
    """A whole request's output as one event, for non-streaming responses; ServiceError if it failed."""
    result = merge_events([event async for event in events])
    if result.finish_reason is FinishReason.ERROR:
        raise ServiceError(result.error_kind or ErrorKind.INTERNAL, result.error or "request failed")
    return result


async def collect_unless(events: AsyncIterator[TokenEvent], gone: Awaitable[None]) -> TokenEvent | None:
    """collect(events), unless `gone` finishes first (the client went away): then the collection is
    cancelled, which closes the events stream and so aborts the request (see PrefillService._events),
    and None is returned. A non-streaming client that hangs up thus frees its slot at once."""
    collecting = asyncio.ensure_future(collect(events))
    watching = asyncio.ensure_future(gone)
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        is_gone = not collecting.done()
        if is_gone:
            collecting.cancel()
    if not is_gone:
        return collecting.result()
    with suppress(asyncio.CancelledError):
        await collecting  # lets the stream's finally-block run (the abort) before answering
    return None


async def wait_disconnect(receive: Callable[[], Awaitable[Mapping[str, Any]]]) -> None:
    """Returns when the ASGI server reports that the client disconnected (call after the body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class PrefillService:
    def __init__(self, loaded: LoadedModel, adapters: AdapterCache, engine: PrefillEngine,
                 max_seq_len: int, request_timeout_s: float, metrics: Metrics | None = None,
                 allow_version_pinning: bool = False) -> None:
        self.loaded = loaded
        self.metrics = metrics or Metrics()
        self.adapters = adapters
        self.versions = VersionRouter(adapters, self.metrics, allow_version_pinning)
        self.engine = engine
        self.max_seq_len = min(max_seq_len, loaded.config.max_position_embeddings)
        self.request_timeout_s = request_timeout_s

    def resolve(self, task: str, routing_key: str | None = None, pinned: str | None = None,
                may_pin: bool = False) -> tuple[Adapter | None, str]:
        """The adapter (None for base) and version this request runs with: the task's traffic split
        decides, sticky per routing key; `pinned` names a version when pinning is allowed."""
        if task == BASE_TASK:
            if pinned not in (None, BASE_TASK):
                raise ServiceError(ErrorKind.INVALID, "task 'base' has no adapter versions to pin")
            return None, BASE_TASK
        try:
            adapter = self.versions.select(task, routing_key, pinned, may_pin)
        except UnknownTaskError:
            known = [BASE_TASK, *self.adapters.tasks()]
            raise ServiceError(ErrorKind.UNKNOWN_TASK, f"unknown task {task!r}; known: {known}") from None
        except VersionError as e:
            raise ServiceError(e.kind, e.message) from e
        return adapter, adapter.version

    def check_admission(self, task: str) -> None:
        """Cheap refusals first (the engine down, its queue already full) before prepare() spends time on
        the adapter and the tokenizer. Under a burst this keeps refusals fast; submit() still makes the
        binding check."""
        try:
            self.engine.check_accepting()
        except EngineUnavailableError as e:
            raise self._unavailable(self._label(task), e) from e
        max_waiting = self.engine.config.max_waiting
        if self.engine.stats()["num_waiting"] >= max_waiting:
            self.count_error(self._label(task), ErrorKind.QUEUE_FULL)
            raise ServiceError(ErrorKind.QUEUE_FULL, f"server busy: prefill queue full ({max_waiting} waiting); "
                                                     "retry later")

    def _unavailable(self, label: str, e: EngineUnavailableError) -> ServiceError:
        self.count_error(label, ErrorKind.UNAVAILABLE)
        return ServiceError(ErrorKind.UNAVAILABLE, f"prefill engine unavailable: {e}")

    def _label(self, task: str) -> str:
        """The task as a metric label; unknown ids never become labels: anyone could mint them."""
        return task if task == BASE_TASK or task in self.adapters.tasks() else "unknown"

    def prepare(self, body: GenerateRequest, routing_key: str | None = None, may_pin: bool = False) -> PrefillRequest:
        """Everything that can fail before queueing: task and version, template, tokenization, limits.
        `routing_key` (else body.user) keeps a user on one version of a split; `may_pin` lets this
        request name its version (body.adapter_version) even where pinning is not allowed to all."""
        arrived_s = time.monotonic()
        try:
            return self._prepare(body, arrived_s, routing_key or body.user, may_pin)
        except ServiceError as e:
            # Unknown task ids never become labels: anyone could mint them.
            self.count_error(body.task if e.kind is not ErrorKind.UNKNOWN_TASK else "unknown", e.kind)
            raise

    def count_error(self, task: str, kind: ErrorKind) -> None:
        self.metrics.request_errors.labels(self.metrics.task(task), kind.value).inc()

    def _prepare(self, body: GenerateRequest, arrived_s: float, routing_key: str | None,
                 may_pin: bool) -> PrefillRequest:
        adapter, version = self.resolve(body.task, routing_key, body.adapter_version, may_pin)
        prompt = body.prompt
        if prompt is None:
            template = adapter.config.prompt_template if adapter is not None else None
            prompt = (template or "{input}").replace("{input}", body.input or "")
        ids = self.loaded.tokenizer(prompt).input_ids
        if not ids:
            raise ServiceError(ErrorKind.INVALID, "prompt is empty after tokenization")
        if len(ids) >= self.max_seq_len:
            raise ServiceError(ErrorKind.TOO_LONG, f"prompt has {len(ids)} tokens; the context limit is "
                                                   f"{self.max_seq_len}")
        if len(ids) + body.max_new_tokens > self.max_seq_len:
            raise ServiceError(ErrorKind.TOO_LONG, f"prompt ({len(ids)} tokens) + max_new_tokens "
                                                   f"({body.max_new_tokens}) exceeds the context limit of "
                                                   f"{self.max_seq_len} tokens")
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
        sampling = SamplingParams(body.max_new_tokens, body.temperature, body.top_p, body.top_k, seed,
                                  tuple(body.stop), body.ignore_eos)
        num_cached, cached_kv = self._cached_prefix(body.task, version, ids)
        return PrefillRequest(uuid.uuid4().hex, body.task, ids, num_computed_tokens=num_cached, adapter=adapter,
                              adapter_version=version, sampling=sampling, arrived_s=arrived_s, past_kv=cached_kv)

    def _cached_prefix(self, task: str, version: str, ids: list[int]) -> tuple[int, torch.Tensor | None]:
        """The prompt's longest prefix whose KV (made by this adapter version) is cached: prefill
        starts after it."""
        cache = self.engine.prefix_cache
        if not cache.enabled:
            return 0, None
        num_cached, kv = cache.lookup(version, ids)
        label = self.metrics.task(task)
        self.metrics.prefix_lookup_tokens.labels(label).inc(len(ids))
        if num_cached:
            self.metrics.prefix_hit_tokens.labels(label).inc(num_cached)
        return num_cached, kv

    def submit(self, req: PrefillRequest) -> AsyncIterator[TokenEvent]:
        """Queue the request (ServiceError QUEUE_FULL when full) and return the stream of its events.

        Must be called on the event loop; the stream aborts the request if its consumer goes away.
        """
        dispatcher = dispatcher_for(asyncio.get_running_loop())
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        deadline_s = req.deadline_s = time.time() + self.request_timeout_s

        def sink(event: TokenEvent) -> None:  # called from engine threads: a step's events share a wake-up
            dispatcher.put(events, event)

        try:
            self.engine.submit(req, sink)
        except QueueFullError as e:
            self.count_error(req.task, ErrorKind.QUEUE_FULL)
            raise ServiceError(ErrorKind.QUEUE_FULL, f"server busy: {e}; retry later") from e
        except EngineUnavailableError as e:
            raise self._unavailable(req.task, e) from e
        return self._events(req, events, deadline_s)

    async def _events(self, req: PrefillRequest, events: asyncio.Queue[TokenEvent],
                      deadline_s: float) -> AsyncIterator[TokenEvent]:
        """The request's output as chunks: each one is every event the engine has sent since the previous
        chunk (one token when the consumer keeps up; several merged when it falls behind, so a slow
        stream costs fewer writes instead of queueing more)."""
        finished = False
        tracker = _LatencyTracker(self.metrics, req)
        try:
            while not finished:
                chunk = [await self._next_event(req, events, deadline_s)]
                while not chunk[-1].is_final and not events.empty():
                    chunk.append(events.get_nowait())
                event = merge_events(chunk)
                finished = event.is_final
                tracker.observe(event)
                if finished:
                    self._finished(req, event, tracker)
                yield event
        except ServiceError as e:  # timed out
            tracker.outcome(f"error:{e.kind}")
            raise
        finally:
            if not finished:
                self.engine.abort(req.request_id)
                self.metrics.request_success.labels(self.metrics.task(req.task), "abort").inc()
                if tracker.version_outcome is None:
                    tracker.outcome("abort")

    async def _next_event(self, req: PrefillRequest, events: asyncio.Queue[TokenEvent],
                          deadline_s: float) -> TokenEvent:
        if not events.empty():  # no timer when it is already there (most tokens under load)
            return events.get_nowait()
        try:
            async with asyncio.timeout(max(deadline_s + 5.0 - time.time(), 0.1)):
                return await events.get()
        except TimeoutError:
            self.count_error(req.task, ErrorKind.TIMEOUT)
            raise ServiceError(ErrorKind.TIMEOUT, f"request timed out after {self.request_timeout_s:.0f}s") from None

    def _finished(self, req: PrefillRequest, event: TokenEvent, tracker: _LatencyTracker) -> None:
        if event.finish_reason is FinishReason.ERROR:
            self.count_error(req.task, event.error_kind or ErrorKind.INTERNAL)
            tracker.outcome(f"error:{event.error_kind or ErrorKind.INTERNAL}")
        else:
            self.metrics.request_success.labels(self.metrics.task(req.task), event.finish_reason).inc()
            tracker.outcome(str(event.finish_reason))
        log.info("request finished", extra={
            "request_id": req.request_id, "task": req.task, "adapter_version": req.adapter_version,
            "finish_reason": event.finish_reason, "prompt_tokens": len(req.prompt_token_ids),
            "completion_tokens": tracker.num_tokens, "latency_s": round(time.monotonic() - req.arrived_s, 4),
            "error": event.error})


class _LatencyTracker:
    """TTFT, inter-token latency, e2e latency and generated tokens of one request, per task and per
    adapter version."""

    def __init__(self, metrics: Metrics, req: PrefillRequest) -> None:
        label = metrics.task(req.task)  # each labelled child looked up once, not per token
        self.ttft_s, self.itl_s = metrics.ttft_s.labels(label), metrics.itl_s.labels(label)
        self.e2e_s, self.generation_tokens = metrics.e2e_s.labels(label), metrics.generation_tokens.labels(label)
        self.version = VersionSeries(metrics, req.task, req.adapter_version)
        self.version.requests.inc()
        self.version_outcome: str | None = None
        self.arrived_s = req.arrived_s
        self.last_token_s: float | None = None
        self.num_tokens = 0

    def observe(self, event: TokenEvent) -> None:
        now = time.monotonic()
        for _ in event.token_ids:
            if self.last_token_s is None:
                self.ttft_s.observe(now - self.arrived_s)
                self.version.ttft_s.observe(now - self.arrived_s)
            else:
                self.itl_s.observe(now - self.last_token_s)
                self.version.itl_s.observe(now - self.last_token_s)
            self.last_token_s = now
        self.num_tokens += len(event.token_ids)
        if event.token_ids:
            self.generation_tokens.inc(len(event.token_ids))
            self.version.generation_tokens.inc(len(event.token_ids))
        if event.is_final:
            self.e2e_s.observe(now - self.arrived_s)

    def outcome(self, outcome: str) -> None:
        """How the request ended, for its version: a finish reason, or error:<kind>."""
        self.version_outcome = outcome
        self.version.outcome(outcome)
