"""A versioned adapter store in one folder, for a single node (or nodes sharing a POSIX filesystem).

Layout:

    root/<task>/versions/<version>/{adapter_config.json, adapter.safetensors}   immutable, see version_files
    root/<task>/state.json   {"active": version | null, "history": [older ... newer], "split": [[version, weight], ...]}
    root/.lock               flock'ed by every writer
    root/.tmp/               staging and deletion area

Readers take no lock: versions appear and disappear by rename, and state.json is replaced with
os.replace, so a reader sees the old pointer and split or the new ones, never a mix. Writers
serialise on a threading lock (threads of this process) and fcntl.flock on root/.lock (other
processes). Version bytes are written to staging outside the lock; only the rename into place
happens under it.

Notifications are in-process: this store's own writes (pointer or split) notify at once, in the
order they were made; changes made by other processes show up through `poll()`.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from adapters_store.base import (
    ChangeCallback,
    Routing,
    Split,
    StoredAdapter,
    UnknownTaskError,
    UnknownVersionError,
    Unsubscribe,
    VersionedAdapterStore,
    VersionInfo,
    validate_version,
)
from adapters_store.notify import ChangeNotifier
from adapters_store.state import (
    MAX_HISTORY,
    TaskState,
    activated,
    rolled_back,
    routing_token,
    validated_split,
    with_split,
    without_split,
    without_version,
)
from adapters_store.version_files import VersionFiles, is_task_id, write_atomic
from prad.adapters.config import validate_task_id
from prad.adapters.io import content_version

STATE_FILE = "state.json"
LOCK_FILE = ".lock"

Events = list[tuple[str, "str | None"]]  # (task, new routing token) to notify once the write is done


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

    def routing(self, task: str) -> Routing | None:
        state = self._state(task) if is_task_id(task) else TaskState()
        return None if state.active is None else Routing(state.active, state.split)

    def split(self, task: str) -> Split | None:
        routing = self.routing(task)
        return dict(routing.split) if routing is not None and routing.split else None

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

    def set_split(self, task: str, weights: Mapping[str, int]) -> None:
        validate_task_id(task)
        weights = dict(validated_split(weights))  # malformed splits fail before the lock is taken
        with self._write_then_notify() as events:
            self._require_task(task)
            existing = set(self.files.version_ids(task))
            self._update(task, lambda state: with_split(state, task, weights, existing), events)

    def clear_split(self, task: str) -> None:
        validate_task_id(task)
        with self._write_then_notify() as events:
            self._require_task(task)
            self._update(task, without_split, events)

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
            token = routing_token(self._state(task))
            if token is not None:
                snapshot[task] = token
        return self._notifier.reconcile(snapshot)

    # -- internals ---------------------------------------------------------------------------------

    def _state(self, task: str) -> TaskState:
        path = self.files.task_dir(task) / STATE_FILE
        try:
            return TaskState.from_json(path.read_bytes(), str(path))
        except FileNotFoundError:
            return TaskState()

    def _update(self, task: str, change: Callable[[TaskState], TaskState], events: Events) -> TaskState:
        """Apply a state transition (under the write lock) and queue a notification if the pointer or split moved."""
        old = self._state(task)
        new = change(old)
        if new != old:
            write_atomic(self.files.task_dir(task) / STATE_FILE, new.to_json())
        if routing_token(new) != routing_token(old):
            events.append((task, routing_token(new)))
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
            for task, token in events:
                self._notifier.record(task, token)
        self._notifier.deliver()
