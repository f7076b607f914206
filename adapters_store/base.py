"""The adapter store boundary: which tasks exist, and the bytes of each task's active version.

`AdapterStore` is the read side the prefill AdapterCache uses. `VersionedAdapterStore` adds the
write side: immutable, content-hashed versions per task, one active version per task, a history of
previously active versions for rollback, an optional traffic split per task (canary / A-B between
versions), and change notifications for hot swap. Validating adapter
*contents* is the caller's job (`prad.adapters.io.parse_adapter` before `put`); the store only
guarantees that a version is either fully written or invisible.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# prad.adapters.io.content_version(): 16 lowercase hex; use with fullmatch ("$" lets a trailing newline pass)
VERSION_RE = re.compile(r"[0-9a-f]{16}")

# callback(task, active_version_or_None), called after a task's active version or traffic split changed.
ChangeCallback = Callable[[str, "str | None"], None]
Unsubscribe = Callable[[], None]

# A traffic split as callers give and get it: version -> weight (integers 0..100 summing to 100).
Split = dict[str, int]


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


class InvalidSplitError(ValueError):
    """A traffic split that cannot be valid for any task: fewer than 2 versions, a weight that is not an
    integer from 0 to 100, weights not summing to 100, or a version string that is not one."""


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


@dataclass(frozen=True)
class Routing:
    """Where a task's traffic goes, read in one step: `active` alone, or shared per `split`.

    `split` holds (version, weight) pairs sorted by version, weights summing to 100; empty means all
    traffic goes to `active`. With a split, `active` stays the baseline and the fallback.
    """

    active: str
    split: tuple[tuple[str, int], ...] = ()


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

    def read_version(self, task: str, version: str) -> StoredAdapter:
        """The bytes of one version of the task. A store without versions has only the active one,
        named by its stamp; UnknownVersionError for any other."""
        if version != self.stamp(task):
            raise UnknownVersionError(task, version)
        return self.read(task)

    def routing(self, task: str) -> Routing | None:
        """The task's active version and traffic split (a store without versions never splits)."""
        return Routing(self.stamp(task))


class VersionedAdapterStore(AdapterStore):
    """Immutable versions per task, one active pointer per task, rollback history, traffic splits, notifications.

    `stamp(task)` is the active version (a content hash, so it changes exactly when the bytes do) and
    `read(task)` returns the active version's bytes. Task ids must pass `validate_task_id`
    (AdapterError otherwise); versions must pass `validate_version` (InvalidVersionError).

    Traffic splits: a task with an active version may also carry a split, {version: weight} over at
    least two of its versions (weights are integers 0..100 summing to 100; the active version may or
    may not be one of them). It is stored like the active pointer: atomically, and shared by every
    node of the same store. The active version is unchanged by a split and stays the baseline (what
    `read`/`stamp` serve, and the fallback). `activate` and `rollback` end any split in the same
    atomic step (promoting or aborting a canary); a version in the live split cannot be deleted.
    `routing(task)` reads the active version and the split together. Subscribers hear split changes
    too, as (task, active): the second argument is always the active version, never the split.
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

        Atomic for readers, and ends any traffic split in the same step. Activating the already active
        version with no split is a no-op (no notification); with a split, it ends the split.
        UnknownTaskError / UnknownVersionError if either does not exist.
        """

    @abc.abstractmethod
    def rollback(self, task: str) -> str:
        """Re-activate the previously active version and return it, ending any split; StoreConflictError if
        no history."""

    @abc.abstractmethod
    def set_split(self, task: str, weights: Mapping[str, int]) -> None:
        """Share the task's traffic between versions by weight, replacing any split; the active version stays.

        InvalidSplitError for a malformed split (checked before the store is touched), UnknownTaskError,
        UnknownVersionError for a version the task does not have, StoreConflictError if the task has no
        active version. Setting the split the task already has is a no-op (no notification).
        """

    @abc.abstractmethod
    def clear_split(self, task: str) -> None:
        """End the task's split (all traffic to the active version); a no-op if it has none.

        UnknownTaskError if the task does not exist.
        """

    @abc.abstractmethod
    def split(self, task: str) -> Split | None:
        """The task's split {version: weight}, or None when it has none (or the task does not exist)."""

    @abc.abstractmethod
    def routing(self, task: str) -> Routing | None:
        """The active version and split, read together; None when the task has no active version."""

    @abc.abstractmethod
    def versions(self, task: str) -> list[VersionInfo]:
        """The task's stored versions, oldest first; UnknownTaskError if the task does not exist."""

    @abc.abstractmethod
    def active_version(self, task: str) -> str | None:
        """The active version, or None when the task has none (or does not exist)."""

    @abc.abstractmethod
    def delete_version(self, task: str, version: str) -> None:
        """Delete an inactive version (also from the history); StoreConflictError for the active one or
        one in the live split."""

    @abc.abstractmethod
    def delete_task(self, task: str) -> None:
        """Delete the task with all its versions; subscribers are told (task, None)."""

    @abc.abstractmethod
    def read_version(self, task: str, version: str) -> StoredAdapter:
        """The bytes of any stored version of the task."""

    @abc.abstractmethod
    def subscribe(self, callback: ChangeCallback) -> Unsubscribe:
        """Call `callback(task, active_or_None)` after each change of a task's active version or split.

        Fires on activate, rollback, set_split, clear_split and delete_task (a split change calls back with
        the unchanged active version). Callbacks may run on the caller's thread or on a
        store thread: keep them quick, thread-safe, and do not block on the store. Returns a function
        that removes the callback.
        """

    @abc.abstractmethod
    def poll(self) -> dict[str, str | None]:
        """Compare every task's active pointer and split with the last seen and notify subscribers of changes.

        Catches changes made elsewhere (other processes, missed notifications). Returns {task: active}
        for the tasks whose active version or split changed. The first call only records what it sees
        and returns {}.
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
