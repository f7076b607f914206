"""RedisIndexStore against a real redis-server on loopback: two "nodes" sharing one shared root."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from adapters_store.base import (
    InvalidSplitError,
    Routing,
    StoreConflictError,
    StoreCorruptError,
    StoreUnavailableError,
    UnknownTaskError,
    UnknownVersionError,
)
from adapters_store.redis_index import RedisIndexStore
from prad.adapters.config import AdapterError
from prad.adapters.io import content_version
from tests.redis_fixture import RedisServer, free_port, running_redis

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFIX = "prad:adapters:"
MakeNode = Callable[..., RedisIndexStore]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def make_node(redis_server: RedisServer, tmp_path: Path) -> Iterator[MakeNode]:
    """Nodes of one deployment: same Redis, same shared root; all closed at teardown."""
    nodes: list[RedisIndexStore] = []

    def make(**kwargs: object) -> RedisIndexStore:
        kwargs.setdefault("poll_interval_s", 60.0)  # by default only pub/sub can deliver in time
        node = RedisIndexStore(redis_server.url, tmp_path / "shared", **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.close()


class Heard:
    """A subscriber that records (task, active, arrival time) and lets a test wait for an event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, float]] = []
        self._cond = threading.Condition()

    def __call__(self, task: str, active: str | None) -> None:
        with self._cond:
            self.events.append((task, active, time.monotonic()))
            self._cond.notify_all()

    def wait_for(self, task: str, active: str | None, timeout_s: float) -> float:
        """Seconds until (task, active) was heard; fails the test after timeout_s."""
        start = time.monotonic()
        with self._cond:
            found = self._cond.wait_for(lambda: any(e[:2] == (task, active) for e in self.events), timeout_s)
        assert found, f"({task!r}, {active!r}) not heard within {timeout_s} s; heard {self.events}"
        return next(e[2] for e in self.events if e[:2] == (task, active)) - start


def blob(n: int) -> tuple[bytes, bytes]:
    return json.dumps({"n": n}).encode(), f"weights-{n}".encode() * 100


def test_versions_are_shared_between_nodes(make_node: MakeNode, tmp_path: Path) -> None:
    a_node, b_node = make_node(), make_node()
    a = a_node.put("t1", *blob(1))
    assert a == content_version(*blob(1))
    assert a_node.put("t1", *blob(1)) == a  # idempotent
    assert b_node.known_tasks() == ["t1"]
    assert b_node.tasks() == []  # put does not activate
    with pytest.raises(UnknownTaskError, match="no active adapter version"):
        b_node.read("t1")
    a_node.activate("t1", a)
    assert b_node.tasks() == ["t1"]
    assert b_node.stamp("t1") == a
    assert b_node.read("t1").weight_bytes == blob(1)[1]
    [info] = b_node.versions("t1")
    assert (info.version, info.is_active, info.num_bytes) == (a, True, sum(map(len, blob(1))))
    assert (tmp_path / "shared" / "t1" / "versions" / a / "adapter.safetensors").is_file()


def test_activation_on_one_node_notifies_the_other_within_a_second(make_node: MakeNode) -> None:
    a_node, b_node, heard = make_node(), make_node(), Heard()
    a, b = a_node.put("t1", *blob(1)), a_node.put("t1", *blob(2))
    b_node.subscribe(heard)
    a_node.activate("t1", a)
    assert heard.wait_for("t1", a, timeout_s=1.0) < 1.0
    a_node.activate("t1", b)
    heard.wait_for("t1", b, timeout_s=1.0)
    assert a_node.rollback("t1") == a
    a_node.delete_task("t1")
    heard.wait_for("t1", None, timeout_s=1.0)
    assert [e[:2] for e in heard.events] == [("t1", a), ("t1", b), ("t1", a), ("t1", None)]


