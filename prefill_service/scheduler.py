"""Prefill batch planning: pure Python, no torch, no I/O.

Each step takes waiting requests FIFO into one batch under a token budget, mixing tasks freely.
A prompt longer than what is left of the budget is cut into chunks (chunked prefill): it takes what
fits now and continues next step over the KV of its earlier chunks, so one long prompt cannot stall
everyone behind it.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kv_transfer.outcome import QueueFullError


class PrefillStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"  # some chunks done
    DONE = "done"  # prompt complete: it left the scheduler, the engine hands its KV over
    ABORTED = "aborted"  # aborted or failed before its prompt completed


@dataclass
class ScheduledRequest:
    """What scheduling needs of a request (the engine's PrefillRequest adds adapter, sampling, sink)."""

    request_id: str
    task: str
    prompt_token_ids: list[int]
    num_computed_tokens: int = 0  # prompt tokens whose KV exists already (earlier chunks)
    status: PrefillStatus = PrefillStatus.WAITING
    is_abort_requested: bool = False
    is_scheduled: bool = False  # a chunk of it is being computed (not offered again until updated)

    @property
    def num_remaining_tokens(self) -> int:
        return len(self.prompt_token_ids) - self.num_computed_tokens


R = TypeVar("R", bound=ScheduledRequest)  # the engine's own request type (it adds adapter, sampling, sink)


@dataclass
class PrefillChunk(Generic[R]):
    request: R
    start: int  # first prompt position computed in this step
    end: int  # one past the last

    @property
    def is_last(self) -> bool:
        """This chunk completes the prompt: the step samples the first output token."""
        return self.end == len(self.request.prompt_token_ids)


@dataclass
class PrefillBatch(Generic[R]):
    chunks: list[PrefillChunk[R]] = field(default_factory=list)
    aborted: list[R] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)


class PrefillScheduler(Generic[R]):
    def __init__(self, max_prefill_tokens: int, max_batch_size: int, max_waiting: int) -> None:
        if max_prefill_tokens < 1 or max_batch_size < 1 or max_waiting < 1:
            raise ValueError(f"bad prefill bounds: tokens={max_prefill_tokens} batch={max_batch_size} "
                             f"waiting={max_waiting}")
        self.max_prefill_tokens = max_prefill_tokens
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.waiting: deque[R] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_schedulable(self) -> bool:
        """Whether some waiting request has no chunk being computed (or an abort to deliver)."""
        return any(not r.is_scheduled or r.is_abort_requested for r in self.waiting)

    def add(self, request: R) -> None:
        if not request.prompt_token_ids:
            raise ValueError("empty prompt")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"prefill queue full ({self.max_waiting} waiting)")
        self.waiting.append(request)

    def schedule(self, max_tokens: int | None = None) -> PrefillBatch[R]:
        """The next pass: aborted requests out, then waiting ones FIFO under the token budget
        (`max_tokens` when given, at most max_prefill_tokens), the last one chunked to fit; requests
        with a chunk being computed elsewhere are skipped."""
        batch: PrefillBatch[R] = PrefillBatch()
        for request in [r for r in self.waiting if r.is_abort_requested and not r.is_scheduled]:
            self.waiting.remove(request)
            request.status = PrefillStatus.ABORTED
            batch.aborted.append(request)
        budget = self.max_prefill_tokens if max_tokens is None else max(1, min(max_tokens, self.max_prefill_tokens))
        for request in self.waiting:
            if budget == 0 or len(batch.chunks) == self.max_batch_size:
                break
            if request.is_scheduled:  # being computed by another pass (a decode step's, role all)
                continue
            request.is_scheduled = True
            take = min(request.num_remaining_tokens, budget)
            batch.chunks.append(PrefillChunk(request, request.num_computed_tokens,
                                             request.num_computed_tokens + take))
            budget -= take
        return batch

    def drop(self, request: R) -> None:
        """Remove a request that failed (no-op if it already left the queue)."""
        if request in self.waiting:
            self.waiting.remove(request)
        request.is_scheduled = False
        request.status = PrefillStatus.ABORTED

    def drop_all(self) -> list[R]:
        """Remove and return every waiting request (the engine stopped)."""
        dropped = list(self.waiting)
        self.waiting.clear()
        for request in dropped:
            request.status = PrefillStatus.ABORTED
        return dropped

    def update(self, batch: PrefillBatch[R]) -> list[R]:
        """Record the step's progress; returns requests whose prompt is now complete (dequeued)."""
        done = []
        for chunk in batch.chunks:
            chunk.request.is_scheduled = False
            chunk.request.num_computed_tokens = chunk.end
            if chunk.is_last:
                chunk.request.status = PrefillStatus.DONE
                self.waiting.remove(chunk.request)
                done.append(chunk.request)
            else:
                chunk.request.status = PrefillStatus.PREFILLING
        return done


