"""The decode engine: a thread running schedule -> execute -> update over one continuous batch."""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from decode_service.runner import DecodeRunner
from decode_service.scheduler import DecodeScheduler, DecodeSequence, SeqStatus
from kv_transfer.base import DecodeBackend, EventSink, TokenEvent
from kv_transfer.handoff import KVHandoff, KVLayout, check_handoff
from prad.detokenizer import Detokenizer
from prad.engine_loop import EngineLoop
from prad.loading import LoadedModel
from prad.metrics import Metrics
from prad.sampling import sample_batch

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
                 compute_lock: AbstractContextManager[object] | None = None, metrics: Metrics | None = None) -> None:
        self.loaded = loaded
        self.config = config
        self.metrics = metrics or Metrics()
        self.runner = DecodeRunner(loaded.model, config.max_batch_size, config.max_seq_len)
        self.scheduler = DecodeScheduler(config.max_batch_size, config.max_kv_tokens, config.max_waiting)
        self.compute_lock = compute_lock or nullcontext()
        super().__init__()
        self._by_id: dict[str, DecodeSequence] = {}
        c = loaded.config
        self.num_steps = 0
        self.expected_layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, str(loaded.model.dtype)
                                        .removeprefix("torch."), 0)

    # --- DecodeBackend ---------------------------------------------------------------------
    def submit(self, handoff: KVHandoff, sink: EventSink) -> None:
        check_handoff(handoff, self.loaded.fingerprint, self.expected_layout)
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
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self.scheduler.has_work() and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    self._abort_all()
                    return
                out = self.scheduler.schedule()
                for seq in out.aborted:
                    self._finish_event(seq)
                for move in out.moves:
                    self.runner.move(*move)
                for seq in out.admitted:
                    self.runner.ensure_capacity(seq.num_reserved_tokens)
                    self.runner.insert(seq.row, seq.payload.handoff.kv)
                    seq.payload.handoff.kv = None  # the cache holds it now
                running = out.running
                self._observe(len(running))
            if not running:
                continue
            try:
                tokens = self._execute(running)
            except Exception as e:  # a failed step fails its requests, never the engine
                log.exception("decode step failed")
                self._fail(running, f"decode step failed: {e}")
                continue
            self._update(running, tokens)
            with self._lock:
                self._observe(self.scheduler.num_running)  # gauges stay true when the loop goes idle

    def _observe(self, batch_size: int) -> None:
        m, s = self.metrics, self.scheduler
        m.batch_size.set(batch_size)
        m.num_running.set(s.num_running)
        m.num_waiting.labels("decode").set(s.num_waiting)
        m.kv_usage.set(s.num_reserved_tokens / self.config.max_kv_tokens)

    def _execute(self, running: list[DecodeSequence]) -> list[int]:
        with self.compute_lock:
            logits = self.runner.decode([s.output_token_ids[-1] for s in running],
                                        [s.last_position for s in running])
        self.num_steps += 1
        return sample_batch(logits, [s.payload.handoff.sampling for s in running],
                            [len(s.output_token_ids) for s in running])

    def _update(self, running: list[DecodeSequence], tokens: list[int]) -> None:
        with self._lock:
            for seq, token in zip(running, tokens, strict=True):
                if seq.status is SeqStatus.RUNNING and self._accept_token(seq, token):
                    for move in self.scheduler.finish(seq, seq.status):
                        self.runner.move(*move)

    # --- per-token bookkeeping ----------------------------------------------------------------
    def _accept_token(self, seq: DecodeSequence, token: int) -> bool:
        """Record a token, emit its text; True when the request has finished (event sent)."""
        job: _Job = seq.payload
        seq.output_token_ids.append(token)
        params = job.handoff.sampling
        text = job.detok.add(token)
        reason = None
        if job.detok.is_stopped or (token in self.loaded.config.eos_token_ids and not params.ignore_eos):
            reason = "stop"
        elif len(seq.output_token_ids) >= params.max_new_tokens:
            reason = "length"
        elif job.handoff.deadline_s is not None and time.time() > job.handoff.deadline_s:
            reason = "abort"
        index = len(seq.output_token_ids) - 1
        if reason is None:
            job.sink(TokenEvent(seq.request_id, [token], text, first_token_index=index))
            return False
        job.sink(TokenEvent(seq.request_id, [token], text + job.detok.flush(), finish_reason=reason,
                            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=len(seq.output_token_ids),
                            timings={"decode_s": time.monotonic() - job.arrived_s}, first_token_index=index))
        self._by_id.pop(seq.request_id, None)
        seq.status = self._status_for(reason)
        return True

    @staticmethod
    def _status_for(reason: str) -> SeqStatus:
        return {"stop": SeqStatus.FINISHED_STOP, "length": SeqStatus.FINISHED_LENGTH}.get(
            reason, SeqStatus.FINISHED_ABORTED)

    def _finish_event(self, seq: DecodeSequence) -> None:
        self._by_id.pop(seq.request_id, None)
        seq.payload.sink(TokenEvent(seq.request_id, [], seq.payload.detok.flush(), finish_reason="abort",
                                    num_prompt_tokens=seq.num_prompt_tokens,
                                    num_output_tokens=len(seq.output_token_ids),
                                    first_token_index=len(seq.output_token_ids)))

    def _fail(self, running: list[DecodeSequence], message: str) -> None:
        with self._lock:
            for seq in running:
                if seq.status is SeqStatus.RUNNING:
                    self.scheduler.finish(seq, SeqStatus.FINISHED_ABORTED)
                self._by_id.pop(seq.request_id, None)
                seq.payload.sink(TokenEvent(seq.request_id, [], "", finish_reason="error", error=message,
                                            error_status=500))

    def _abort_all(self) -> None:
        for seq in list(self.scheduler.waiting) + list(self.scheduler.rows):
            seq.payload.sink(TokenEvent(seq.request_id, [], "", finish_reason="error",
                                        error="decode service shutting down", error_status=503))



