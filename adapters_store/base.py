"""The adapter store boundary: which tasks exist, and the bytes of each task's active version.

`AdapterStore` is the read side the prefill AdapterCache uses. `VersionedAdapterStore` adds the
write side: immutable, content-hashed versions per task, one active version per task, a history of
previously active versions for rollback, and change notifications for hot swap. Validating adapter
*contents* is the caller's job (`prad.adapters.io.parse_adapter` before `put`); the store only
guarantees that a version is either fully written or invisible.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable
from dataclasses import dataclass

# prad.adapters.io.content_version(): 16 lowercase hex; use with fullmatch ("$" lets a trailing newline pass)
VERSION_RE = re.compile(r"[0-9a-f]{16}")

# callback(task, active_version_or_None), called after a task's active version changed.
ChangeCallback = Callable[[str, "str | None"], None]
Unsubscribe = Callable[[], None]


class UnknownTaskError(KeyError):
    """No such task in the store (or, for `read`/`stamp`, no active version)."""

    def __init__(self, task: str, message: str | None = None) -> None:
        super().__init__(task)
        self.task = task
        self.message = message or f"unknown task {task!r}"

    def __str__(self) -> str:
        return self.message


class UnknownVersionError(KeyError):
    """The task exists but has no such version."""

    def __init__(self, task: str, version: str) -> None:
        super().__init__(task, version)
        self.task = task
        self.version = version

    def __str__(self) -> str:
        return f"task {self.task!r} has no version {self.version!r}"


class InvalidVersionError(ValueError):
    """A version string that is not 16 lowercase hex characters."""


class StoreError(Exception):
    """Base of the store's own failures (conflicts, unreachable backend, damaged state)."""


class StoreConflictError(StoreError):
    """The operation contradicts the task's state: deleting the active version, rolling back with no history."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The backend (e.g. Redis) cannot be reached or answered with an error; retry later."""


class StoreCorruptError(StoreError):
    """The store's own files or index are damaged (e.g. an unreadable state file, bytes missing on disk)."""


def validate_version(version: str) -> str:
    """The version itself, or InvalidVersionError naming it."""
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise InvalidVersionError(f"invalid adapter version {version!r}: expected 16 lowercase hex characters")
    return version


@dataclass(frozen=True)
class StoredAdapter:
    task: str  # task id
    config_bytes: bytes  # adapter_config.json
    weight_bytes: bytes  # adapter.safetensors
    version: str | None = None  # content version, when the store knows it (versioned stores always do)


@dataclass(frozen=True)
class VersionInfo:
    version: str  # content version: 16 lowercase hex
    created_s: float  # unix time the version was first stored
    num_bytes: int  # config + weights size
    is_active: bool  # the task's active version


class AdapterStore(abc.ABC):
    @abc.abstractmethod
    def tasks(self) -> list[str]:
        """Task ids with an active adapter, sorted."""

    @abc.abstractmethod
    def read(self, task: str) -> StoredAdapter:
        """The active version's bytes; UnknownTaskError if there is none."""

    @abc.abstractmethod
    def stamp(self, task: str) -> str:
        """A cheap token that changes whenever the task's active bytes change (cache key)."""


class VersionedAdapterStore(AdapterStore):
    """Immutable versions per task, one active pointer per task, rollback history, notifications.

    `stamp(task)` is the active version (a content hash, so it changes exactly when the bytes do) and
    `read(task)` returns the active version's bytes. Task ids must pass `validate_task_id`
    (AdapterError otherwise); versions must pass `validate_version` (InvalidVersionError).
    """

    @abc.abstractmethod
    def known_tasks(self) -> list[str]:
        """Every task the store holds, with or without an active version, sorted."""

    @abc.abstractmethod
    def put(self, task: str, config_bytes: bytes, weight_bytes: bytes) -> str:
        """Store a version (creating the task if new) and return its content version.

        Idempotent: identical bytes give the same version and store nothing new. Does not activate.
        """

    @abc.abstractmethod
    def activate(self, task: str, version: str) -> None:
        """Make `version` the active one, pushing the previous active version onto the history.

        Atomic for readers. Activating the already active version is a no-op (no notification).
        UnknownTaskError / UnknownVersionError if either does not exist.
        """

    @abc.abstractmethod
    def rollback(self, task: str) -> str:
        """Re-activate the previously active version and return it; StoreConflictError if no history."""

    @abc.abstractmethod
    def versions(self, task: str) -> list[VersionInfo]:
        """The task's stored versions, oldest first; UnknownTaskError if the task does not exist."""

    @abc.abstractmethod
    def active_version(self, task: str) -> str | None:
        """The active version, or None when the task has none (or does not exist)."""

    @abc.abstractmethod
    def delete_version(self, task: str, version: str) -> None:
        """Delete an inactive version (also from the history); StoreConflictError for the active one."""

    @abc.abstractmethod
    def delete_task(self, task: str) -> None:
        """Delete the task with all its versions; subscribers are told (task, None)."""

    @abc.abstractmethod
    def read_version(self, task: str, version: str) -> StoredAdapter:
        """The bytes of any stored version of the task."""

    @abc.abstractmethod
    def subscribe(self, callback: ChangeCallback) -> Unsubscribe:
        """Call `callback(task, active_or_None)` after each change of a task's active version.

        Fires on activate, rollback and delete_task. Callbacks may run on the caller's thread or on a
        store thread: keep them quick, thread-safe, and do not block on the store. Returns a function
        that removes the callback.
        """

    @abc.abstractmethod
    def poll(self) -> dict[str, str | None]:
        """Compare every task's active pointer with the last one seen and notify subscribers of changes.

        Catches changes made elsewhere (other processes, missed notifications). Returns {task: active}
        for the tasks that changed. The first call only records what it sees and returns {}.
        """

    def stamp(self, task: str) -> str:
        return self._require_active(task)

    def read(self, task: str) -> StoredAdapter:
        # The active version cannot be deleted, but between looking it up and reading it another
        # writer may activate a newer one and delete the old; then look again.
        for _ in range(3):
            version = self._require_active(task)
            try:
                return self.read_version(task, version)
            except UnknownVersionError:
                continue
        raise StoreConflictError(f"task {task!r}: active version keeps changing while being read; retry")

    def _require_active(self, task: str) -> str:
        version = self.active_version(task)
        if version is None:
            raise UnknownTaskError(task, f"task {task!r} has no active adapter version")
        return version
