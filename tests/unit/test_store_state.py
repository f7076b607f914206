"""The pure pointer/history transitions shared by every versioned store."""

from __future__ import annotations

import json

import pytest

from adapters_store.base import (
    InvalidSplitError,
    Routing,
    StoreConflictError,
    StoreCorruptError,
    UnknownVersionError,
    VersionInfo,
    validate_version,
)
from adapters_store.state import (
    TaskState,
    activated,
    rolled_back,
    routing_token,
    token_active,
    with_split,
    without_split,
    without_version,
)

A, B, C = "a" * 16, "b" * 16, "c" * 16
ALL = {A, B, C}


def test_activate_pushes_the_outgoing_version() -> None:
    state = activated(activated(activated(TaskState(), A), B), C)
    assert state == TaskState(C, (A, B))
    assert activated(state, C) is state


def test_history_is_bounded() -> None:
    state = TaskState()
    for version in (A, B, C):
        state = activated(state, version, max_history=1)
    assert state == TaskState(C, (B,))
    assert activated(state, A, max_history=0) == TaskState(A, ())


def test_rollback_pops_and_skips_missing_or_active_entries() -> None:
    state = TaskState(C, (A, C, B))
    assert rolled_back(state, "t", existing={A, C}) == TaskState(A, ())
    assert rolled_back(state, "t", existing={A, B, C}) == TaskState(B, (A, C))
    with pytest.raises(StoreConflictError, match="task 't': no previously active version"):
        rolled_back(TaskState(A, (B,)), "t", existing={A})


def test_delete_version_refuses_active_and_cleans_history() -> None:
    assert without_version(TaskState(C, (A, B, A)), "t", A) == TaskState(C, (B,))
    with pytest.raises(StoreConflictError, match=f"version '{C}' is active"):
        without_version(TaskState(C, ()), "t", C)


def test_state_json_roundtrip_and_damage() -> None:
    state = TaskState(B, (A,))
    assert TaskState.from_json(state.to_json(), "x") == state
    assert TaskState.from_json(b'{"active": null, "history": []}', "x") == TaskState()
    for raw in (b"", b"[]", b'{"active": "nope", "history": []}', b'{"active": null}'):
        with pytest.raises(StoreCorruptError, match=r"state\.json: unreadable"):
            TaskState.from_json(raw, "state.json")


def test_validate_version_and_version_info() -> None:
    assert validate_version(A) == A
    info = VersionInfo(A, created_s=1.0, num_bytes=10, is_active=True)
    assert (info.version, info.is_active) == (A, True)


# -- traffic splits --------------------------------------------------------------------------------


def test_with_split_sorts_keeps_the_active_version_and_is_idempotent() -> None:
    state = TaskState(A, (C,))
    split = with_split(state, "t", {C: 10, B: 90}, ALL)
    assert split == TaskState(A, (C,), ((B, 90), (C, 10)))  # sorted by version; active and history stay
    assert with_split(split, "t", {B: 90, C: 10}, ALL) is split  # the same split: no change
    assert with_split(split, "t", {A: 50, B: 50}, ALL).split == ((A, 50), (B, 50))  # may include the active one
    assert with_split(state, "t", {A: 100, B: 0}, ALL).split == ((A, 100), (B, 0))  # zero weights are allowed


@pytest.mark.parametrize(("weights", "message"), [
    ({A: 100}, "at least 2 versions, got 1"),
    ({}, "at least 2 versions, got 0"),
    ({A: 90, B: 20}, "sum to exactly 100, got 110"),
    ({A: 40, B: 40, C: 10}, "sum to exactly 100, got 90"),
    ({A: 101, B: -1}, "integer from 0 to 100, got 101"),
    ({A: 100, B: -0.0}, "integer from 0 to 100, got -0.0"),
    ({A: 50.0, B: 50}, "integer from 0 to 100, got 50.0"),
    ({A: "50", B: 50}, "integer from 0 to 100, got '50'"),
    ({A: True, B: 99}, "integer from 0 to 100, got True"),  # bool is not a weight
    ({A: 50, "nope": 50}, "invalid adapter version 'nope'"),
    ({A: 50, B.upper(): 50}, "invalid adapter version"),
    ({A: 50, 7: 50}, "invalid adapter version 7"),
    ([(A, 50), (B, 50)], "mapping of version to weight, not list"),
])
def test_malformed_splits_are_refused_naming_the_problem(weights: object, message: str) -> None:
    with pytest.raises(InvalidSplitError, match=message) as raised:
        with_split(TaskState(A), "t", weights, ALL)  # type: ignore[arg-type]
    assert isinstance(raised.value, ValueError)


