"""Decode scheduler: FIFO admission under row and KV bounds, dense rows on leave, aborts, queue bounds."""

from __future__ import annotations

import pytest

from decode_service.scheduler import DecodeScheduler, DecodeSequence, KVMove, SeqStatus
from kv_transfer.outcome import FinishReason, QueueFullError


def _seq(request_id: str, num_prompt_tokens: int = 4, max_new_tokens: int = 4) -> DecodeSequence:
    return DecodeSequence(request_id, num_prompt_tokens, max_new_tokens, [7])


def _ids(seqs: list[DecodeSequence]) -> list[str]:
    return [s.request_id for s in seqs]


def _assert_dense(sched: DecodeScheduler) -> None:
    """Running sequences occupy rows 0..n-1 and each knows its own row; the budget matches them."""
    for row, seq in enumerate(sched.rows):
        assert seq.row == row
        assert seq.status is SeqStatus.RUNNING
    assert sched.num_reserved_tokens == sum(s.num_reserved_tokens for s in sched.rows)


def _apply_moves(kv: list[str | None], moves: list[KVMove]) -> None:
    """Simulate the runner's KV copies: each row holds the id of the request whose KV it has."""
    for src, dst, _ in moves:
        kv[dst] = kv[src]
        kv[src] = None


def test_bad_bounds_are_rejected() -> None:
    for batch, kv, waiting in [(0, 10, 1), (1, 0, 1), (1, 10, -1)]:
        with pytest.raises(ValueError):
            DecodeScheduler(batch, kv, waiting)


def test_sequence_reservation_and_last_position() -> None:
    seq = DecodeSequence("a", num_prompt_tokens=10, max_new_tokens=5, output_token_ids=[3])
    assert seq.num_reserved_tokens == 15
    assert seq.last_position == 10  # the first output token sits right after the prompt
    seq.output_token_ids += [4, 5]
    assert seq.last_position == 12


def test_admission_is_fifo_and_bounded_by_batch_size() -> None:
    sched = DecodeScheduler(max_batch_size=2, max_kv_tokens=1000, max_waiting=10)
    seqs = [_seq(f"r{i}") for i in range(4)]
    for s in seqs:
        sched.add(s)
    assert sched.num_waiting == 4 and sched.num_running == 0 and sched.has_work()

    out = sched.schedule()
    assert _ids(out.admitted) == ["r0", "r1"]
    assert _ids(out.running) == ["r0", "r1"]
    assert out.aborted == [] and out.moves == []
    assert [s.row for s in out.admitted] == [0, 1]
    assert _ids(list(sched.waiting)) == ["r2", "r3"]
    assert all(s.status is SeqStatus.WAITING_FOR_SLOT and s.row is None for s in seqs[2:])
    _assert_dense(sched)

    # Nothing freed: a second schedule admits nobody.
    out = sched.schedule()
    assert out.admitted == [] and _ids(out.running) == ["r0", "r1"]


def test_admission_is_bounded_by_kv_budget_with_exact_fit() -> None:
    sched = DecodeScheduler(max_batch_size=8, max_kv_tokens=100, max_waiting=10)
    a, b, c, d = _seq("a", 40, 10), _seq("b", 30, 10), _seq("c", 5, 5), _seq("d", 1, 1)
    for s in (a, b, c, d):
        sched.add(s)
    out = sched.schedule()
    # 50 + 40 + 10 == 100 fits exactly; d (2 more) does not.
    assert _ids(out.admitted) == ["a", "b", "c"]
    assert sched.num_reserved_tokens == 100
    assert _ids(list(sched.waiting)) == ["d"]
    assert not sched.can_allocate(d)
    _assert_dense(sched)

    moves = sched.finish(c, FinishReason.LENGTH)
    assert moves == []  # c was the last row
    assert sched.num_reserved_tokens == 90
    out = sched.schedule()
    assert _ids(out.admitted) == ["d"] and d.row == 2
    assert sched.num_reserved_tokens == 92
    _assert_dense(sched)


def test_admission_is_strictly_fifo_under_kv_budget() -> None:
    """A head request that does not fit blocks later ones, even ones that would fit (no starvation)."""
    sched = DecodeScheduler(max_batch_size=8, max_kv_tokens=100, max_waiting=10)
    big1, big2, small = _seq("big1", 50, 10), _seq("big2", 40, 10), _seq("small", 2, 2)
    for s in (big1, big2, small):
        sched.add(s)
    out = sched.schedule()
    assert _ids(out.admitted) == ["big1"]
    assert _ids(list(sched.waiting)) == ["big2", "small"]
    assert sched.can_allocate(small) and not sched.can_allocate(big2)

    sched.finish(big1, FinishReason.STOP)
    out = sched.schedule()
    assert _ids(out.admitted) == ["big2", "small"]
    assert [s.row for s in out.admitted] == [0, 1]
    _assert_dense(sched)


