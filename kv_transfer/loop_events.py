"""Handing token events from engine threads to asyncio queues with few wake-ups.

A decode step produces one event per running request. Delivering each with its own
`loop.call_soon_threadsafe` costs a self-pipe write and a wake-up of the event loop per token per
request. A `LoopDispatcher` collects the events of a burst instead and schedules one drain for all of
them: while a drain is pending, further events only join the list, so a step's events cross the
thread boundary together, with one wake-up (more only if the loop drains in the middle of a step).
Per-queue order is kept: events are appended and drained in the order they were put.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Generic, TypeVar

T = TypeVar("T")


class LoopDispatcher(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[T], T]] = []
        self._is_scheduled = False
        self.num_wakeups = 0  # drains scheduled so far (for tests and benchmarks)

    def put(self, queue: asyncio.Queue[T], item: T) -> None:
        """Deliver `item` to `queue` on the loop (any thread). RuntimeError if the loop is closed."""
        with self._lock:
            self._pending.append((queue, item))
            if self._is_scheduled:
                return
            self._is_scheduled = True
            self.num_wakeups += 1
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nothing will ever drain
            with self._lock:
                self._pending.clear()
                self._is_scheduled = False
            raise

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._is_scheduled = False
        for queue, item in pending:
            queue.put_nowait(item)


_dispatchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopDispatcher] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def dispatcher_for(loop: asyncio.AbstractEventLoop) -> LoopDispatcher:
    """The one dispatcher of an event loop (created on first use, gone with the loop)."""
    with _registry_lock:
        dispatcher = _dispatchers.get(loop)
        if dispatcher is None:
            dispatcher = _dispatchers[loop] = LoopDispatcher(loop)
        return dispatcher
