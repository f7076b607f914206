"""The serving view of a versioned store: task -> routing (active version and traffic split), in memory.

The request path must not wait on the store (a Redis round trip per request, or a Redis outage,
would become every request's problem). Routings are refreshed by change notifications (in-process,
or Redis pub/sub) and by polling as a fallback; during an outage the last known routings keep
serving. `stamp(task)` is the active version, so caches keyed by it follow every hot swap; a
notification is only a hint to re-read, so late or repeated ones never roll a routing back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from adapters_store.base import (
    AdapterStore,
    Routing,
    StoredAdapter,
    StoreError,
    UnknownTaskError,
    VersionedAdapterStore,
)
from adapters_store.directory import DirectoryStore
from prad.adapters.config import AdapterError

log = logging.getLogger(__name__)


class ServingStore(AdapterStore):
    def __init__(self, store: VersionedAdapterStore, poll_interval_s: float = 1.0,
                 on_swap: Callable[[str, str | None], None] | None = None) -> None:
        self.store = store
        self.poll_interval_s = poll_interval_s
        self.on_swap = on_swap or (lambda task, version: None)
        self.seed_errors: dict[str, str] = {}  # seed folders that could not even be read
        self._routing: dict[str, Routing] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="adapter-pointers", daemon=True)
        self.refresh(is_swap=False)
        self._unsubscribe = store.subscribe(self._changed)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._unsubscribe()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def refresh(self, is_swap: bool = True) -> None:
        """Re-read every routing (start-up, and after an outage); is_swap=False loads them silently."""
        routings = {t: r for t in self.store.tasks() if (r := self.store.routing(t)) is not None}
        with self._lock:
            old = self._routing
            self._routing = routings
        for task in sorted(set(routings) | set(old)) if is_swap else ():
            self._announce(task, old.get(task), routings.get(task))

    def _changed(self, task: str, notified: str | None) -> None:
        # A notification may be stale (a poll's snapshot can be delivered after a newer write), so
        # the routing is re-read; only when the store is unreachable is the notified value used.
        try:
            routing = self.store.routing(task)
        except (StoreError, OSError):
            routing = None if notified is None else Routing(notified)
        with self._lock:
            old = self._routing.get(task)
            if old == routing:
                return
            if routing is None:
                self._routing.pop(task, None)
            else:
                self._routing[task] = routing
        self._announce(task, old, routing)

    def _announce(self, task: str, old: Routing | None, new: Routing | None) -> None:
        """Log a routing change; hot-swap listeners hear changes of the active version."""
        if old == new:
            return
        if new is not None and new.split:
            log.info("task %s now splits its traffic %s (active %s)", task, dict(new.split), new.active)
        else:
            log.info("task %s now serves adapter version %s", task, None if new is None else new.active)
        if (old and old.active) != (new and new.active):
            self.on_swap(task, None if new is None else new.active)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.store.poll()
            except (StoreError, OSError) as e:
                log.warning("adapter store poll failed (serving the last known versions): %s", e)

    # --- AdapterStore -----------------------------------------------------------------------------
    def tasks(self) -> list[str]:
        with self._lock:
            return sorted(set(self._routing) | set(self.seed_errors))

    def stamp(self, task: str) -> str:
        with self._lock:
            routing = self._routing.get(task)
        if routing is None:
            if task in self.seed_errors:
                return "unreadable"
            raise UnknownTaskError(task)
        return routing.active

    def routing(self, task: str) -> Routing:
        """The task's last known routing, from memory; UnknownTaskError if it has none."""
        with self._lock:
            routing = self._routing.get(task)
        if routing is None:
            if task in self.seed_errors:
                return Routing("unreadable")
            raise UnknownTaskError(task)
        return routing

    def read(self, task: str) -> StoredAdapter:
        return self.read_version(task, self.stamp(task))

    def read_version(self, task: str, version: str) -> StoredAdapter:
        if task in self.seed_errors:
            raise AdapterError(self.seed_errors[task])
        return self.store.read_version(task, version)


def seed_from_folder(store: VersionedAdapterStore, folder: Path | None) -> dict[str, str]:
    """Import plain task folders (`<folder>/<task>/adapter.*`) as versions; activate them when the task
    has no active version yet (an ops change made through the admin API is never overridden).
    Returns {task: error} for folders that could not be read."""
    errors: dict[str, str] = {}
    if folder is None:
        return errors
    plain = DirectoryStore(folder)
    for task in plain.tasks():
        try:
            stored = plain.read(task)
        except (AdapterError, OSError) as e:
            errors[task] = str(e)
            continue
        version = store.put(task, stored.config_bytes, stored.weight_bytes)
        if store.active_version(task) is None:
            store.activate(task, version)
    return errors