def test_queue_bound_raises_queue_full_and_keeps_queue() -> None:
    sched = DecodeScheduler(max_batch_size=1, max_kv_tokens=100, max_waiting=2)
    sched.add(_seq("a"))
    sched.add(_seq("b"))
    with pytest.raises(QueueFullError):
        sched.add(_seq("c"))
    assert _ids(list(sched.waiting)) == ["a", "b"]

    sched.schedule()  # "a" takes the only row: one waiting slot frees up
    sched.add(_seq("c"))
    with pytest.raises(QueueFullError):
        sched.add(_seq("d"))
    assert _ids(list(sched.waiting)) == ["b", "c"]


def test_zero_waiting_slots_refuse_everything() -> None:
    sched = DecodeScheduler(max_batch_size=1, max_kv_tokens=100, max_waiting=0)
    with pytest.raises(QueueFullError):
        sched.add(_seq("a"))
    assert not sched.has_work()


def test_request_over_whole_kv_budget_is_a_value_error() -> None:
    sched = DecodeScheduler(max_batch_size=4, max_kv_tokens=100, max_waiting=4)
    with pytest.raises(ValueError, match="101"):
        sched.add(_seq("too-big", 60, 41))
    assert sched.num_waiting == 0
    sched.add(_seq("exact", 60, 40))  # exactly the budget is fine
    out = sched.schedule()
    assert _ids(out.admitted) == ["exact"]
    assert sched.num_reserved_tokens == 100


def test_value_error_is_not_reported_as_queue_full() -> None:
    """A request that can never run is a client error even when the queue is also full."""
    sched = DecodeScheduler(max_batch_size=1, max_kv_tokens=10, max_waiting=1)
    sched.add(_seq("a", 2, 2))
    with pytest.raises(ValueError):
        sched.add(_seq("b", 10, 10))


def test_finish_middle_row_moves_last_row_into_it() -> None:
    sched = DecodeScheduler(max_batch_size=4, max_kv_tokens=1000, max_waiting=4)
    a, b, c = _seq("a", 3, 2), _seq("b", 5, 2), _seq("c", 7, 2)
    for s in (a, b, c):
        sched.add(s)
    sched.schedule()
    assert [a.row, b.row, c.row] == [0, 1, 2]

    moves = sched.finish(b, FinishReason.STOP)
    assert moves == [KVMove(2, 1, c.last_position + 1)]
    assert c.row == 1 and a.row == 0
    assert b.row is None and b.finish_reason is FinishReason.STOP and b.is_finished
    assert sched.rows == [a, c]
    assert sched.num_reserved_tokens == a.num_reserved_tokens + c.num_reserved_tokens
    _assert_dense(sched)

    # The first row leaving moves the (new) last row, c, again.
    moves = sched.finish(a, FinishReason.LENGTH)
    assert [m[:2] for m in moves] == [(1, 0)] and c.row == 0 and sched.rows == [c]
    _assert_dense(sched)

    assert sched.finish(c, FinishReason.LENGTH) == []
    assert sched.rows == [] and sched.num_reserved_tokens == 0
    assert not sched.has_work()


def test_finish_rejects_a_non_running_sequence() -> None:
    sched = DecodeScheduler(max_batch_size=2, max_kv_tokens=100, max_waiting=2)
    a, b = _seq("a"), _seq("b")
    sched.add(a)
    sched.schedule()
    sched.add(b)
    with pytest.raises(AssertionError):
        sched.finish(b, FinishReason.STOP)  # still waiting: it has no row
    assert sched.rows == [a] and a.row == 0
    sched.finish(a, FinishReason.STOP)
    with pytest.raises(AssertionError):
        sched.finish(a, FinishReason.STOP)  # already finished


