"""FilesystemStore notifications, polling, concurrent writers (threads; processes: tests/integration/
test_store_processes.py), and hot swap through the prefill AdapterCache."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from adapters_store.filesystem import FilesystemStore
from adapters_store.notify import ChangeNotifier
from prad.adapters import AdapterConfig
from prad.adapters.io import CONFIG_FILE, WEIGHTS_FILE, init_tensors, save_adapter
from prad.config import model_config_from_hf
from prad.model import Model
from prad.weights import read_tensors, weights_from_tensors
from prefill_service.adapter_cache import AdapterCache
from tests.helpers import tiny_hf_model

FP = "test-fingerprint"


def blob(n: int) -> tuple[bytes, bytes]:
    return json.dumps({"n": n}).encode(), f"weights-{n}".encode()


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str | None]] = []

    def __call__(self, task: str, active: str | None) -> None:
        self.events.append((task, active))


def test_subscribers_hear_activate_rollback_and_delete_task(tmp_path: Path) -> None:
    store, heard = FilesystemStore(tmp_path), Recorder()
    store.subscribe(heard)
    a, b = store.put("t1", *blob(1)), store.put("t1", *blob(2))
    assert heard.events == []  # put does not activate
    store.activate("t1", a)
    store.activate("t1", a)  # no-op: no event
    store.activate("t1", b)
    store.rollback("t1")
    store.delete_version("t1", b)  # the pointer does not move: no event
    store.delete_task("t1")
    assert heard.events == [("t1", a), ("t1", b), ("t1", a), ("t1", None)]


def test_unsubscribe_and_failing_subscriber(tmp_path: Path) -> None:
    store, heard, gone = FilesystemStore(tmp_path), Recorder(), Recorder()

    def broken(task: str, active: str | None) -> None:
        raise RuntimeError("subscriber bug")

    store.subscribe(broken)
    unsubscribe = store.subscribe(gone)
    store.subscribe(heard)
    a = store.put("t1", *blob(1))
    store.activate("t1", a)
    unsubscribe()
    store.delete_task("t1")
    assert heard.events == [("t1", a), ("t1", None)]
    assert gone.events == [("t1", a)]


def test_subscriber_may_write_to_the_store(tmp_path: Path) -> None:
    store, heard = FilesystemStore(tmp_path), Recorder()
    a, b = store.put("t1", *blob(1)), store.put("t1", *blob(2))

    def roll_back_a(task: str, active: str | None) -> None:
        if active == b:  # a guard that rejects b the moment it goes live
            store.rollback(task)

    store.subscribe(roll_back_a)
    store.subscribe(heard)
    store.activate("t1", a)
    store.activate("t1", b)
    assert heard.events == [("t1", a), ("t1", b), ("t1", a)]
    assert store.active_version("t1") == a


def test_poll_sees_changes_made_by_another_instance(tmp_path: Path) -> None:
    node, other, heard = FilesystemStore(tmp_path), FilesystemStore(tmp_path), Recorder()
    a, b = other.put("t1", *blob(1)), other.put("t1", *blob(2))
    other.activate("t1", a)
    node.subscribe(heard)  # takes the baseline: t1 -> a
    assert node.poll() == {}
    other.activate("t1", b)
    other.activate("t2", other.put("t2", *blob(3)))
    assert node.poll() == {"t1": b, "t2": other.active_version("t2")}
    other.delete_task("t1")
    assert node.poll() == {"t1": None}
    assert heard.events == [("t1", b), ("t2", other.active_version("t2")), ("t1", None)]


def test_first_poll_only_sets_the_baseline() -> None:
    notifier, heard = ChangeNotifier(), Recorder()
    notifier.subscribe(heard)
    assert notifier.reconcile({"t1": "a" * 16}) == {}
    assert notifier.observe("t1", "a" * 16) is False  # an echo of what was seen
    assert notifier.observe("t1", "b" * 16) is True
    assert heard.events == [("t1", "b" * 16)]


def test_concurrent_threads_lose_no_activation(tmp_path: Path) -> None:
    store, heard = FilesystemStore(tmp_path), Recorder()
    store.subscribe(heard)
    versions = [store.put("t1", *blob(i)) for i in range(16)]
    threads = [threading.Thread(target=store.activate, args=("t1", v)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    state = json.loads((tmp_path / "t1" / "state.json").read_text())
    assert sorted([*state["history"], state["active"]]) == sorted(versions)
    assert [active for _, active in heard.events] == [*state["history"], state["active"]]  # in write order


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Model:
    path = tiny_hf_model("llama", tmp_path_factory.mktemp("tiny"))
    config = model_config_from_hf(json.loads((path / "config.json").read_text()))
    return Model(config, weights_from_tensors(config, read_tensors(path)))


def adapter_bytes(tmp_path: Path, model: Model, seed: int) -> tuple[bytes, bytes]:
    config = AdapterConfig(variant="prad-pa", rank=4, base_model_fingerprint=FP)
    folder = tmp_path / f"adapter-{seed}"
    save_adapter(folder, config, init_tensors(config, model.config, seed, 0.2))
    return (folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes()


def test_adapter_cache_follows_activation_and_rollback(tmp_path: Path, tiny: Model) -> None:
    store = FilesystemStore(tmp_path / "store")
    a = store.put("t1", *adapter_bytes(tmp_path, tiny, 1))
    b = store.put("t1", *adapter_bytes(tmp_path, tiny, 2))
    cache = AdapterCache(store, tiny, FP, max_loaded=4)
    store.activate("t1", a)
    assert cache.get("t1").version == a
    store.activate("t1", b)
    assert cache.get("t1").version == b  # the stamp moved: a hot swap, no restart
    store.rollback("t1")
    assert cache.get("t1").version == a
    assert (cache.stats.loads, cache.stats.hits) == (2, 1)
    assert cache.validate_all() == {}
