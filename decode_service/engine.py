"""The decode engine: a thread running schedule -> execute -> update over one continuous batch.

Failures stay with the request that caused them: a handoff is validated before admission (token ids,
sampling ranges, layout), and inserting its KV, sampling its token, detokenizing and delivering its
events fail that request alone. A step that raises (not attributable to a row) fails the requests of
that step, never the engine; see prad/engine_loop.py for what happens when the loop itself fails.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from decode_service.runner import DecodeRunner
from decode_service.scheduler import DecodeScheduler, DecodeSequence, SeqStatus
from kv_transfer.base import DecodeBackend, EventSink, TokenEvent
from kv_transfer.handoff import HandoffError, KVHandoff, KVLayout, check_handoff
from prad.detokenizer import Detokenizer
from prad.engine_loop import DEFAULT_STALL_TIMEOUT_S, EngineLoop
from prad.loading import LoadedModel
from prad.metrics import Metrics
from prad.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, sample_batch, sample_one

log = logging.getLogger(__name__)


@dataclass
class DecodeConfig:
    max_batch_size: int = 32  # rows decoded together
    max_seq_len: int = 2048  # prompt + output positions per request
    max_kv_tokens: int = 32 * 2048  # sum of reserved positions over running requests
    max_waiting: int = 256  # handoffs queued for a row; beyond that, 429


@dataclass
class _Job:
    handoff: KVHandoff
    sink: EventSink
    detok: Detokenizer
    arrived_s: float


class DecodeEngine(EngineLoop, DecodeBackend):
    thread_name = "decode-engine"

    def __init__(self, loaded: LoadedModel, config: DecodeConfig,
                 compute_lock: AbstractContextManager[object] | None = None, metrics: Metrics | None = None,
                 stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> None:
        self.loaded = loaded
        self.config = config
        self.metrics = metrics or Metrics()
        self.runner = DecodeRunner(loaded.model, config.max_batch_size, config.max_seq_len)
        self.scheduler = DecodeScheduler(config.max_batch_size, config.max_kv_tokens, config.max_waiting)
        self.compute_lock = compute_lock or nullcontext()
        super().__init__(stall_timeout_s)
        self._by_id: dict[str, DecodeSequence] = {}
        c = loaded.config
        self.num_steps = 0
        self.expected_layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, str(loaded.model.dtype)
                                        .removeprefix("torch."), 0)

    # --- DecodeBackend ---------------------------------------------------------------------
    def submit(self, handoff: KVHandoff, sink: EventSink) -> None:
        self.check_accepting()
        check_handoff(handoff, self.loaded.fingerprint, self.expected_layout)
        check_request(handoff, self.loaded.config.vocab_size)
        num_positions = len(handoff.prompt_token_ids) + handoff.sampling.max_new_tokens
        if num_positions > self.config.max_seq_len:
            raise ValueError(f"request needs {num_positions} positions, decode max_seq_len is "
                             f"{self.config.max_seq_len}")
        detok = Detokenizer(self.loaded.tokenizer, handoff.sampling.stop)
        job = _Job(handoff, sink, detok, time.monotonic())
        seq = DecodeSequence(handoff.request_id, len(handoff.prompt_token_ids), handoff.sampling.max_new_tokens,
                             [], payload=job)
        with self._lock:
            if handoff.request_id in self._by_id:
                raise ValueError(f"duplicate request id {handoff.request_id!r}")
            # The first token is already sampled: emit it, and admit only if the request goes on.
            if self._accept_token(seq, handoff.first_token_id):
                return
            self.scheduler.add(seq)  # may raise QueueFullError: nothing was admitted
            self._by_id[seq.request_id] = seq
            self._lock.notify_all()

    def abort(self, request_id: str) -> None:
        with self._lock:
            seq = self._by_id.get(request_id)
            if seq is not None:
                seq.is_abort_requested = True
                self._lock.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no request is running or waiting (True), or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if not self.scheduler.has_work():
                    return True
            if time.monotonic() >= deadline or not self.is_alive:
                return False
            time.sleep(0.05)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"num_running": self.scheduler.num_running, "num_waiting": self.scheduler.num_waiting,
                    "max_waiting": self.config.max_waiting,
                    "num_reserved_kv_tokens": self.scheduler.num_reserved_tokens,
                    "max_kv_tokens": self.config.max_kv_tokens, "num_kv_bytes": self.runner.num_kv_bytes,
                    "num_steps": self.num_steps}

    # --- the loop --------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _loop(self) -> None:
        while True:
            with self._lock:
                self.note_progress()
                while not self.scheduler.has_work() and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    self._fail_all("decode service shutting down")
                    return
                running = self._schedule()
            if running:
                self._step(running)
            with self._lock:
                self._observe(self.scheduler.num_running)  # gauges stay true when the loop goes idle

    def _schedule(self) -> list[DecodeSequence]:
        """Drop aborted requests, admit waiting ones (their KV into the cache); the rows to run (lock held)."""
        out = self.scheduler.schedule()
        for seq in out.aborted:
            self._finish_event(seq)
        for move in out.moves:
            self.runner.move(*move)
        for seq in out.admitted:
            try:
                self.runner.ensure_capacity(seq.num_reserved_tokens)
                self.runner.insert(seq.row, seq.payload.handoff.kv)
            except Exception as e:  # e.g. no memory for a longer cache: this request fails alone
                log.exception("admitting request %s failed", seq.request_id)
                self._fail_row(seq, f"decode could not admit the request: {e}")
            seq.payload.handoff.kv = None  # the cache holds it now (or it failed)
        running = list(self.scheduler.rows)
        self._observe(len(running))
        return running

    def _step(self, running: list[DecodeSequence]) -> None:
        try:
            with self.compute_lock:
                logits = self.runner.decode([s.output_token_ids[-1] for s in running],
                                            [s.last_position for s in running])
        except Exception as e:  # a failed step fails its requests, never the engine
            log.exception("decode step failed")
            self.metrics.step_failures.labels("decode").inc()
            self._fail(running, f"decode step failed: {e}")
            return
        self.num_steps += 1
        tokens = self._sample(logits, running)
        self._update(running, tokens)

    def _observe(self, batch_size: int) -> None:
        m, s = self.metrics, self.scheduler
        m.batch_size.set(batch_size)
        m.num_running.set(s.num_running)
        m.num_waiting.labels("decode").set(s.num_waiting)
        m.kv_usage.set(s.num_reserved_tokens / self.config.max_kv_tokens)

    def _sample(self, logits, running: list[DecodeSequence]) -> list[int | Exception]:
        """One token per row, or the exception that row raised (sampled alone after a batch failure)."""
        params = [s.payload.handoff.sampling for s in running]
        indices = [len(s.output_token_ids) for s in running]
        try:
            return list(sample_batch(logits, params, indices))
        except Exception:
            return [_sample_or_error(logits[i], params[i], indices[i]) for i in range(len(running))]

    def _update(self, running: list[DecodeSequence], tokens: list[int | Exception]) -> None:
        with self._lock:
            for seq, token in zip(running, tokens, strict=True):
                if seq.status is not SeqStatus.RUNNING:
                    continue
                if isinstance(token, Exception):
                    self._fail_row(seq, f"sampling failed: {token}")
                elif self._accept_token(seq, token):
                    self._release(seq, seq.status)

    def _release(self, seq: DecodeSequence, status: SeqStatus) -> None:
        """Free a running request's row, keeping rows dense (lock held)."""
        for move in self.scheduler.finish(seq, status):
            self.runner.move(*move)

    # --- per-token bookkeeping ----------------------------------------------------------------
    def _accept_token(self, seq: DecodeSequence, token: int) -> bool:
        """Record a token, emit its text; True when the request has finished (its last event sent)."""
        job: _Job = seq.payload
        seq.output_token_ids.append(token)
        try:
            text = job.detok.add(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                text += job.detok.flush()
        except Exception as e:
            log.exception("detokenizing request %s failed", seq.request_id)
            self._error_event(seq, f"detokenizing failed: {e}")
            return True
        index = len(seq.output_token_ids) - 1
        if reason is None:
            if self._emit(seq, TokenEvent(seq.request_id, [token], text, first_token_index=index)):
                return False
            reason = "abort"  # nobody can take its events any more
        else:
            self._emit(seq, TokenEvent(seq.request_id, [token], text, finish_reason=reason,
                                       num_prompt_tokens=seq.num_prompt_tokens,
                                       num_output_tokens=len(seq.output_token_ids),
                                       timings={"decode_s": time.monotonic() - job.arrived_s},
                                       first_token_index=index))
        self._by_id.pop(seq.request_id, None)
        seq.status = _STATUS_FOR[reason]
        return True

    def _finish_reason(self, seq: DecodeSequence, token: int) -> str | None:
        job: _Job = seq.payload
        params = job.handoff.sampling
        if job.detok.is_stopped or (token in self.loaded.config.eos_token_ids and not params.ignore_eos):
            return "stop"
        if len(seq.output_token_ids) >= params.max_new_tokens:
            return "length"
        if job.handoff.deadline_s is not None and time.time() > job.handoff.deadline_s:
            return "abort"
        return None

    def _emit(self, seq: DecodeSequence, event: TokenEvent) -> bool:
        """Deliver one event; False when the consumer cannot take it (the request is then dropped)."""
        try:
            seq.payload.sink(event)
        except Exception:
            log.warning("could not deliver an event of request %s; dropping it", seq.request_id, exc_info=True)
            self.metrics.row_failures.labels("decode").inc()
            return False
        return True

    def _finish_event(self, seq: DecodeSequence) -> None:
        self._by_id.pop(seq.request_id, None)
        self._emit(seq, TokenEvent(seq.request_id, [], seq.payload.detok.flush(), finish_reason="abort",
                                   num_prompt_tokens=seq.num_prompt_tokens,
                                   num_output_tokens=len(seq.output_token_ids),
                                   first_token_index=len(seq.output_token_ids)))

    def _error_event(self, seq: DecodeSequence, message: str, status: int = 500) -> None:
        """Send a request's final error event and forget it (lock held; its row is not released)."""
        self.metrics.row_failures.labels("decode").inc()
        self._by_id.pop(seq.request_id, None)
        seq.status = SeqStatus.FINISHED_ABORTED
        self._emit(seq, _error(seq, message, status))

    def _fail_row(self, seq: DecodeSequence, message: str) -> None:
        """Fail one running request and free its row (lock held)."""
        self._error_event(seq, message)
        self._release(seq, SeqStatus.FINISHED_ABORTED)

    def _fail(self, running: list[DecodeSequence], message: str) -> None:
        with self._lock:
            for seq in running:
                if seq.status is SeqStatus.RUNNING:
                    self._release(seq, SeqStatus.FINISHED_ABORTED)
                self._by_id.pop(seq.request_id, None)
                self._emit(seq, _error(seq, message, 500))

    def _fail_all(self, message: str) -> None:
        """Every waiting and running request gets an error event; the scheduler is emptied (lock held)."""
        for seq in self.scheduler.drop_all():
            self._emit(seq, _error(seq, message, 503))
        self._by_id.clear()


_STATUS_FOR = {"stop": SeqStatus.FINISHED_STOP, "length": SeqStatus.FINISHED_LENGTH,
               "abort": SeqStatus.FINISHED_ABORTED}


def _error(seq: DecodeSequence, message: str, status: int) -> TokenEvent:
    return TokenEvent(seq.request_id, [], "", finish_reason="error", error=message, error_status=status)


def _sample_or_error(logits, params, index: int) -> int | Exception:
    try:
        return sample_one(logits, params, index)
    except Exception as e:
        return e


def check_request(handoff: KVHandoff, vocab_size: int) -> None:
    """Raise HandoffError unless every token id is in the vocabulary and the sampling parameters are in
    range: a bad value would otherwise surface inside a batched step and fail other requests."""
    if not handoff.prompt_token_ids:
        raise HandoffError("empty prompt")
    ids = [*handoff.prompt_token_ids, handoff.first_token_id]
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise HandoffError(f"token ids must lie in [0, {vocab_size})")
    s = handoff.sampling
    if s.max_new_tokens < 1:
        raise HandoffError(f"max_new_tokens must be >= 1, got {s.max_new_tokens}")
    if not (math.isfinite(s.temperature) and s.temperature >= 0.0):
        raise HandoffError(f"temperature must be finite and >= 0, got {s.temperature}")
    if not (0.0 < s.top_p <= 1.0):
        raise HandoffError(f"top_p must lie in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise HandoffError(f"top_k must be >= 0, got {s.top_k}")
    if len(s.stop) > MAX_STOP_STRINGS or any(not x or len(x) > MAX_STOP_CHARS for x in s.stop):
        raise HandoffError(f"at most {MAX_STOP_STRINGS} stop strings of 1-{MAX_STOP_CHARS} characters")