def test_aborts_of_waiting_and_running_are_reported_and_free_resources() -> None:
    sched = DecodeScheduler(max_batch_size=3, max_kv_tokens=30, max_waiting=10)
    run = [_seq(f"run{i}", 5, 5) for i in range(3)]
    for s in run:
        sched.add(s)
    sched.schedule()
    assert sched.num_reserved_tokens == 30
    wait = [_seq(f"wait{i}", 5, 5) for i in range(3)]
    for s in wait:
        sched.add(s)

    run[0].is_abort_requested = True  # a running one, in row 0
    wait[0].is_abort_requested = True  # a waiting one, at the head of the queue
    out = sched.schedule()

    assert sorted(_ids(out.aborted)) == ["run0", "wait0"]
    for s in (run[0], wait[0]):
        assert s.finish_reason is FinishReason.ABORT and s.row is None
    assert [m[:2] for m in out.moves] == [(2, 0)]  # run2 fills run0's row
    assert run[2].row == 0
    # The freed row and budget go to the next waiting request in the same step.
    assert _ids(out.admitted) == ["wait1"] and wait[1].row == 2
    assert _ids(out.running) == ["run2", "run1", "wait1"]
    assert _ids(list(sched.waiting)) == ["wait2"]
    assert sched.num_reserved_tokens == 30
    _assert_dense(sched)

    # An aborted request is reported once, not again.
    out = sched.schedule()
    assert out.aborted == [] and out.admitted == [] and out.moves == []


def test_abort_everything_empties_the_scheduler() -> None:
    sched = DecodeScheduler(max_batch_size=2, max_kv_tokens=100, max_waiting=10)
    seqs = [_seq(f"r{i}") for i in range(4)]
    for s in seqs:
        sched.add(s)
    sched.schedule()
    for s in seqs:
        s.is_abort_requested = True
    out = sched.schedule()
    assert sorted(_ids(out.aborted)) == ["r0", "r1", "r2", "r3"]
    assert out.admitted == [] and out.running == []
    assert sched.rows == [] and sched.num_waiting == 0 and sched.num_reserved_tokens == 0
    assert not sched.has_work()
    assert all(s.finish_reason is FinishReason.ABORT and s.row is None for s in seqs)


def test_several_running_aborts_give_moves_that_replay_to_the_right_rows() -> None:
    """Moves from several aborts in one step, replayed in order, leave each survivor's KV in its row.

    Here the survivor x moves twice ((2, 1) then (1, 0)): a consumer must apply the moves in order.
    """
    sched = DecodeScheduler(max_batch_size=4, max_kv_tokens=1000, max_waiting=4)
    p, y, x, z = _seq("p"), _seq("y"), _seq("x"), _seq("z")
    for s in (p, y, x, z):
        sched.add(s)
    sched.schedule()
    kv: list[str | None] = [s.request_id for s in sched.rows]

    for s in (p, y, z):
        s.is_abort_requested = True
    out = sched.schedule()

    assert sorted(_ids(out.aborted)) == ["p", "y", "z"]
    assert sched.rows == [x] and x.row == 0
    _apply_moves(kv, out.moves)
    assert kv[0] == "x"
    _assert_dense(sched)