def test_split_needs_an_active_version_and_known_versions() -> None:
    with pytest.raises(StoreConflictError, match="task 't' has no active version"):
        with_split(TaskState(None, (A,)), "t", {A: 50, B: 50}, ALL)
    with pytest.raises(UnknownVersionError, match=f"task 't' has no version '{C}'") as raised:
        with_split(TaskState(A), "t", {A: 50, C: 50}, {A, B})
    assert raised.value.version == C


def test_without_split_clears_it() -> None:
    split = TaskState(A, (C,), ((A, 50), (B, 50)))
    assert without_split(split) == TaskState(A, (C,))
    plain = TaskState(A)
    assert without_split(plain) is plain


def test_activate_and_rollback_end_the_split() -> None:
    split = TaskState(B, (A,), ((B, 90), (C, 10)))
    assert activated(split, C) == TaskState(C, (A, B))  # promote the canary
    assert activated(split, B) == TaskState(B, (A,))  # re-activating the baseline ends the canary
    assert rolled_back(split, "t", ALL) == TaskState(A, ())


def test_deleting_a_version_in_the_split_is_refused() -> None:
    state = TaskState(A, (C,), ((B, 90), (C, 10)))
    for version in (B, C):
        with pytest.raises(StoreConflictError, match=f"version '{version}' is in the live traffic split; change or "
                                                     "end the split first"):
            without_version(state, "t", version)
    assert without_version(without_split(state), "t", C) == TaskState(A, ())


def test_split_json_roundtrip_and_old_files() -> None:
    state = TaskState(A, (C,), ((A, 80), (B, 20)))
    assert json.loads(state.to_json()) == {"active": A, "history": [C], "split": [[A, 80], [B, 20]]}
    assert TaskState.from_json(state.to_json(), "x") == state
    assert TaskState.from_json(TaskState(A).to_json(), "x") == TaskState(A)
    old_file = json.dumps({"active": A, "history": [B]}).encode()  # written before splits existed
    assert TaskState.from_json(old_file, "x") == TaskState(A, (B,))


@pytest.mark.parametrize("split", [
    {"x": 1},
    [[A, 100]],
    [[A, 60], [B, 60]],
    [[A, 50], [A, 50]],
    [[A, 50, 1], [B, 50]],
    [[A, 50], "bb"],
    [["nope", 50], [B, 50]],
    None,
])
def test_damaged_split_in_state_file(split: object) -> None:
    raw = json.dumps({"active": A, "history": [], "split": split}).encode()
    with pytest.raises(StoreCorruptError, match=r"state\.json: unreadable"):
        TaskState.from_json(raw, "state.json")


def test_routing_token_changes_with_active_or_split() -> None:
    assert routing_token(TaskState()) is None
    assert routing_token(TaskState(None, (A,))) is None
    plain = TaskState(A, (C,))
    assert routing_token(plain) == A  # without a split, the active version itself
    tokens = {routing_token(s) for s in (plain, TaskState(B), with_split(plain, "t", {A: 90, B: 10}, ALL),
                                         with_split(plain, "t", {A: 80, B: 20}, ALL),
                                         with_split(plain, "t", {A: 80, C: 20}, ALL),
                                         TaskState(B, (), ((A, 90), (B, 10))))}
    assert len(tokens) == 6
    assert routing_token(TaskState(A, (B,), ((A, 90), (B, 10)))) == routing_token(TaskState(A, (), ((A, 90), (B, 10))))
    assert routing_token(Routing(A, ((A, 90), (B, 10)))) == routing_token(TaskState(A, (), ((A, 90), (B, 10))))
    for token in tokens:
        assert token_active(token) in (A, B)
    assert token_active(routing_token(TaskState(B, (), ((A, 90), (B, 10))))) == B
    assert token_active(None) is None
