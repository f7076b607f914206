"""The pure pointer/history transitions shared by every versioned store."""

from __future__ import annotations

import pytest

from adapters_store.base import StoreConflictError, StoreCorruptError, VersionInfo, validate_version
from adapters_store.state import TaskState, activated, rolled_back, without_version

A, B, C = "a" * 16, "b" * 16, "c" * 16


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
