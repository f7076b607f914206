"""The decode engine: a thread running schedule -> execute -> update over one continuous batch.

Failures stay with the request that caused them: a handoff is validated before admission (token ids,
sampling ranges, layout), and inserting its KV, sampling its token, detokenizing and delivering its
events fail that request alone. A step that raises (not attributable to a row) fails the requests of
that step, never the engine; see serving/engine_loop.py for what happens when the loop itself fails.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from decode_service.runner import DecodeRunner
from decode_service.scheduler import DecodeScheduler, DecodeSequence, KVMove, ScheduleOutput
from kv_transfer.base import DecodeBackend, EventSink, TokenEvent
from kv_transfer.handoff import HandoffError, KVHandoff, KVLayout, check_handoff
from kv_transfer.outcome import ErrorKind, FinishReason
from prad.detokenizer import Detokenizer
from prad.device_sampling import sample_batch_on_device
from prad.loading import LoadedModel
from prad.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams, sample_batch, sample_one
from serving.engine_loop import DEFAULT_STALL_TIMEOUT_S, EngineLoop
from serving.metrics import Metrics
from serving.mixing import ChunkSource, ChunkWork

log = logging.getLogger(__name__)


@dataclass
class DecodeConfig:
    max_batch_size: int = 32  # rows decoded together
    max_seq_len: int = 2048  # prompt + output positions per request
    max_kv_tokens: int = 32 * 2048  # sum of reserved positions over running requests
    max_waiting: int = 256  # handoffs queued for a row; beyond that, refused (queue_full)
    # auto: static step + CUDA graphs on CUDA, CPU backend on CPU; off: no graphs (eager reference step on
    # CUDA); static: static step without graphs on any device (decode_service/runner.choose_step_backend)
    decode_graphs: str = "auto"
    # role all: prompt tokens each step computes in its own pass for a prefill engine (serving/mixing.py)
    mixed_prefill_tokens: int = 0


@dataclass(kw_only=True)
class Sequence(DecodeSequence):
    """A decode sequence with what the engine needs besides the scheduler's view of it."""

    sampling: SamplingParams
    sink: EventSink  # where its events go (a transport's)
    detok: Detokenizer  # incremental text and stop strings
    arrived_s: float  # time.monotonic() at submission
    kv: torch.Tensor | None  # the handed-over prompt KV, until it is in the cache


Tokens = list[int | Exception]  # one sampled token per row, or the exception that row raised


