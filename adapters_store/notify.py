"""In-process change notifications: subscribers, a delivery queue, and the last active version seen.

A store reports changes three ways: its own writes (`record`, always delivered), a peer's message
(`observe`, delivered only if it differs from what was last seen, so the echo of our own write is
dropped), and a full snapshot from polling (`reconcile`, which diffs against what was last seen).

Changes go through one queue and one thread at a time drains it, so callbacks see changes in the
order they were recorded, never two at once, and a callback may itself write to the store (its
change is queued and delivered by the drain already running) without deadlock. The flip side: the
change made by one thread may be delivered by another thread that was already delivering.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from adapters_store.base import ChangeCallback, Unsubscribe

log = logging.getLogger(__name__)


class ChangeNotifier:
    def __init__(self) -> None:
        self._callbacks: list[ChangeCallback] = []
        self._seen: dict[str, str] = {}  # task -> active version last seen; absent = none
        self._has_baseline = False  # a full snapshot has been recorded
        self._queue: deque[tuple[str, str | None]] = deque()  # changes not yet delivered, oldest first
        self._is_delivering = False  # a thread is draining the queue
        self._lock = threading.Lock()

    @property
    def has_baseline(self) -> bool:
        return self._has_baseline

    def subscribe(self, callback: ChangeCallback) -> Unsubscribe:
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def record(self, task: str, active: str | None) -> None:
        """Our own write changed the task's active version: queue it (call `deliver` afterwards)."""
        with self._lock:
            self._set_seen(task, active)
            self._queue.append((task, active))

    def publish(self, task: str, active: str | None) -> None:
        """`record` and `deliver` in one."""
        self.record(task, active)
        self.deliver()

    def observe(self, task: str, active: str | None) -> bool:
        """A peer says the task changed and `active` is its current value; deliver it if it is news."""
        with self._lock:
            is_news = self._seen.get(task) != active
            if is_news:
                self._set_seen(task, active)
                self._queue.append((task, active))
        self.deliver()
        return is_news

    def reconcile(self, snapshot: dict[str, str]) -> dict[str, str | None]:
        """Diff a full {task: active} snapshot against what was seen; deliver and return the changes.

        The first snapshot only sets the baseline: there is nothing to compare it with.
        """
        changes: dict[str, str | None] = {}
        with self._lock:
            if not self._has_baseline:
                self._seen, self._has_baseline = dict(snapshot), True
                return changes
            for task in sorted(set(snapshot) | set(self._seen)):
                if snapshot.get(task) != self._seen.get(task):
                    changes[task] = snapshot.get(task)
                    self._set_seen(task, snapshot.get(task))
                    self._queue.append((task, snapshot.get(task)))
        self.deliver()
        return changes

    def deliver(self) -> None:
        """Drain the queue to the subscribers, unless another thread (or an outer call) is doing so."""
        with self._lock:
            if self._is_delivering:
                return
            self._is_delivering = True
        try:
            while (item := self._next()) is not None:
                (task, active), callbacks = item
                for callback in callbacks:
                    self._call(callback, task, active)
        except BaseException:
            with self._lock:
                self._is_delivering = False
            raise

    def _next(self) -> tuple[tuple[str, str | None], list[ChangeCallback]] | None:
        # Emptiness and the end of delivering are decided under one lock, so a change queued
        # concurrently is either taken here or finds no deliverer and drains itself.
        with self._lock:
            if not self._queue:
                self._is_delivering = False
                return None
            return self._queue.popleft(), list(self._callbacks)

    def _set_seen(self, task: str, active: str | None) -> None:
        if active is None:
            self._seen.pop(task, None)
        else:
            self._seen[task] = active

    @staticmethod
    def _call(callback: ChangeCallback, task: str, active: str | None) -> None:
        try:
            callback(task, active)
        except Exception:
            log.exception("adapter store subscriber %r failed on (%r, %r)", callback, task, active)
