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
    StoreConflictError,
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
