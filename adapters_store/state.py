"""A task's pointer state and its transitions: pure logic, shared by every versioned backend.

`history` is a stack of previously active versions, oldest first. Activating pushes the outgoing
version; rolling back pops (the version rolled away from is *not* pushed, so repeated rollbacks walk
further back instead of toggling). Deleting a version removes it from the history too.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

from adapters_store.base import StoreConflictError, StoreCorruptError, validate_version

MAX_HISTORY = 100  # oldest entries beyond this are dropped


@dataclass(frozen=True)
class TaskState:
    active: str | None = None  # the active version, or None
    history: tuple[str, ...] = ()  # previously active versions, oldest first

    def to_json(self) -> bytes:
        return json.dumps({"active": self.active, "history": list(self.history)}).encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str) -> TaskState:
        try:
            data = json.loads(raw)
            active = data["active"]
            history = tuple(validate_version(v) for v in data["history"])
            return cls(None if active is None else validate_version(active), history)
        except (ValueError, KeyError, TypeError) as e:
            raise StoreCorruptError(f"{source}: unreadable adapter store state ({e})") from e


def activated(state: TaskState, version: str, max_history: int = MAX_HISTORY) -> TaskState:
    """The state after activating `version` (unchanged if it already is the active one)."""
    if state.active == version:
        return state
    history = state.history
    if state.active is not None and (not history or history[-1] != state.active):
        history = (*history, state.active)
    return TaskState(version, history[-max_history:] if max_history > 0 else ())


def rolled_back(state: TaskState, task: str, existing: Collection[str]) -> TaskState:
    """The state after re-activating the newest history entry that still exists (and is not active)."""
    history = list(state.history)
    while history:
        candidate = history.pop()
        if candidate != state.active and candidate in existing:
            return TaskState(candidate, tuple(history))
    raise StoreConflictError(f"task {task!r}: no previously active version to roll back to")


def without_version(state: TaskState, task: str, version: str) -> TaskState:
    """The state after deleting an inactive `version`; StoreConflictError if it is the active one."""
    if state.active == version:
        raise StoreConflictError(
            f"task {task!r}: version {version!r} is active; activate another version or roll back first")
    return TaskState(state.active, tuple(v for v in state.history if v != version))
