"""Prefill scheduler: FIFO mixed-task batches under a token budget, chunked prefill, aborts, bounds."""

from __future__ import annotations

import pytest

from kv_transfer.outcome import QueueFullError
from prefill_service.scheduler import PrefillBatch, PrefillChunk, PrefillScheduler, PrefillStatus, ScheduledRequest


def _req(request_id: str, num_tokens: int, task: str = "t") -> ScheduledRequest:
    return ScheduledRequest(request_id, task, list(range(1, num_tokens + 1)))


def _spans(batch: PrefillBatch) -> list[tuple[str, int, int, bool]]:
    return [(c.request.request_id, c.start, c.end, c.is_last) for c in batch.chunks]


def _ids(requests: list[ScheduledRequest]) -> list[str]:
    return [r.request_id for r in requests]


def test_bad_bounds_are_rejected() -> None:
    for tokens, batch, waiting in [(0, 1, 1), (1, 0, 1), (1, 1, 0)]:
        with pytest.raises(ValueError):
            PrefillScheduler(tokens, batch, waiting)


def test_empty_prompt_is_a_value_error() -> None:
    sched = PrefillScheduler(max_prefill_tokens=16, max_batch_size=4, max_waiting=4)
    with pytest.raises(ValueError):
        sched.add(ScheduledRequest("empty", "t", []))
    assert sched.num_waiting == 0


def test_queue_bound_raises_queue_full() -> None:
    sched = PrefillScheduler(max_prefill_tokens=16, max_batch_size=4, max_waiting=2)
    sched.add(_req("a", 3))
    sched.add(_req("b", 3))
    with pytest.raises(QueueFullError):
        sched.add(_req("c", 3))
    assert _ids(list(sched.waiting)) == ["a", "b"]

    sched.update(sched.schedule())  # both complete and leave the queue
    assert sched.num_waiting == 0
    sched.add(_req("c", 3))
    assert _ids(list(sched.waiting)) == ["c"]


def test_batch_mixes_tasks_fifo_under_the_token_budget() -> None:
    sched = PrefillScheduler(max_prefill_tokens=10, max_batch_size=8, max_waiting=8)
    reqs = [_req("a", 3, "summarize"), _req("b", 4, "translate"), _req("c", 3, "summarize"), _req("d", 2, "qa")]
    for r in reqs:
        sched.add(r)

    batch = sched.schedule()
    # 3 + 4 + 3 == 10: the budget is used exactly, d waits (no zero-length chunk for it).
    assert _spans(batch) == [("a", 0, 3, True), ("b", 0, 4, True), ("c", 0, 3, True)]
    assert {c.request.task for c in batch.chunks} == {"summarize", "translate"}
    assert batch.num_tokens == 10
    assert batch.aborted == []
    # Scheduling alone changes nothing.
    assert all(r.num_computed_tokens == 0 and r.status is PrefillStatus.WAITING for r in reqs)

    done = sched.update(batch)
    assert _ids(done) == ["a", "b", "c"]
    assert all(r.status is PrefillStatus.DONE for r in done)
    assert all(r.num_computed_tokens == len(r.prompt_token_ids) for r in done)
    assert _ids(list(sched.waiting)) == ["d"]

    batch = sched.schedule()
    assert _spans(batch) == [("d", 0, 2, True)]


def test_batch_is_bounded_by_max_batch_size() -> None:
    sched = PrefillScheduler(max_prefill_tokens=100, max_batch_size=2, max_waiting=8)
    for i in range(5):
        sched.add(_req(f"r{i}", 2))
    seen: list[list[str]] = []
    while sched.num_waiting:
        batch = sched.schedule()
        assert len(batch.chunks) <= 2
        seen.append(_ids(sched.update(batch)))
    assert seen == [["r0", "r1"], ["r2", "r3"], ["r4"]]


def test_request_that_does_not_fit_is_chunked_and_finishes_next_step() -> None:
    sched = PrefillScheduler(max_prefill_tokens=10, max_batch_size=8, max_waiting=8)
    a, b, c = _req("a", 6), _req("b", 6), _req("c", 1)
    for r in (a, b, c):
        sched.add(r)

    batch = sched.schedule()
    assert _spans(batch) == [("a", 0, 6, True), ("b", 0, 4, False)]
    assert batch.num_tokens == 10
    assert _ids(sched.update(batch)) == ["a"]
    assert b.num_computed_tokens == 4 and b.num_remaining_tokens == 2
    assert b.status is PrefillStatus.PREFILLING
    assert _ids(list(sched.waiting)) == ["b", "c"]

    # b keeps its place at the head of the queue and continues where it stopped.
    batch = sched.schedule()
    assert _spans(batch) == [("b", 4, 6, True), ("c", 0, 1, True)]
    assert _ids(sched.update(batch)) == ["b", "c"]
    assert b.status is PrefillStatus.DONE and b.num_remaining_tokens == 0
    assert sched.num_waiting == 0
    assert sched.schedule().chunks == []


