"""The serving view of a versioned store: task -> active version, kept in memory.

The request path must not wait on the store (a Redis round trip per request, or a Redis outage,
would become every request's problem). Pointers are refreshed by change notifications (in-process,
or Redis pub/sub) and by polling as a fallback; during an outage the last known pointers keep
serving. `stamp(task)` is the active version, so caches keyed by it follow every hot swap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from adapters_store.base import AdapterStore, StoredAdapter, StoreError, UnknownTaskError, VersionedAdapterStore
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
        self._active: dict[str, str] = {}
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
        """Re-read every pointer (start-up, and after an outage); is_swap=False loads them silently."""
        active = {t: v for t in self.store.tasks() if (v := self.store.active_version(t)) is not None}
        with self._lock:
            changed = {t for t in set(active) | set(self._active) if active.get(t) != self._active.get(t)}
            self._active = active
        for task in changed if is_swap else ():
            self.on_swap(task, active.get(task))

    def _changed(self, task: str, notified: str | None) -> None:
        # A notification may be stale (a poll's snapshot can be delivered after a newer write), so
        # the pointer is re-read; only when the store is unreachable is the notified value used.
        try:
            version = self.store.active_version(task)
        except (StoreError, OSError):
            version = notified
        with self._lock:
            if self._active.get(task) == version:
                return
            if version is None:
                self._active.pop(task, None)
            else:
                self._active[task] = version
        log.info("task %s now serves adapter version %s", task, version)
        self.on_swap(task, version)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.store.poll()
            except (StoreError, OSError) as e:
                log.warning("adapter store poll failed (serving the last known versions): %s", e)

    # --- AdapterStore -----------------------------------------------------------------------------
    def tasks(self) -> list[str]:
        with self._lock:
            return sorted(set(self._active) | set(self.seed_errors))

    def stamp(self, task: str) -> str:
        with self._lock:
            version = self._active.get(task)
        if version is None:
            if task in self.seed_errors:
                return "unreadable"
            raise UnknownTaskError(task)
        return version

    def read(self, task: str) -> StoredAdapter:
        if task in self.seed_errors:
            raise AdapterError(self.seed_errors[task])
        return self.store.read_version(task, self.stamp(task))


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
