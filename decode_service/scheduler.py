"""Continuous-batching scheduler for decode: pure Python, no torch, no I/O.

Requests join at step boundaries when a batch row is free and the KV budget allows, and leave as
soon as they finish. Running requests occupy rows [0, n) of the KV cache; when one leaves, the last
row moves into its place, so the runner always computes over a dense prefix of rows. The scheduler
also decides when a request ends: each sampled token goes through `append_token`, which applies
EOS, stop strings (seen by the engine's detokenizer), the output budget and the deadline.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from kv_transfer.outcome import FinishReason, QueueFullError


class SeqStatus(enum.Enum):
    WAITING_FOR_SLOT = "waiting"
    RUNNING = "running"
    FINISHED = "finished"  # finish_reason says why


@dataclass
class DecodeSequence:
    request_id: str  # unique request id
    num_prompt_tokens: int  # prompt length (the KV handed over covers exactly these)
    max_new_tokens: int  # output budget, first token included
    output_token_ids: list[int]  # generated so far; starts with the prefill's first token
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    deadline_s: float | None = None  # absolute time.time() after which the request is aborted
    status: SeqStatus = SeqStatus.WAITING_FOR_SLOT
    finish_reason: FinishReason | None = None  # set when status is FINISHED
    row: int | None = None  # KV cache row while RUNNING
    is_abort_requested: bool = False

    @property
    def num_reserved_tokens(self) -> int:
        """KV positions this request may ever use (reserved up front: no preemption needed)."""
        return self.num_prompt_tokens + self.max_new_tokens

    @property
    def last_position(self) -> int:
        """Position of the newest output token, the one the next step feeds in."""
        return self.num_prompt_tokens + len(self.output_token_ids) - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


S = TypeVar("S", bound=DecodeSequence)  # the engine's own sequence type (it adds its I/O state)


def stop_reason(seq: DecodeSequence, token: int, is_stop_text: bool, eos_token_ids: Collection[int],
                now_s: float) -> FinishReason | None:
    """Why the request ends with `token` (already appended), or None if it goes on."""
    if is_stop_text or (token in eos_token_ids and not seq.ignore_eos):
        return FinishReason.STOP
    if len(seq.output_token_ids) >= seq.max_new_tokens:
        return FinishReason.LENGTH
    if seq.deadline_s is not None and now_s > seq.deadline_s:
        return FinishReason.ABORT
    return None


class KVMove(NamedTuple):
    """Copy a running request's KV from row src to row dst (apply moves in the order given)."""

    src: int
    dst: int
    num_positions: int  # positions to copy, fixed when the move is made (the request may move again)


@dataclass
class ScheduleOutput(Generic[S]):
    admitted: list[S] = field(default_factory=list)  # newly given a row: insert their KV
    aborted: list[S] = field(default_factory=list)  # removed this step
    moves: list[KVMove] = field(default_factory=list)  # KV copies keeping rows dense, in order
    running: list[S] = field(default_factory=list)  # rows 0..n-1 in row order


class DecodeScheduler(Generic[S]):
    def __init__(self, max_batch_size: int, max_kv_tokens: int, max_waiting: int,
                 eos_token_ids: Collection[int] = ()) -> None:
        if max_batch_size < 1 or max_kv_tokens < 1 or max_waiting < 0:
            raise ValueError(f"bad scheduler bounds: batch={max_batch_size} kv={max_kv_tokens} waiting={max_waiting}")
        self.max_batch_size = max_batch_size
        self.max_kv_tokens = max_kv_tokens
        self.max_waiting = max_waiting
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[S] = deque()
        self.rows: list[S] = []  # running, index == row
        self.num_reserved_tokens = 0

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def check_room(self, seq: S) -> None:
        """Raise unless `add(seq)` would succeed now: ValueError if it can never fit, QueueFullError when
        the queue is at its bound."""
        if seq.num_reserved_tokens > self.max_kv_tokens:
            raise ValueError(f"request needs {seq.num_reserved_tokens} KV tokens, budget is {self.max_kv_tokens}")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"decode queue full ({self.max_waiting} waiting)")

    def add(self, seq: S) -> None:
        self.check_room(seq)
        self.waiting.append(seq)

    def can_allocate(self, seq: S) -> bool:
        return (len(self.rows) < self.max_batch_size
                and self.num_reserved_tokens + seq.num_reserved_tokens <= self.max_kv_tokens)

    def schedule(self) -> ScheduleOutput[S]:
        """Drop aborted requests, then admit waiting ones FIFO while rows and KV budget allow."""
        out: ScheduleOutput[S] = ScheduleOutput()
        for seq in [s for s in self.waiting if s.is_abort_requested]:
            self.waiting.remove(seq)
            _mark_finished(seq, FinishReason.ABORT)
            out.aborted.append(seq)
        for seq in [s for s in self.rows if s.is_abort_requested]:
            out.moves += self.finish(seq, FinishReason.ABORT)
            out.aborted.append(seq)
        while self.waiting and self.can_allocate(self.waiting[0]):
            seq = self.waiting.popleft()
            seq.status, seq.row = SeqStatus.RUNNING, len(self.rows)
            self.rows.append(seq)
            self.num_reserved_tokens += seq.num_reserved_tokens
            out.admitted.append(seq)
        out.running = list(self.rows)
        return out

    def drop_all(self, reason: FinishReason = FinishReason.ERROR) -> list[S]:
        """Remove every waiting and running sequence (the engine stopped); returns them."""
        dropped = [*self.waiting, *self.rows]
        self.waiting.clear()
        self.rows.clear()
        self.num_reserved_tokens = 0
        for seq in dropped:
            _mark_finished(seq, reason)
        return dropped

    def append_token(self, seq: S, token: int, is_stop_text: bool, now_s: float) -> list[KVMove]:
        """Record a sampled token and decide whether the request ends with it (EOS or a stop string, the
        output budget, the deadline). A finished request leaves at once: a running one frees its row
        (the returned moves keep rows dense), one not admitted yet (its first token) is never queued."""
        seq.output_token_ids.append(token)
        reason = stop_reason(seq, token, is_stop_text, self.eos_token_ids, now_s)
        return [] if reason is None else self.end(seq, reason)

    def end(self, seq: S, reason: FinishReason) -> list[KVMove]:
        """End a request wherever it is: running (its row is freed; the returned moves keep rows dense),
        waiting (it leaves the queue), or not queued yet."""
        if seq.status is SeqStatus.RUNNING:
            return self.finish(seq, reason)
        if seq.status is SeqStatus.WAITING_FOR_SLOT and seq in self.waiting:
            self.waiting.remove(seq)
        _mark_finished(seq, reason)
        return []

    def finish(self, seq: S, reason: FinishReason) -> list[KVMove]:
        """Release a running sequence's row; returns the KV move that keeps rows dense."""
        assert seq.status is SeqStatus.RUNNING and seq.row is not None and self.rows[seq.row] is seq
        row, last = seq.row, len(self.rows) - 1
        moves: list[KVMove] = []
        if row != last:
            moved = self.rows[last]
            self.rows[row], moved.row = moved, row
            # Through the newest position: whether or not this step's token is appended yet,
            # every position that holds KV comes along.
            moves.append(KVMove(last, row, moved.last_position + 1))
        self.rows.pop()
        self.num_reserved_tokens -= seq.num_reserved_tokens
        _mark_finished(seq, reason)
        return moves


def _mark_finished(seq: DecodeSequence, reason: FinishReason) -> None:
    seq.status, seq.finish_reason, seq.row = SeqStatus.FINISHED, reason, None


