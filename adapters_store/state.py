"""A task's pointer state and its transitions: pure logic, shared by every versioned backend.

`history` is a stack of previously active versions, oldest first. Activating pushes the outgoing
version; rolling back pops (the version rolled away from is *not* pushed, so repeated rollbacks walk
further back instead of toggling). Deleting a version removes it from the history too.

`split` is the task's traffic split, (version, weight) pairs sorted by version, empty for none. The
active version stays the baseline while a split is live; activating or rolling back ends the split in
the same step, and a version in the live split cannot be deleted.

A routing token (`routing_token`) names the active version and split in one string, so one
comparison detects a change of either: the active version itself when there is no split (so a plain
active version is a valid token), else "<active>|<version>=<weight>,...".
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

from adapters_store.base import (
    VERSION_RE,
    InvalidSplitError,
    Routing,
    StoreConflictError,
    StoreCorruptError,
    UnknownVersionError,
    validate_version,
)

MAX_HISTORY = 100  # oldest entries beyond this are dropped
MIN_SPLIT_VERSIONS = 2
TOTAL_WEIGHT = 100
TOKEN_SEPARATOR = "|"  # never in a version (16 lowercase hex)

SplitPairs = tuple[tuple[str, int], ...]  # (version, weight), sorted by version


@dataclass(frozen=True)
class TaskState:
    active: str | None = None  # the active version, or None
    history: tuple[str, ...] = ()  # previously active versions, oldest first
    split: SplitPairs = ()  # the traffic split, sorted by version; empty = all traffic to `active`

    def to_json(self) -> bytes:
        return json.dumps({"active": self.active, "history": list(self.history),
                           "split": split_to_list(self.split)}).encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str) -> TaskState:
        """Parse a state file; one written before splits existed (no "split") reads as having none."""
        try:
            data = json.loads(raw)
            active = data["active"]
            history = tuple(validate_version(v) for v in data["history"])
            split = split_from_list(data.get("split", []))
            return cls(None if active is None else validate_version(active), history, split)
        except (ValueError, KeyError, TypeError) as e:
            raise StoreCorruptError(f"{source}: unreadable adapter store state ({e})") from e


# -- splits ----------------------------------------------------------------------------------------


def validated_split(weights: Mapping[str, int]) -> SplitPairs:
    """The split as sorted (version, weight) pairs, or InvalidSplitError naming what is wrong with it.

    Needs no store: backends call it before touching theirs, so a malformed split costs no I/O.
    """
    if not isinstance(weights, Mapping):
        raise InvalidSplitError(f"a traffic split is a mapping of version to weight, not {type(weights).__name__}")
    if len(weights) < MIN_SPLIT_VERSIONS:
        raise InvalidSplitError(f"a traffic split needs at least {MIN_SPLIT_VERSIONS} versions, got {len(weights)}")
    for version, weight in weights.items():
        if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
            raise InvalidSplitError(
                f"invalid adapter version {version!r} in traffic split: expected 16 lowercase hex characters")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= TOTAL_WEIGHT:
            raise InvalidSplitError(
                f"weight of version {version!r} must be an integer from 0 to {TOTAL_WEIGHT}, got {weight!r}")
    total = sum(weights.values())
    if total != TOTAL_WEIGHT:
        raise InvalidSplitError(f"traffic split weights must sum to exactly {TOTAL_WEIGHT}, got {total}")
    return tuple(sorted(weights.items()))


def split_to_list(split: SplitPairs) -> list[list[str | int]]:
    """The split as stored in JSON: [[version, weight], ...]."""
    return [[version, weight] for version, weight in split]


def split_from_list(data: object) -> SplitPairs:
    """A stored split ([[version, weight], ...], [] for none) as pairs; ValueError/TypeError if damaged."""
    if not isinstance(data, list):
        raise TypeError(f"traffic split must be a list, not {type(data).__name__}")
    if not data:
        return ()
    weights: dict[str, int] = {}
    for pair in data:
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"traffic split entry {pair!r} is not [version, weight]")
        version, weight = pair
        if version in weights:
            raise ValueError(f"traffic split names version {version!r} twice")
        weights[version] = weight
    return validated_split(weights)


def routing_token(state: TaskState | Routing) -> str | None:
    """None without an active version; else a string that changes whenever the active version or split does."""
    if state.active is None:
        return None
    if not state.split:
        return state.active
    return state.active + TOKEN_SEPARATOR + ",".join(f"{version}={weight}" for version, weight in state.split)


def token_active(token: str | None) -> str | None:
    """The active version a routing token names (None for None)."""
    return None if token is None else token.split(TOKEN_SEPARATOR, 1)[0]


# -- transitions -----------------------------------------------------------------------------------


def activated(state: TaskState, version: str, max_history: int = MAX_HISTORY) -> TaskState:
    """The state after activating `version`, which ends any split (unchanged if it already is the
    active one and there is no split)."""
    if state.active == version:
        return without_split(state)
    history = state.history
    if state.active is not None and (not history or history[-1] != state.active):
        history = (*history, state.active)
    return TaskState(version, history[-max_history:] if max_history > 0 else ())


def rolled_back(state: TaskState, task: str, existing: Collection[str]) -> TaskState:
    """The state after re-activating the newest history entry that still exists (and is not active),
    with no split."""
    history = list(state.history)
    while history:
        candidate = history.pop()
        if candidate != state.active and candidate in existing:
            return TaskState(candidate, tuple(history))
    raise StoreConflictError(f"task {task!r}: no previously active version to roll back to")


def with_split(state: TaskState, task: str, weights: Mapping[str, int], existing: Collection[str]) -> TaskState:
    """The state with `weights` as its split (the same state if that is already the split).

    InvalidSplitError for a malformed split, StoreConflictError when the task has no active version
    (there would be nothing to fall back to), UnknownVersionError for a version not in `existing`.
    """
    split = validated_split(weights)
    if state.active is None:
        raise StoreConflictError(f"task {task!r} has no active version; activate one before splitting its traffic")
    for version, _ in split:
        if version not in existing:
            raise UnknownVersionError(task, version)
    return state if split == state.split else replace(state, split=split)


def without_split(state: TaskState) -> TaskState:
    """The state with no split (the same state if it has none)."""
    return replace(state, split=()) if state.split else state


def without_version(state: TaskState, task: str, version: str) -> TaskState:
    """The state after deleting an inactive `version`; StoreConflictError if it is the active one or in the split."""
    if state.active == version:
        raise StoreConflictError(
            f"task {task!r}: version {version!r} is active; activate another version or roll back first")
    if any(version == v for v, _ in state.split):
        raise StoreConflictError(
            f"task {task!r}: version {version!r} is in the live traffic split; change or end the split first")
    return replace(state, history=tuple(v for v in state.history if v != version))
