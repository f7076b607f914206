"""Events from engine threads reach asyncio queues in order, with one wake-up per burst
(kv_transfer/loop_events.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kv_transfer.loop_events import LoopDispatcher, dispatcher_for


def test_a_burst_from_another_thread_arrives_in_order_with_one_wakeup() -> None:
    async def run() -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        dispatcher: LoopDispatcher[int] = LoopDispatcher(loop)
        queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(8)]

        def step() -> None:  # an engine step: one event per running request, three steps
            for token in range(3):
                for q in queues:
                    dispatcher.put(q, token)

        thread = threading.Thread(target=step)
        thread.start()
        thread.join()  # the loop is blocked here, as it is while a step runs: nothing drains yet
        got = [[await q.get() for _ in range(3)] for q in queues]
        return got, dispatcher.num_wakeups

    got, wakeups = asyncio.run(run())
    assert got == [[0, 1, 2]] * 8
    assert wakeups == 1


def test_one_dispatcher_per_loop_and_a_closed_loop_raises() -> None:
    loop = asyncio.new_event_loop()
    assert dispatcher_for(loop) is dispatcher_for(loop)
    queue: asyncio.Queue[int] = asyncio.Queue()
    loop.close()
    with pytest.raises(RuntimeError):
        dispatcher_for(loop).put(queue, 1)
    with pytest.raises(RuntimeError):  # still raises: a failed wake-up leaves nothing scheduled
        dispatcher_for(loop).put(queue, 2)
