"""Continuous-batching scheduler for decode: pure Python, no torch, no I/O.

Requests join at step boundaries when a batch row is free and the KV budget allows, and leave as
soon as they finish. Running requests occupy rows [0, n) of the KV cache; when one leaves, the last
row moves into its place, so the runner always computes over a dense prefix of rows.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from prad.errors import QueueFullError


class SeqStatus(enum.Enum):
    WAITING_FOR_SLOT = "waiting"
    RUNNING = "running"
    FINISHED_STOP = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self not in (SeqStatus.WAITING_FOR_SLOT, SeqStatus.RUNNING)


@dataclass
class DecodeSequence:
    request_id: str  # unique request id
    num_prompt_tokens: int  # prompt length (the KV handed over covers exactly these)
    max_new_tokens: int  # output budget, first token included
    output_token_ids: list[int]  # generated so far; starts with the prefill's first token
    payload: Any = None  # engine-side state (handoff, sink, detokenizer); opaque here
    status: SeqStatus = SeqStatus.WAITING_FOR_SLOT
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


class KVMove(NamedTuple):
    """Copy a running request's KV from row src to row dst (apply moves in the order given)."""

    src: int
    dst: int
    num_positions: int  # positions to copy, fixed when the move is made (the request may move again)


@dataclass
class ScheduleOutput:
    admitted: list[DecodeSequence] = field(default_factory=list)  # newly given a row: insert their KV
    aborted: list[DecodeSequence] = field(default_factory=list)  # removed this step
    moves: list[KVMove] = field(default_factory=list)  # KV copies keeping rows dense, in order
    running: list[DecodeSequence] = field(default_factory=list)  # rows 0..n-1 in row order


class DecodeScheduler:
    def __init__(self, max_batch_size: int, max_kv_tokens: int, max_waiting: int) -> None:
        if max_batch_size < 1 or max_kv_tokens < 1 or max_waiting < 0:
            raise ValueError(f"bad scheduler bounds: batch={max_batch_size} kv={max_kv_tokens} waiting={max_waiting}")
        self.max_batch_size = max_batch_size
        self.max_kv_tokens = max_kv_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[DecodeSequence] = deque()
        self.rows: list[DecodeSequence] = []  # running, index == row
        self.num_reserved_tokens = 0

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def add(self, seq: DecodeSequence) -> None:
        if seq.num_reserved_tokens > self.max_kv_tokens:
            raise ValueError(f"request needs {seq.num_reserved_tokens} KV tokens, budget is {self.max_kv_tokens}")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"decode queue full ({self.max_waiting} waiting)")
        self.waiting.append(seq)

    def can_allocate(self, seq: DecodeSequence) -> bool:
        return (len(self.rows) < self.max_batch_size
                and self.num_reserved_tokens + seq.num_reserved_tokens <= self.max_kv_tokens)

    def schedule(self) -> ScheduleOutput:
        """Drop aborted requests, then admit waiting ones FIFO while rows and KV budget allow."""
        out = ScheduleOutput()
        for seq in [s for s in self.waiting if s.is_abort_requested]:
            self.waiting.remove(seq)
            seq.status = SeqStatus.FINISHED_ABORTED
            out.aborted.append(seq)
        for seq in [s for s in self.rows if s.is_abort_requested]:
            out.moves += self.finish(seq, SeqStatus.FINISHED_ABORTED)
            out.aborted.append(seq)
        while self.waiting and self.can_allocate(self.waiting[0]):
            seq = self.waiting.popleft()
            seq.status, seq.row = SeqStatus.RUNNING, len(self.rows)
            self.rows.append(seq)
            self.num_reserved_tokens += seq.num_reserved_tokens
            out.admitted.append(seq)
        out.running = list(self.rows)
        return out

    def drop_all(self) -> list[DecodeSequence]:
        """Remove every waiting and running sequence (the engine stopped); returns them."""
        dropped = [*self.waiting, *self.rows]
        self.waiting.clear()
        self.rows.clear()
        self.num_reserved_tokens = 0
        for seq in dropped:
            seq.status, seq.row = SeqStatus.FINISHED_ABORTED, None
        return dropped

    def finish(self, seq: DecodeSequence, status: SeqStatus) -> list[KVMove]:
        """Release a running sequence's row; returns the KV move that keeps rows dense."""
        assert status.is_finished and seq.row is not None and self.rows[seq.row] is seq
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
        seq.status, seq.row = status, None
        return moves