def test_long_prompt_is_chunked_across_steps() -> None:
    sched = PrefillScheduler(max_prefill_tokens=8, max_batch_size=4, max_waiting=4)
    long = _req("long", 21)
    sched.add(long)

    expected = [(0, 8, False), (8, 16, False), (16, 21, True)]
    for step, (start, end, is_last) in enumerate(expected):
        batch = sched.schedule()
        assert _spans(batch) == [("long", start, end, is_last)]
        assert long.num_computed_tokens == start
        done = sched.update(batch)
        assert long.num_computed_tokens == end
        if is_last:
            assert done == [long]
            assert long.status is PrefillStatus.DONE
            assert sched.num_waiting == 0
        else:
            assert done == []
            assert long.status is PrefillStatus.PREFILLING
            assert list(sched.waiting) == [long], f"left the queue early at step {step}"


def test_long_prompt_does_not_stall_requests_behind_it_forever() -> None:
    """Chunks of a long prompt, then the short ones behind it, share budget FIFO."""
    sched = PrefillScheduler(max_prefill_tokens=8, max_batch_size=4, max_waiting=4)
    sched.add(_req("long", 13))
    sched.add(_req("short", 2))
    first = sched.schedule()
    assert _spans(first) == [("long", 0, 8, False)]
    sched.update(first)
    second = sched.schedule()
    assert _spans(second) == [("long", 8, 13, True), ("short", 0, 2, True)]
    assert _ids(sched.update(second)) == ["long", "short"]


def test_aborted_waiting_requests_appear_in_batch_aborted() -> None:
    sched = PrefillScheduler(max_prefill_tokens=10, max_batch_size=4, max_waiting=4)
    a, b, c = _req("a", 4), _req("b", 4), _req("c", 4)
    for r in (a, b, c):
        sched.add(r)
    b.is_abort_requested = True

    batch = sched.schedule()
    assert _ids(batch.aborted) == ["b"]
    assert b.status is PrefillStatus.ABORTED
    # The aborted request takes no budget: a and c fit where b would have been.
    assert _spans(batch) == [("a", 0, 4, True), ("c", 0, 4, True)]
    assert _ids(list(sched.waiting)) == ["a", "c"]
    sched.update(batch)

    # Reported once only.
    assert sched.schedule().aborted == []


def test_abort_of_a_partly_prefilled_request() -> None:
    sched = PrefillScheduler(max_prefill_tokens=4, max_batch_size=4, max_waiting=4)
    long, short = _req("long", 10), _req("short", 3)
    sched.add(long)
    sched.add(short)
    sched.update(sched.schedule())
    assert long.status is PrefillStatus.PREFILLING and long.num_computed_tokens == 4

    long.is_abort_requested = True
    batch = sched.schedule()
    assert batch.aborted == [long] and long.status is PrefillStatus.ABORTED
    assert _spans(batch) == [("short", 0, 3, True)]
    assert sched.update(batch) == [short]
    assert sched.num_waiting == 0


def test_update_removes_the_right_request_when_two_look_alike() -> None:
    """Two requests with equal fields (same id, same prompt) are still different queue entries."""
    sched = PrefillScheduler(max_prefill_tokens=6, max_batch_size=4, max_waiting=4)
    first, second = _req("dup", 4), _req("dup", 4)
    sched.add(first)
    sched.add(second)
    batch = sched.schedule()
    assert _spans(batch) == [("dup", 0, 4, True), ("dup", 0, 2, False)]
    done = sched.update(batch)
    assert len(done) == 1 and done[0] is first
    assert len(sched.waiting) == 1 and sched.waiting[0] is second


def test_chunk_is_last_and_remaining_tokens() -> None:
    req = _req("r", 5)
    assert req.num_remaining_tokens == 5
    assert not PrefillChunk(req, 0, 4).is_last
    assert PrefillChunk(req, 0, 5).is_last
    assert PrefillChunk(req, 4, 5).is_last
    req.num_computed_tokens = 3
    assert req.num_remaining_tokens == 2


def test_a_request_being_computed_is_not_scheduled_again_until_updated() -> None:
    """Two passes may draw from one queue (a decode step mixing prompt chunks, and prefill's own pass):
    neither gets a chunk of a request the other is computing, and a budget caps one pass."""
    sched = PrefillScheduler(max_prefill_tokens=64, max_batch_size=8, max_waiting=8)
    for rid, n in (("a", 40), ("b", 10), ("c", 5)):
        sched.add(_req(rid, n))
    mixed = sched.schedule(max_tokens=16)
    assert _spans(mixed) == [("a", 0, 16, False)]
    assert sched.has_schedulable()
    own = sched.schedule()
    assert _spans(own) == [("b", 0, 10, True), ("c", 0, 5, True)]  # not "a": its chunk is in flight
    assert not sched.has_schedulable() and sched.schedule().chunks == []
    sched.update(mixed)
    sched.update(own)
    assert _spans(sched.schedule()) == [("a", 16, 40, True)]


def test_a_dropped_request_is_no_longer_in_flight() -> None:
    sched = PrefillScheduler(max_prefill_tokens=64, max_batch_size=8, max_waiting=8)
    request = _req("a", 8)
    sched.add(request)
    sched.schedule()
    sched.drop(request)
    assert not request.is_scheduled and request.status is PrefillStatus.ABORTED and not sched.waiting