class DecodeEngine(EngineLoop[ScheduleOutput[Sequence], list[Sequence], Tokens], DecodeBackend):
    thread_name = "decode-engine"

    def __init__(self, loaded: LoadedModel, config: DecodeConfig,
                 compute_lock: AbstractContextManager[object] | None = None, metrics: Metrics | None = None,
                 stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> None:
        self.loaded = loaded
        self.config = config
        self.metrics = metrics or Metrics()
        self.runner = DecodeRunner(loaded.model, config.max_batch_size, config.max_seq_len, config.decode_graphs)
        # On a GPU the batch is sampled where the logits are (one read-back per step); on a CPU the host
        # sampler is as fast and skips the work the device one does for both branches of each choice.
        self._sample_rows = sample_batch_on_device if loaded.model.device.type == "cuda" else sample_batch
        self.scheduler: DecodeScheduler[Sequence] = DecodeScheduler(
            config.max_batch_size, config.max_kv_tokens, config.max_waiting, loaded.config.eos_token_ids)
        self.compute_lock = compute_lock or nullcontext()
        super().__init__(stall_timeout_s)
        self._by_id: dict[str, Sequence] = {}
        c = loaded.config
        self.num_steps = 0
        self.chunk_source: ChunkSource | None = None  # role all with mixed_prefill_tokens (serving/mixing.py)
        self.on_idle: Callable[[], None] | None = None  # called when a step leaves no request running
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
        s = handoff.sampling
        seq = Sequence(handoff.request_id, len(handoff.prompt_token_ids), s.max_new_tokens, [],
                       ignore_eos=s.ignore_eos, deadline_s=handoff.deadline_s, sampling=s, sink=sink,
                       detok=Detokenizer(self.loaded.tokenizer, s.stop), arrived_s=time.monotonic(), kv=handoff.kv)
        with self._lock:
            if handoff.request_id in self._by_id:
                raise ValueError(f"duplicate request id {handoff.request_id!r}")
            self.scheduler.check_room(seq)  # QueueFullError before any event is sent
            # The first token is already sampled: emit it, and queue the request only if it goes on.
            self._accept_token(seq, handoff.first_token_id)
            if seq.is_finished:
                return
            self.scheduler.add(seq)
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

    # --- the loop's steps ------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _schedule(self) -> ScheduleOutput[Sequence]:
        """Drop aborted requests and admit waiting ones (lock held)."""
        out = self.scheduler.schedule()
        for seq in out.aborted:
            self._emit_aborted(seq)
        return out

    def _step(self, out: ScheduleOutput[Sequence]) -> None:
        """Bring the KV cache in line with the schedule, then decode one token for every running row."""
        self._move_kv(out.moves)
        self._admit(out.admitted)
        with self._lock:
            running = list(self.scheduler.rows)
            self._observe(len(running))
        if running:
            self._run(running)
        with self._lock:
            self._observe(self.scheduler.num_running)  # gauges stay true when the loop goes idle
            is_idle = self.scheduler.num_running == 0
        if is_idle and self.on_idle is not None:
            self.on_idle()

    def _admit(self, admitted: list[Sequence]) -> None:
        """Copy each admitted request's KV into its row; a request that cannot be admitted fails alone."""
        for seq in admitted:
            try:
                self.runner.ensure_capacity(seq.num_reserved_tokens)
                if seq.kv is None or seq.row is None:
                    raise RuntimeError("admitted without KV or row")
                self.runner.insert(seq.row, seq.kv)
            except Exception as e:  # e.g. no memory for a longer cache
                log.exception("admitting request %s failed", seq.request_id)
                with self._lock:
                    moves = self._fail(seq, ErrorKind.INTERNAL, f"decode could not admit the request: {e}")
                self._move_kv(moves)
            seq.kv = None  # the cache holds it now (or it failed)

    def is_decoding(self) -> bool:
        """Whether requests are running (read without the lock: a hint for a prefill engine)."""
        return self.scheduler.num_running > 0

    def _execute(self, running: list[Sequence]) -> Tokens:
        ids, positions = [s.output_token_ids[-1] for s in running], [s.last_position for s in running]
        work = self._take_chunks()
        chunk_logits: torch.Tensor | None = None
        failure: Exception | None = None
        with self.compute_lock:
            if work is not None:
                try:
                    logits, chunk_logits = self.runner.decode_mixed(ids, positions, work.chunks)
                except Exception as e:  # the chunks go back to prefill; the rows are stepped alone
                    failure = e
            if chunk_logits is None:
                logits = self.runner.decode(ids, positions)
        if work is not None:
            self._finish_chunks(work, chunk_logits, failure)
        self.num_steps += 1
        return self._sample(logits, running)

    def _take_chunks(self) -> ChunkWork | None:
        budget = self.config.mixed_prefill_tokens
        if self.chunk_source is None or budget <= 0:
            return None
        try:
            return self.chunk_source(budget)
        except Exception:  # prefill's own passes take them once decode is idle
            log.exception("taking prompt chunks for a decode step failed")
            return None

    @staticmethod
    def _finish_chunks(work: ChunkWork, logits: torch.Tensor | None, failure: Exception | None) -> None:
        try:
            if logits is not None:
                work.done(logits)
            else:
                work.failed(failure or RuntimeError("no logits"))
        except Exception:
            log.exception("finishing the prompt chunks of a decode step failed")

    def _sample(self, logits: torch.Tensor, running: list[Sequence]) -> Tokens:
        """One token per row, or the exception that row raised (sampled alone after a batch failure)."""
        params = [s.sampling for s in running]
        indices = [len(s.output_token_ids) for s in running]
        try:
            return list(self._sample_rows(logits, params, indices))
        except Exception:
            return [_sample_or_error(logits[i], params[i], indices[i]) for i in range(len(running))]

    def _update(self, running: list[Sequence], tokens: Tokens) -> None:
        moves: list[KVMove] = []
        with self._lock:
            for seq, token in zip(running, tokens, strict=True):
                if seq.is_finished:  # failed while the step ran
                    continue
                if isinstance(token, Exception):
                    moves += self._fail(seq, ErrorKind.INTERNAL, f"sampling failed: {token}")
                else:
                    moves += self._accept_token(seq, token)
        self._move_kv(moves)

    def _step_failed(self, running: list[Sequence], error: Exception) -> None:
        self.metrics.step_failures.labels("decode").inc()
        moves: list[KVMove] = []
        with self._lock:
            for seq in running:
                if not seq.is_finished:
                    moves += self._fail(seq, ErrorKind.INTERNAL, f"decode step failed: {error}", is_row_failure=False)
        self._move_kv(moves)

    def _fail_all(self, message: str) -> None:
        """Every waiting and running request gets an error event; the scheduler is emptied (lock held)."""
        for seq in self.scheduler.drop_all():
            self._emit(seq, TokenEvent.failure(seq.request_id, ErrorKind.UNAVAILABLE, message))
        self._by_id.clear()

    def _move_kv(self, moves: list[KVMove]) -> None:
        """Apply the scheduler's row moves to the KV cache, in order (loop thread, lock not held)."""
        for move in moves:
            self.runner.move(*move)

    def _observe(self, batch_size: int) -> None:
        m, s = self.metrics, self.scheduler
        m.batch_size.set(batch_size)
        m.num_running.set(s.num_running)
        m.num_waiting.labels("decode").set(s.num_waiting)
        m.kv_usage.set(s.num_reserved_tokens / self.config.max_kv_tokens)

    # --- per-token bookkeeping (lock held) -----------------------------------------------------
    def _accept_token(self, seq: Sequence, token: int) -> list[KVMove]:
        """Detokenize a sampled token, let the scheduler decide whether the request ends with it, and
        emit its event. Returns the KV moves of a request that left its row."""
        try:
            text = seq.detok.add(token)
            moves = self.scheduler.append_token(seq, token, seq.detok.is_stopped, time.time())
            if seq.is_finished:
                text += seq.detok.flush()
        except Exception as e:
            log.exception("detokenizing request %s failed", seq.request_id)
            return self._fail(seq, ErrorKind.INTERNAL, f"detokenizing failed: {e}")
        index = len(seq.output_token_ids) - 1
        if not seq.is_finished:
            if self._emit(seq, TokenEvent(seq.request_id, [token], text, first_token_index=index)):
                return moves
            self._by_id.pop(seq.request_id, None)  # nobody can take its events any more
            return self.scheduler.end(seq, FinishReason.ABORT)
        self._by_id.pop(seq.request_id, None)
        self._emit(seq, TokenEvent(seq.request_id, [token], text, finish_reason=seq.finish_reason,
                                   num_prompt_tokens=seq.num_prompt_tokens,
                                   num_output_tokens=len(seq.output_token_ids),
                                   timings={"decode_s": time.monotonic() - seq.arrived_s}, first_token_index=index))
        return moves

    def _emit(self, seq: Sequence, event: TokenEvent) -> bool:
        """Deliver one event; False when the consumer cannot take it (the request is then dropped)."""
        try:
            seq.sink(event)
        except Exception:
            log.warning("could not deliver an event of request %s; dropping it", seq.request_id, exc_info=True)
            self.metrics.row_failures.labels("decode").inc()
            return False
        return True

    def _emit_aborted(self, seq: Sequence) -> None:
        self._by_id.pop(seq.request_id, None)
        self._emit(seq, TokenEvent(seq.request_id, [], seq.detok.flush(), finish_reason=FinishReason.ABORT,
                                   num_prompt_tokens=seq.num_prompt_tokens,
                                   num_output_tokens=len(seq.output_token_ids),
                                   first_token_index=len(seq.output_token_ids)))

    def _fail(self, seq: Sequence, kind: ErrorKind, message: str, is_row_failure: bool = True) -> list[KVMove]:
        """End one request with an error event, wherever it is; returns the KV moves if it left a row."""
        if is_row_failure:
            self.metrics.row_failures.labels("decode").inc()
        self._by_id.pop(seq.request_id, None)
        moves = self.scheduler.end(seq, FinishReason.ERROR)
        self._emit(seq, TokenEvent.failure(seq.request_id, kind, message))
        return moves


def _sample_or_error(logits: torch.Tensor, params: SamplingParams, index: int) -> int | Exception:
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
