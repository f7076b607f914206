"""In-process change notifications: subscribers, a delivery queue, and the last routing token seen.

What is tracked per task is its routing token (`state.routing_token`): the active version, plus the
traffic split when there is one, so a change of either is a change. Subscribers are called with
(task, active version): the token's active part, never the token. A bare active version is a valid
token (a task without a split), so stores and tests may pass plain versions.

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
from adapters_store.state import token_active

log = logging.getLogger(__name__)


class ChangeNotifier:
    def __init__(self) -> None:
        self._callbacks: list[ChangeCallback] = []
        self._seen: dict[str, str] = {}  # task -> routing token last seen; absent = no active version
        self._has_baseline = False  # a full snapshot has been recorded
        self._queue: deque[tuple[str, str | None]] = deque()  # (task, active) not yet delivered, oldest first
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

    def record(self, task: str, token: str | None) -> None:
        """Our own write changed the task's routing token (None: no active version): queue it (call
        `deliver` afterwards)."""
        with self._lock:
            self._set_seen(task, token)
            self._queue.append((task, token_active(token)))

    def publish(self, task: str, token: str | None) -> None:
        """`record` and `deliver` in one."""
        self.record(task, token)
        self.deliver()

    def observe(self, task: str, token: str | None) -> bool:
        """A peer says the task changed and `token` is its current routing token; deliver it if it is news."""
        with self._lock:
            is_news = self._seen.get(task) != token
            if is_news:
                self._set_seen(task, token)
                self._queue.append((task, token_active(token)))
        self.deliver()
        return is_news

    def reconcile(self, snapshot: dict[str, str]) -> dict[str, str | None]:
        """Diff a full {task: routing token} snapshot against what was seen; deliver the changes and
        return them as {task: active version or None}.

        The first snapshot only sets the baseline: there is nothing to compare it with.
        """
        changes: dict[str, str | None] = {}
        with self._lock:
            if not self._has_baseline:
                self._seen, self._has_baseline = dict(snapshot), True
                return changes
            for task in sorted(set(snapshot) | set(self._seen)):
                token = snapshot.get(task)
                if token != self._seen.get(task):
                    changes[task] = token_active(token)
                    self._set_seen(task, token)
                    self._queue.append((task, changes[task]))
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

    def _set_seen(self, task: str, token: str | None) -> None:
        if token is None:
            self._seen.pop(task, None)
        else:
            self._seen[task] = token

    @staticmethod
    def _call(callback: ChangeCallback, task: str, active: str | None) -> None:
        try:
            callback(task, active)
        except Exception:
            log.exception("adapter store subscriber %r failed on (%r, %r)", callback, task, active)