def test_replaying_moves_keeps_kv_in_step_with_rows_over_many_steps() -> None:
    """A deterministic churn of joins, finishes and aborts: the simulated KV always matches the rows."""
    sched = DecodeScheduler(max_batch_size=4, max_kv_tokens=60, max_waiting=100)
    kv: list[str | None] = [None] * 4
    plan = [(i % 3 + 2, i % 5 + 1) for i in range(30)]  # (prompt, max_new) per request
    for i, (prompt, new) in enumerate(plan):
        sched.add(_seq(f"r{i}", prompt, new))
    step = num_aborted = num_moves = 0
    while sched.has_work():
        step += 1
        if step % 4 == 0:  # abort the first waiting one and the middle running one
            if sched.waiting:
                sched.waiting[0].is_abort_requested = True
            if sched.rows:
                sched.rows[len(sched.rows) // 2].is_abort_requested = True
        out = sched.schedule()
        num_aborted += len(out.aborted)
        num_moves += len(out.moves)
        _apply_moves(kv, out.moves)
        num_kept = len(sched.rows) - len(out.admitted)
        kv[num_kept:] = [None] * (len(kv) - num_kept)  # rows freed by aborts: their KV is garbage
        for seq in out.admitted:
            assert seq.row is not None and kv[seq.row] is None
            kv[seq.row] = seq.request_id
        assert kv[:len(sched.rows)] == _ids(sched.rows)
        _assert_dense(sched)
        # Each running request generates one token; those at their budget leave.
        for seq in list(out.running):
            seq.output_token_ids.append(1)
            if len(seq.output_token_ids) >= seq.max_new_tokens:
                moves = sched.finish(seq, FinishReason.LENGTH)
                num_moves += len(moves)
                _apply_moves(kv, moves)
                kv[len(sched.rows):] = [None] * (len(kv) - len(sched.rows))
        assert kv[:len(sched.rows)] == _ids(sched.rows)
        _assert_dense(sched)
        assert step < 200
    assert sched.num_reserved_tokens == 0
    assert num_aborted > 2 and num_moves > 2  # the churn really exercised aborts and moves


def test_requests_join_after_others_leave() -> None:
    sched = DecodeScheduler(max_batch_size=2, max_kv_tokens=1000, max_waiting=10)
    a, b, c, d = _seq("a"), _seq("b"), _seq("c"), _seq("d")
    for s in (a, b, c, d):
        sched.add(s)
    out = sched.schedule()
    assert _ids(out.admitted) == ["a", "b"]

    assert [m[:2] for m in sched.finish(a, FinishReason.STOP)] == [(1, 0)]
    out = sched.schedule()
    assert _ids(out.admitted) == ["c"]
    assert c.row == 1 and c.status is SeqStatus.RUNNING
    assert _ids(out.running) == ["b", "c"]
    assert _ids(list(sched.waiting)) == ["d"]

    sched.finish(b, FinishReason.LENGTH)
    sched.finish(c, FinishReason.LENGTH)
    out = sched.schedule()
    assert _ids(out.admitted) == ["d"] and d.row == 0
    assert _ids(out.running) == ["d"] and sched.num_waiting == 0
    _assert_dense(sched)


def _token_steps(sched: DecodeScheduler, seq: DecodeSequence, tokens: list[int], now_s: float = 0.0,
                 stop_text_at: int | None = None) -> FinishReason | None:
    for i, token in enumerate(tokens):
        sched.append_token(seq, token, i == stop_text_at, now_s)
        if seq.is_finished:
            return seq.finish_reason
    return None


def test_append_token_ends_on_eos_budget_stop_text_and_deadline() -> None:
    eos = 2

    def running(max_new: int = 4, **kw) -> tuple[DecodeScheduler, DecodeSequence]:
        sched = DecodeScheduler(max_batch_size=2, max_kv_tokens=100, max_waiting=2, eos_token_ids=[eos])
        seq = DecodeSequence("a", 3, max_new, [7], **kw)
        sched.add(seq)
        sched.schedule()
        return sched, seq

    sched, seq = running()
    assert _token_steps(sched, seq, [5, eos, 5]) is FinishReason.STOP and seq.output_token_ids == [7, 5, eos]
    assert sched.rows == [] and sched.num_reserved_tokens == 0  # it left its row at once
    sched, seq = running(ignore_eos=True)
    assert _token_steps(sched, seq, [eos, eos, eos]) is FinishReason.LENGTH and len(seq.output_token_ids) == 4
    sched, seq = running()
    assert _token_steps(sched, seq, [5, 6], stop_text_at=1) is FinishReason.STOP
    sched, seq = running(deadline_s=10.0)
    assert _token_steps(sched, seq, [5], now_s=9.0) is None
    assert _token_steps(sched, seq, [5], now_s=11.0) is FinishReason.ABORT


def test_first_token_can_end_a_request_before_it_is_queued() -> None:
    sched = DecodeScheduler(max_batch_size=2, max_kv_tokens=100, max_waiting=2, eos_token_ids=[2])
    seq = DecodeSequence("a", 3, 1, [])
    assert sched.append_token(seq, 5, False, 0.0) == []  # max_new_tokens=1: the first token is the last
    assert seq.finish_reason is FinishReason.LENGTH and not sched.has_work()
    going = DecodeSequence("b", 3, 4, [])
    sched.append_token(going, 5, False, 0.0)
    assert not going.is_finished and going.status is SeqStatus.WAITING_FOR_SLOT


def test_a_request_moved_twice_keeps_its_own_copy_length() -> None:
    """Regression: each move carries the moved request's length, fixed when the move is made, so a
    request moved twice in one step is copied whole even when a shorter one takes the row after it."""
    sched = DecodeScheduler(max_batch_size=4, max_kv_tokens=1000, max_waiting=4)
    p, y, x, z = _seq("p", 3, 2), _seq("y", 4, 2), _seq("x", 40, 2), _seq("z", 5, 2)
    for s in (p, y, x, z):
        sched.add(s)
    sched.schedule()
    w = _seq("w", 2, 2)
    sched.add(w)
    for s in (p, y, z):
        s.is_abort_requested = True
    out = sched.schedule()
    replay: list[DecodeSequence] = [p, y, x, z]
    num_x_moves = 0
    for move in out.moves:
        moved = replay[move.src]
        assert move.num_positions == moved.last_position + 1, (move, moved.request_id)
        replay[move.dst] = moved
        num_x_moves += moved is x
    assert num_x_moves == 2, out.moves
    assert sched.rows == [x, w]
