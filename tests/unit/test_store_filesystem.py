"""FilesystemStore: immutable content-hashed versions, one active pointer, rollback, deletion, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from adapters_store import version_files
from adapters_store.base import (
    InvalidSplitError,
    InvalidVersionError,
    Routing,
    StoreConflictError,
    StoreCorruptError,
    UnknownTaskError,
    UnknownVersionError,
)
from adapters_store.filesystem import FilesystemStore
from prad.adapters.config import AdapterError
from prad.adapters.io import content_version

CONFIG_A, WEIGHTS_A = b'{"variant": "prad-pa", "n": 1}', b"weights-a" * 10
CONFIG_B, WEIGHTS_B = b'{"variant": "prad-pa", "n": 2}', b"weights-b" * 20
CONFIG_C, WEIGHTS_C = b'{"variant": "prad-pa", "n": 3}', b"weights-c"


@pytest.fixture
def store(tmp_path: Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "store")


def put_abc(store: FilesystemStore, task: str = "t1") -> tuple[str, str, str]:
    return (store.put(task, CONFIG_A, WEIGHTS_A), store.put(task, CONFIG_B, WEIGHTS_B),
            store.put(task, CONFIG_C, WEIGHTS_C))


def test_put_returns_content_version_and_does_not_activate(store: FilesystemStore) -> None:
    version = store.put("t1", CONFIG_A, WEIGHTS_A)
    assert version == content_version(CONFIG_A, WEIGHTS_A)
    assert store.known_tasks() == ["t1"]
    assert store.tasks() == []
    assert store.active_version("t1") is None
    with pytest.raises(UnknownTaskError, match="no active adapter version"):
        store.read("t1")
    stored = store.read_version("t1", version)
    assert (stored.config_bytes, stored.weight_bytes, stored.version) == (CONFIG_A, WEIGHTS_A, version)


def test_put_is_idempotent(store: FilesystemStore) -> None:
    first = store.put("t1", CONFIG_A, WEIGHTS_A)
    created_s = store.versions("t1")[0].created_s
    assert store.put("t1", CONFIG_A, WEIGHTS_A) == first
    assert [(v.version, v.created_s) for v in store.versions("t1")] == [(first, created_s)]
    assert list((store.root / ".tmp").iterdir()) == []  # no staging left behind


def test_activate_read_stamp_and_versions(store: FilesystemStore) -> None:
    a, b, _ = put_abc(store)
    store.activate("t1", a)
    assert store.tasks() == ["t1"]
    assert store.stamp("t1") == a
    assert store.read("t1").weight_bytes == WEIGHTS_A
    store.activate("t1", b)
    assert store.stamp("t1") == b
    assert store.read("t1").config_bytes == CONFIG_B
    infos = store.versions("t1")
    assert [info.version for info in infos] == [a, b, content_version(CONFIG_C, WEIGHTS_C)]  # oldest first
    assert [info.is_active for info in infos] == [False, True, False]
    assert infos[1].num_bytes == len(CONFIG_B) + len(WEIGHTS_B)


def test_activate_unknown_task_or_version(store: FilesystemStore) -> None:
    a = store.put("t1", CONFIG_A, WEIGHTS_A)
    missing = "0123456789abcdef"
    with pytest.raises(UnknownVersionError, match=f"task 't1' has no version '{missing}'"):
        store.activate("t1", missing)
    with pytest.raises(UnknownTaskError, match="unknown task 't2'"):
        store.activate("t2", a)
    assert store.active_version("t1") is None


def test_rollback_walks_back_through_history(store: FilesystemStore) -> None:
    a, b, c = put_abc(store)
    with pytest.raises(StoreConflictError, match="no previously active version"):
        store.rollback("t1")
    for version in (a, b, c):
        store.activate("t1", version)
    assert store.rollback("t1") == b
    assert store.rollback("t1") == a
    with pytest.raises(StoreConflictError, match="'t1'"):
        store.rollback("t1")
    assert store.active_version("t1") == a


def test_rollback_skips_deleted_versions(store: FilesystemStore) -> None:
    a, b, c = put_abc(store)
    for version in (a, b, c):
        store.activate("t1", version)
    store.delete_version("t1", b)
    assert store.rollback("t1") == a


def test_activating_the_active_version_is_a_no_op(store: FilesystemStore) -> None:
    a, b, _ = put_abc(store)
    store.activate("t1", a)
    store.activate("t1", b)
    store.activate("t1", b)
    assert store.rollback("t1") == a  # not b: the repeat pushed nothing


def test_delete_version_refuses_the_active_one(store: FilesystemStore) -> None:
    a, b, _ = put_abc(store)
    store.activate("t1", a)
    with pytest.raises(StoreConflictError, match=f"version '{a}' is active"):
        store.delete_version("t1", a)
    assert store.read("t1").version == a
    store.delete_version("t1", b)
    assert b not in [info.version for info in store.versions("t1")]
    with pytest.raises(UnknownVersionError):
        store.read_version("t1", b)
    with pytest.raises(UnknownVersionError):
        store.delete_version("t1", b)


def test_delete_task(store: FilesystemStore) -> None:
    a, _, _ = put_abc(store)
    store.activate("t1", a)
    store.put("t2", CONFIG_A, WEIGHTS_A)
    store.delete_task("t1")
    assert store.known_tasks() == ["t2"]
    assert store.tasks() == []
    with pytest.raises(UnknownTaskError):
        store.versions("t1")
    with pytest.raises(UnknownTaskError):
        store.delete_task("t1")
    assert store.put("t1", CONFIG_A, WEIGHTS_A) == a  # a task can be created again
    assert store.active_version("t1") is None


@pytest.mark.parametrize("task", ["Bad", "base", "", "../x", "a/b", "x" * 65])
def test_invalid_task_ids_refused_on_write_and_unknown_on_read(store: FilesystemStore, task: str) -> None:
    with pytest.raises(AdapterError, match="invalid task id"):
        store.put(task, CONFIG_A, WEIGHTS_A)
    with pytest.raises(AdapterError, match="invalid task id"):
        store.delete_task(task)
    assert store.active_version(task) is None
    with pytest.raises(UnknownTaskError):
        store.read(task)
    with pytest.raises(UnknownTaskError):
        store.versions(task)


@pytest.mark.parametrize("version", ["", "abc", "0123456789ABCDEF", "0123456789abcdef0", "../../../etc/pa"])
def test_invalid_versions_refused(store: FilesystemStore, version: str) -> None:
    store.put("t1", CONFIG_A, WEIGHTS_A)
    for call in (store.activate, store.delete_version, store.read_version):
        with pytest.raises(InvalidVersionError, match="16 lowercase hex"):
            call("t1", version)


def test_state_file_is_json_and_no_temp_files_remain(store: FilesystemStore) -> None:
    a, b, _ = put_abc(store)
    store.activate("t1", a)
    store.activate("t1", b)
    state = json.loads((store.root / "t1" / "state.json").read_text())
    assert state == {"active": b, "history": [a], "split": []}
    assert sorted(p.name for p in (store.root / "t1").iterdir()) == ["state.json", "versions"]


def test_failed_state_write_leaves_the_old_pointer(store: FilesystemStore, monkeypatch) -> None:
    a, b, _ = put_abc(store)
    store.activate("t1", a)

    def crash(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(version_files.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.activate("t1", b)
    monkeypatch.undo()
    assert store.active_version("t1") == a
    assert sorted(p.name for p in (store.root / "t1").iterdir()) == ["state.json", "versions"]


def test_failed_put_exposes_no_half_written_version(store: FilesystemStore, monkeypatch) -> None:
    real_write = version_files._write_synced

    def write_config_then_crash(path: Path, data: bytes) -> None:
        if path.name == version_files.WEIGHTS_FILE:
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(version_files, "_write_synced", write_config_then_crash)
    with pytest.raises(OSError, match="disk full"):
        store.put("t1", CONFIG_A, WEIGHTS_A)
    monkeypatch.undo()
    assert store.known_tasks() == []
    assert list((store.root / ".tmp").iterdir()) == []
    assert store.put("t1", CONFIG_A, WEIGHTS_A) == content_version(CONFIG_A, WEIGHTS_A)


def test_staging_leftovers_are_never_versions_or_tasks(store: FilesystemStore) -> None:
    a = store.put("t1", CONFIG_A, WEIGHTS_A)
    (store.root / ".tmp" / f"{a}.crashed").mkdir()  # a writer that died mid-put
    (store.root / "t1" / "versions" / "not-a-version").mkdir()
    assert [info.version for info in store.versions("t1")] == [a]
    assert store.known_tasks() == ["t1"]


def test_damaged_state_file_raises_naming_it(store: FilesystemStore) -> None:
    a = store.put("t1", CONFIG_A, WEIGHTS_A)
    store.activate("t1", a)
    (store.root / "t1" / "state.json").write_text("{not json")
    with pytest.raises(StoreCorruptError, match=r"state\.json"):
        store.read("t1")


def test_two_instances_share_one_root(tmp_path: Path) -> None:
    first, second = FilesystemStore(tmp_path), FilesystemStore(tmp_path)
    a, b, _ = put_abc(first)
    second.activate("t1", a)
    assert first.read("t1").version == a
    first.activate("t1", b)
    assert second.rollback("t1") == a
    assert os.path.isfile(tmp_path / ".lock")


@pytest.mark.parametrize("version", ["0123456789abcdef\n", "0123456789ABCDEF", "0123456789abcde"])
def test_version_ids_must_match_whole(version: str) -> None:
    from adapters_store.base import validate_version

    with pytest.raises(Exception, match="version"):
        validate_version(version)


# -- traffic splits --------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str | None]] = []

    def __call__(self, task: str, active: str | None) -> None:
        self.events.append((task, active))


def test_set_and_clear_split(store: FilesystemStore) -> None:
    a, b, c = put_abc(store)
    store.activate("t1", a)
    assert (store.split("t1"), store.routing("t1")) == (None, Routing(a))
    store.set_split("t1", {b: 10, a: 90})
    assert store.split("t1") == {a: 90, b: 10}
    assert store.routing("t1") == Routing(a, tuple(sorted([(a, 90), (b, 10)])))
    assert store.active_version("t1") == a  # the baseline stays active: read/stamp serve it
    assert store.read("t1").version == a
    store.set_split("t1", {b: 50, c: 50})  # replaces the split; need not include the active version
    assert store.split("t1") == {b: 50, c: 50}
    state = json.loads((store.root / "t1" / "state.json").read_text())
    assert state == {"active": a, "history": [], "split": [[v, 50] for v in sorted([b, c])]}
    store.clear_split("t1")
    store.clear_split("t1")  # no split: a no-op
    assert (store.split("t1"), store.routing("t1")) == (None, Routing(a))


def test_split_reads_of_unknown_or_inactive_tasks(store: FilesystemStore) -> None:
    store.put("t1", CONFIG_A, WEIGHTS_A)
    for task in ("t1", "t2", "Not A Task"):
        assert store.split(task) is None
        assert store.routing(task) is None


def test_set_split_errors(store: FilesystemStore) -> None:
    a, b, _ = put_abc(store)
    with pytest.raises(StoreConflictError, match="no active version"):
        store.set_split("t1", {a: 50, b: 50})
    store.activate("t1", a)
    missing = "0123456789abcdef"
    with pytest.raises(UnknownVersionError, match=f"has no version '{missing}'"):
        store.set_split("t1", {a: 50, missing: 50})
    with pytest.raises(UnknownTaskError):
        store.set_split("t2", {a: 50, b: 50})
    with pytest.raises(UnknownTaskError):
        store.clear_split("t2")
    with pytest.raises(InvalidSplitError, match="sum to exactly 100, got 99"):
        store.set_split("t1", {a: 50, b: 49})
    with pytest.raises(InvalidSplitError, match="invalid adapter version"):
        store.set_split("t1", {a: 50, "../../x": 50})
    with pytest.raises(InvalidSplitError, match="at least 2 versions"):
        store.set_split("t1", {a: 100})
    with pytest.raises(AdapterError, match="invalid task id"):
        store.set_split("Bad", {a: 50, b: 50})
    with pytest.raises(AdapterError, match="invalid task id"):
        store.clear_split("Bad")
    assert store.split("t1") is None


def test_activate_and_rollback_end_the_split(store: FilesystemStore) -> None:
    a, b, c = put_abc(store)
    store.activate("t1", a)
    store.activate("t1", b)
    store.set_split("t1", {b: 90, c: 10})
    store.activate("t1", c)  # promote the canary
    assert store.routing("t1") == Routing(c)
    store.set_split("t1", {b: 90, c: 10})
    assert store.rollback("t1") == b  # abort: back to the previous version, split gone
    assert store.routing("t1") == Routing(b)
    store.set_split("t1", {b: 90, c: 10})
    store.activate("t1", b)  # re-activating the baseline ends the canary
    assert store.routing("t1") == Routing(b)


def test_deleting_a_version_in_the_split_is_refused(store: FilesystemStore) -> None:
    a, b, c = put_abc(store)
    store.activate("t1", a)
    store.set_split("t1", {a: 90, b: 10})
    with pytest.raises(StoreConflictError, match=f"'{b}' is in the live traffic split; change or end the split"):
        store.delete_version("t1", b)
    assert store.read_version("t1", b).version == b
    store.delete_version("t1", c)  # not in the split
    store.clear_split("t1")
    store.delete_version("t1", b)
    assert [info.version for info in store.versions("t1")] == [a]


def test_split_changes_notify_with_the_active_version(store: FilesystemStore) -> None:
    a, b, c = put_abc(store)
    heard = Recorder()
    store.subscribe(heard)
    store.activate("t1", a)
    store.set_split("t1", {a: 90, b: 10})
    store.set_split("t1", {b: 10, a: 90})  # the same split: no event
    store.set_split("t1", {a: 50, b: 50})
    store.clear_split("t1")
    store.clear_split("t1")  # no split: no event
    store.set_split("t1", {a: 90, c: 10})
    store.activate("t1", c)  # the pointer moves and the split ends: one event
    assert heard.events == [("t1", a)] * 5 + [("t1", c)]


def test_poll_in_another_instance_sees_split_changes(tmp_path: Path) -> None:
    writer, node, heard = FilesystemStore(tmp_path), FilesystemStore(tmp_path), Recorder()
    a, b, _ = put_abc(writer)
    writer.activate("t1", a)
    node.subscribe(heard)  # baseline: t1 -> a, no split
    writer.set_split("t1", {a: 90, b: 10})
    assert node.poll() == {"t1": a}  # the active version did not move, but the split did
    assert node.routing("t1") == Routing(a, tuple(sorted([(a, 90), (b, 10)])))
    assert node.poll() == {}
    writer.clear_split("t1")
    assert node.poll() == {"t1": a}
    assert heard.events == [("t1", a), ("t1", a)]


def test_state_file_without_split_is_still_readable(store: FilesystemStore) -> None:
    a, b, _ = put_abc(store)
    (store.root / "t1" / "state.json").write_text(json.dumps({"active": a, "history": [b]}))  # an older store
    assert store.routing("t1") == Routing(a)
    store.set_split("t1", {a: 90, b: 10})
    assert store.split("t1") == {a: 90, b: 10}
    assert store.rollback("t1") == b
