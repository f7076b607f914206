"""A versioned adapter store in one folder, for a single node (or nodes sharing a POSIX filesystem).

Layout:

    root/<task>/versions/<version>/{adapter_config.json, adapter.safetensors}   immutable, see version_files
    root/<task>/state.json   {"active": version | null, "history": [older ... newer]}
    root/.lock               flock'ed by every writer
    root/.tmp/               staging and deletion area

Readers take no lock: versions appear and disappear by rename, and state.json is replaced with
os.replace, so a reader sees the old pointer or the new one, never a mix. Writers serialise on a
threading lock (threads of this process) and fcntl.flock on root/.lock (other processes). Version
bytes are written to staging outside the lock; only the rename into place happens under it.

Notifications are in-process: this store's own writes notify at once, in the order they were made;
changes made by other processes show up through `poll()`.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters_store.base import (
    ChangeCallback,
    StoredAdapter,
    UnknownTaskError,
    UnknownVersionError,
    Unsubscribe,
    VersionedAdapterStore,
    VersionInfo,
    validate_version,
)
from adapters_store.notify import ChangeNotifier
from adapters_store.state import MAX_HISTORY, TaskState, activated, rolled_back, without_version
from adapters_store.version_files import VersionFiles, is_task_id, write_atomic
from prad.adapters.config import validate_task_id
from prad.adapters.io import content_version

STATE_FILE = "state.json"
LOCK_FILE = ".lock"

Events = list[tuple[str, "str | None"]]  # (task, new active version) to notify once the write is done


class FilesystemStore(VersionedAdapterStore):
    def __init__(self, root: Path, max_history: int = MAX_HISTORY) -> None:
        self.root = Path(root)
        self.files = VersionFiles(self.root)
        self.max_history = max_history
        self._thread_lock = threading.Lock()  # writers of this process
        self._notifier = ChangeNotifier()

    # -- reads -------------------------------------------------------------------------------------

    def tasks(self) -> list[str]:
        return [task for task in self.files.task_ids() if self._state(task).active is not None]

    def known_tasks(self) -> list[str]:
        return self.files.task_ids()

    def active_version(self, task: str) -> str | None:
        return self._state(task).active if is_task_id(task) else None

    def versions(self, task: str) -> list[VersionInfo]:
        self._require_task(task)
        active = self._state(task).active
        infos = []
        for version in self.files.version_ids(task):
            try:
                infos.append(self.files.info(task, version, version == active))
            except UnknownVersionError:  # deleted while listing
                continue
        return sorted(infos, key=lambda info: (info.created_s, info.version))

    def read_version(self, task: str, version: str) -> StoredAdapter:
        validate_version(version)
        self._require_task(task)
        return self.files.read(task, version)

    # -- writes ------------------------------------------------------------------------------------

    def put(self, task: str, config_bytes: bytes, weight_bytes: bytes) -> str:
        validate_task_id(task)
        version = content_version(config_bytes, weight_bytes)
        if self.files.has_version(task, version):
            return version
        staged = self.files.stage(config_bytes, weight_bytes)
        with self._locked():
            return self.files.commit(task, staged)

    def activate(self, task: str, version: str) -> None:
        validate_task_id(task)
        validate_version(version)
        with self._write_then_notify() as events:
            self._require_version(task, version)
            self._update(task, lambda state: activated(state, version, self.max_history), events)

    def rollback(self, task: str) -> str:
        validate_task_id(task)
        with self._write_then_notify() as events:
            self._require_task(task)
            existing = set(self.files.version_ids(task))
            state = self._update(task, lambda state: rolled_back(state, task, existing), events)
        assert state.active is not None
        return state.active

    def delete_version(self, task: str, version: str) -> None:
        validate_task_id(task)
        validate_version(version)
        with self._write_then_notify() as events:
            self._require_version(task, version)
            self._update(task, lambda state: without_version(state, task, version), events)
            self.files.remove_version(task, version)

    def delete_task(self, task: str) -> None:
        validate_task_id(task)
        with self._write_then_notify() as events:
            self._require_task(task)
            was_active = self._state(task).active is not None
            self.files.remove_task(task)
            if was_active:
                events.append((task, None))

    # -- notifications -----------------------------------------------------------------------------

    def subscribe(self, callback: ChangeCallback) -> Unsubscribe:
        unsubscribe = self._notifier.subscribe(callback)
        if not self._notifier.has_baseline:
            self.poll()
        return unsubscribe

    def poll(self) -> dict[str, str | None]:
        snapshot = {}
        for task in self.files.task_ids():
            active = self._state(task).active
            if active is not None:
                snapshot[task] = active
        return self._notifier.reconcile(snapshot)

    # -- internals ---------------------------------------------------------------------------------

    def _state(self, task: str) -> TaskState:
        path = self.files.task_dir(task) / STATE_FILE
        try:
            return TaskState.from_json(path.read_bytes(), str(path))
        except FileNotFoundError:
            return TaskState()

    def _update(self, task: str, change: Callable[[TaskState], TaskState], events: Events) -> TaskState:
        """Apply a state transition (under the write lock) and queue a notification if the pointer moved."""
        old = self._state(task)
        new = change(old)
        if new != old:
            write_atomic(self.files.task_dir(task) / STATE_FILE, new.to_json())
        if new.active != old.active:
            events.append((task, new.active))
        return new

    def _require_task(self, task: str) -> None:
        if not self.files.has_task(task):
            raise UnknownTaskError(task)

    def _require_version(self, task: str, version: str) -> None:
        self._require_task(task)
        if not self.files.has_version(task, version):
            raise UnknownVersionError(task, version)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock, open(self.root / LOCK_FILE, "a+b") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    @contextmanager
    def _write_then_notify(self) -> Iterator[Events]:
        # Changes are queued while the write lock is held, so they are delivered in write order.
        events: Events = []
        with self._locked():
            yield events
            for task, active in events:
                self._notifier.record(task, active)
        self._notifier.deliver()