def test_a_node_in_another_process_notifies_within_a_second(make_node: MakeNode, redis_server: RedisServer,
                                                           tmp_path: Path) -> None:
    node, heard = make_node(), Heard()
    version = node.put("t1", *blob(1))
    node.subscribe(heard)
    script = ("import sys, time; from pathlib import Path; from adapters_store.redis_index import RedisIndexStore\n"
              "with RedisIndexStore(sys.argv[1], Path(sys.argv[2])) as store:\n"
              "    store.activate('t1', sys.argv[3])\n"
              "    print(time.time(), flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script, redis_server.url, str(tmp_path / "shared"), version],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True)
    activated_s = float(done.stdout.split()[-1])
    heard.wait_for("t1", version, timeout_s=1.0)
    heard_s = time.time() - (time.monotonic() - heard.events[0][2])
    assert heard_s - activated_s < 1.0


def test_polling_catches_a_change_whose_message_was_missed(make_node: MakeNode, redis_server: RedisServer) -> None:
    a_node, heard = make_node(), Heard()
    a, b = a_node.put("t1", *blob(1)), a_node.put("t1", *blob(2))
    a_node.activate("t1", a)
    b_node = make_node(poll_interval_s=0.2)
    b_node.subscribe(heard)
    # Move the pointer behind pub/sub's back, as if the message had been lost.
    with redis.Redis.from_url(redis_server.url) as client:
        client.set(f"{PREFIX}task:t1:active", b)
    assert heard.wait_for("t1", b, timeout_s=1.0) < 1.0

    c_node = make_node()  # no listener: an explicit poll() does the same
    assert c_node.poll() == {}  # baseline
    a_node.activate("t1", a)
    assert c_node.poll() == {"t1": a}
    assert c_node.poll() == {}


def test_rollback_and_deletion_across_nodes(make_node: MakeNode, tmp_path: Path) -> None:
    a_node, b_node = make_node(), make_node()
    a, b, c = (a_node.put("t1", *blob(n)) for n in (1, 2, 3))
    with pytest.raises(StoreConflictError, match="no previously active version"):
        b_node.rollback("t1")
    for version in (a, b, c):
        a_node.activate("t1", version)
    assert b_node.rollback("t1") == b
    assert a_node.active_version("t1") == b
    with pytest.raises(StoreConflictError, match=f"version '{b}' is active"):
        a_node.delete_version("t1", b)
    b_node.delete_version("t1", a)
    assert not (tmp_path / "shared" / "t1" / "versions" / a).exists()
    with pytest.raises(UnknownVersionError, match=f"task 't1' has no version '{a}'"):
        a_node.read_version("t1", a)
    with pytest.raises(StoreConflictError):
        a_node.rollback("t1")  # the only older version is gone
    with pytest.raises(UnknownTaskError):
        a_node.activate("t2", b)
    with pytest.raises(AdapterError, match="invalid task id"):
        a_node.put("Not A Task", *blob(1))


def test_concurrent_activations_from_two_nodes_lose_nothing(make_node: MakeNode) -> None:
    nodes = [make_node(), make_node()]
    versions = [nodes[0].put("t1", *blob(n)) for n in range(12)]
    threads = [threading.Thread(target=nodes[i % 2].activate, args=("t1", v)) for i, v in enumerate(versions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with redis.Redis.from_url(nodes[0].redis_url, decode_responses=True) as client:
        history = client.lrange(f"{PREFIX}task:t1:history", 0, -1)
    assert sorted([*history, nodes[1].active_version("t1")]) == sorted(versions)


def test_redis_restart_fails_clearly_then_recovers(make_node: MakeNode, redis_server: RedisServer) -> None:
    a_node, b_node, heard = make_node(), make_node(poll_interval_s=0.5), Heard()
    a, b = a_node.put("t1", *blob(1)), a_node.put("t1", *blob(2))
    a_node.activate("t1", a)
    b_node.subscribe(heard)
    with redis.Redis.from_url(redis_server.url) as client:
        client.save()  # this server runs without persistence: keep the index over the restart
    redis_server.stop()

    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=f"Redis at {redis_server.url}"):
        a_node.activate("t1", b)
    with pytest.raises(StoreUnavailableError):
        b_node.read("t1")
    assert time.monotonic() - started < 5.0  # errors, not hangs

    redis_server.start()
    assert b_node.read("t1").version == a  # pooled connections reconnect on their own
    a_node.activate("t1", b)
    assert heard.wait_for("t1", b, timeout_s=4.0) < 4.0  # listener back within its 2 s backoff


def test_unreachable_redis_names_the_server_without_the_password(tmp_path: Path) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    with RedisIndexStore(url, tmp_path / "shared", socket_timeout_s=0.5) as store:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as raised:
            store.ping()
        assert time.monotonic() - started < 3.0
    assert "redis://:***@127.0.0.1" in str(raised.value)
    assert "s3cret" not in str(raised.value)


# -- traffic splits --------------------------------------------------------------------------------


def split_key(task: str) -> str:
    return f"{PREFIX}task:{task}:split"


def test_split_is_shared_and_stored_next_to_the_pointer(make_node: MakeNode, redis_server: RedisServer) -> None:
    a_node, b_node = make_node(), make_node()
    a, b, c = (a_node.put("t1", *blob(n)) for n in (1, 2, 3))
    a_node.activate("t1", a)
    assert (b_node.split("t1"), b_node.routing("t1")) == (None, Routing(a))
    a_node.set_split("t1", {b: 10, a: 90})
    assert b_node.split("t1") == {a: 90, b: 10}
    assert b_node.routing("t1") == Routing(a, tuple(sorted([(a, 90), (b, 10)])))
    assert b_node.active_version("t1") == a and b_node.read("t1").version == a  # the baseline stays active
    with redis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        assert json.loads(client.get(split_key("t1"))) == [[v, w] for v, w in sorted([(a, 90), (b, 10)])]
        b_node.set_split("t1", {b: 50, c: 50})  # replaces it; need not include the active version
        assert b_node.split("t1") == {b: 50, c: 50}
        b_node.clear_split("t1")
        b_node.clear_split("t1")  # no split: a no-op
        assert client.get(split_key("t1")) is None
    assert (a_node.split("t1"), a_node.routing("t1")) == (None, Routing(a))
    for task in ("t2", "Not A Task"):
        assert (a_node.split(task), a_node.routing(task)) == (None, None)


def test_split_errors(make_node: MakeNode) -> None:
    node = make_node()
    a, b = node.put("t1", *blob(1)), node.put("t1", *blob(2))
    with pytest.raises(StoreConflictError, match="no active version"):
        node.set_split("t1", {a: 50, b: 50})
    node.activate("t1", a)
    missing = "0123456789abcdef"
    with pytest.raises(UnknownVersionError, match=f"has no version '{missing}'"):
        node.set_split("t1", {a: 50, missing: 50})
    with pytest.raises(UnknownTaskError):
        node.set_split("t2", {a: 50, b: 50})
    with pytest.raises(UnknownTaskError):
        node.clear_split("t2")
    with pytest.raises(InvalidSplitError, match="integer from 0 to 100, got True"):
        node.set_split("t1", {a: True, b: 99})
    with pytest.raises(InvalidSplitError, match="sum to exactly 100"):
        node.set_split("t1", {a: 60, b: 60})
    with pytest.raises(AdapterError, match="invalid task id"):
        node.set_split("Not A Task", {a: 50, b: 50})
    assert node.split("t1") is None


def test_activate_rollback_and_deletion_with_a_split(make_node: MakeNode, redis_server: RedisServer) -> None:
    node = make_node()
    a, b, c = (node.put("t1", *blob(n)) for n in (1, 2, 3))
    node.activate("t1", a)
    node.activate("t1", b)
    node.set_split("t1", {b: 90, c: 10})
    with pytest.raises(StoreConflictError, match=f"'{c}' is in the live traffic split; change or end the split"):
        node.delete_version("t1", c)
    assert c in [info.version for info in node.versions("t1")]
    node.activate("t1", c)  # promote the canary: the split ends in the same transaction
    assert node.routing("t1") == Routing(c)
    node.set_split("t1", {b: 90, c: 10})
    assert node.rollback("t1") == b
    assert node.routing("t1") == Routing(b)
    node.set_split("t1", {a: 50, b: 50})
    node.delete_task("t1")
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.exists(split_key("t1")) == 0
    node.put("t1", *blob(1))
    node.activate("t1", a)
    assert node.routing("t1") == Routing(a)  # a task created again starts without the old split


def test_split_on_one_node_notifies_the_other_within_a_second(make_node: MakeNode,
                                                              redis_server: RedisServer) -> None:
    a_node, b_node, heard = make_node(), make_node(), Heard()
    a, b, c = (a_node.put("t1", *blob(n)) for n in (1, 2, 3))
    a_node.activate("t1", a)
    b_node.subscribe(heard)
    with redis.Redis.from_url(redis_server.url, decode_responses=True) as client, client.pubsub() as channel:
        channel.subscribe(f"{PREFIX}changes")
        assert channel.get_message(timeout=1.0)["type"] == "subscribe"  # listening before the first write
        a_node.set_split("t1", {a: 90, b: 10})
        assert heard.wait_for("t1", a, timeout_s=1.0) < 1.0  # called with the active version, not the split
        assert b_node.split("t1") == {a: 90, b: 10}
        a_node.set_split("t1", {b: 10, a: 90})  # the same split: nothing published
        a_node.clear_split("t1")
        a_node.activate("t1", c)
        heard.wait_for("t1", c, timeout_s=1.0)
        published = []
        while (message := channel.get_message(timeout=0.5)) is not None:
            if message["type"] == "message":
                published.append(json.loads(message["data"]))
    assert published == [{"task": "t1", "active": a}, {"task": "t1", "active": a}, {"task": "t1", "active": c}]
    # A message only says "re-read": by then the split may already be cleared, so the clear is heard
    # as its own event or folded into the activation's.
    assert [e[:2] for e in heard.events] in ([("t1", a), ("t1", a), ("t1", c)], [("t1", a), ("t1", c)])


def test_polling_catches_a_split_change_whose_message_was_missed(make_node: MakeNode,
                                                                 redis_server: RedisServer) -> None:
    a_node, heard = make_node(), Heard()
    a, b = a_node.put("t1", *blob(1)), a_node.put("t1", *blob(2))
    a_node.activate("t1", a)
    b_node = make_node(poll_interval_s=0.2)
    b_node.subscribe(heard)
    with redis.Redis.from_url(redis_server.url) as client:  # behind pub/sub's back
        client.set(split_key("t1"), json.dumps([[a, 70], [b, 30]]))
    assert heard.wait_for("t1", a, timeout_s=1.0) < 1.0
    assert b_node.split("t1") == {a: 70, b: 30}

    c_node = make_node()  # no listener: an explicit poll() does the same
    assert c_node.poll() == {}  # baseline
    a_node.set_split("t1", {a: 20, b: 80})
    assert c_node.poll() == {"t1": a}
    assert c_node.poll() == {}
    a_node.clear_split("t1")
    assert c_node.poll() == {"t1": a}


def test_a_damaged_split_key_is_reported_naming_it(make_node: MakeNode, redis_server: RedisServer) -> None:
    node = make_node()
    a = node.put("t1", *blob(1))
    node.activate("t1", a)
    with redis.Redis.from_url(redis_server.url) as client:
        client.set(split_key("t1"), "{not json")
    with pytest.raises(StoreCorruptError, match="task:t1:split"):
        node.routing("t1")
