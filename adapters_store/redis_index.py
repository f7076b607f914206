"""A versioned adapter store for many nodes: the index in Redis, the bytes on a shared filesystem.

Redis holds what must be shared and consistent: which tasks and versions exist, each task's active
pointer, rollback history and traffic split, and the change channel. Every pointer or split change is
one MULTI/EXEC under WATCH (optimistic, retried on a concurrent change) that also PUBLISHes the
change, so the pointer, the split and the notification cannot disagree. Keys, for prefix P (default
"prad:adapters:"):

    P tasks                  set of task ids
    P task:<t>:active        string: the active version (absent = none)
    P task:<t>:history       list: previously active versions, oldest first
    P task:<t>:split         string: the traffic split, [[version, weight], ...] (JSON; absent = none)
    P task:<t>:versions      hash: version -> {"created_s", "num_bytes"} (JSON)
    P changes                pub/sub channel: {"task", "active"} (JSON) per pointer or split change

The bytes live in immutable version folders on the shared filesystem, in the same layout as
FilesystemStore (shared_root/<task>/versions/<version>/...), not in Redis: adapters run to tens or
hundreds of MB, Redis keeps every value in RAM (and replicates and persists all of it), large values
stall its single thread, and the prefill nodes already mount a shared filesystem for the model.
Bytes are written (atomically) before the index names them, so a listed version is always whole.

Notifications: a listener thread (started by `subscribe` or `start`) delivers pub/sub messages within
milliseconds and also polls every `poll_interval_s`, which catches messages lost while disconnected.
Every Redis failure surfaces as StoreUnavailableError naming the server; sockets have timeouts, so
nothing hangs. Run Redis with persistence (appendonly): the active pointers exist only there.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from adapters_store.base import (
    ChangeCallback,
    Routing,
    Split,
    StoreCorruptError,
    StoredAdapter,
    StoreUnavailableError,
    UnknownTaskError,
    UnknownVersionError,
    Unsubscribe,
    VersionedAdapterStore,
    VersionInfo,
    validate_version,
)
from adapters_store.notify import ChangeNotifier
from adapters_store.redis_listener import ChangeListener
from adapters_store.state import (
    MAX_HISTORY,
    SplitPairs,
    TaskState,
    activated,
    rolled_back,
    routing_token,
    split_from_list,
    split_to_list,
    validated_split,
    with_split,
    without_split,
    without_version,
)
from adapters_store.version_files import VersionFiles, is_task_id
from prad.adapters.config import validate_task_id
from prad.adapters.io import content_version

log = logging.getLogger(__name__)

# change(old state, existing versions) -> new state; may raise to abort the transaction
Change = Callable[[TaskState, set[str]], TaskState]


class RedisIndexStore(VersionedAdapterStore):
    def __init__(self, url: str, shared_root: Path, *, prefix: str = "prad:adapters:",
                 poll_interval_s: float = 2.0, socket_timeout_s: float = 2.0,
                 max_history: int = MAX_HISTORY) -> None:
        """`url`: redis://[:password@]host:port/db, or rediss:// for TLS (ssl_* options as URL params)."""
        self.files = VersionFiles(Path(shared_root))
        self.prefix = prefix
        self.max_history = max_history
        self.redis_url = redact_url(url)  # for messages: never the password
        # One quick retry on a fresh connection: after a Redis restart the pooled sockets are dead.
        # Typed Any: redis-py's annotations ignore decode_responses=True (every reply here is a str).
        self._client: Any = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            health_check_interval=max(1, int(poll_interval_s)), retry=Retry(NoBackoff(), 1))
        self._notifier = ChangeNotifier()
        self._listener = ChangeListener(self._client, prefix + "changes", self._on_message, self.poll,
                                        poll_interval_s)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the listener thread (pub/sub + periodic poll); `subscribe` does this itself."""
        self._listener.start()

    def close(self) -> None:
        self._listener.stop()
        self._client.close()

    def __enter__(self) -> RedisIndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ping(self) -> None:
        """StoreUnavailableError unless Redis answers (for readiness checks)."""
        with self._redis():
            self._client.ping()

    # -- reads -------------------------------------------------------------------------------------

    def tasks(self) -> list[str]:
        return sorted(self._snapshot())

    def known_tasks(self) -> list[str]:
        with self._redis():
            return sorted(self._client.smembers(self._key("tasks")))

    def active_version(self, task: str) -> str | None:
        if not is_task_id(task):
            return None
        with self._redis():
            return self._client.get(self._task_key(task, "active"))

    def routing(self, task: str) -> Routing | None:
        if not is_task_id(task):
            return None
        active_key, split_key = self._task_key(task, "active"), self._task_key(task, "split")
        with self._redis():
            active, raw_split = self._client.mget([active_key, split_key])
        return None if active is None else Routing(active, self._parse_split(raw_split, split_key))

    def split(self, task: str) -> Split | None:
        routing = self.routing(task)
        return dict(routing.split) if routing is not None and routing.split else None

    def versions(self, task: str) -> list[VersionInfo]:
        with self._redis():
            pipe = self._client.pipeline(transaction=True)
            pipe.sismember(self._key("tasks"), task)
            pipe.hgetall(self._task_key(task, "versions"))
            pipe.get(self._task_key(task, "active"))
            is_known, metas, active = pipe.execute()
        if not is_known:
            raise UnknownTaskError(task)
        infos = [_version_info(v, meta, v == active) for v, meta in metas.items()]
        return sorted(infos, key=lambda info: (info.created_s, info.version))

    def read_version(self, task: str, version: str) -> StoredAdapter:
        validate_version(version)
        self._require_version(task, version)
        try:
            return self.files.read(task, version)
        except UnknownVersionError:
            raise StoreCorruptError(f"task {task!r} version {version!r} is in the Redis index but its files "
                                    f"are missing under {self.files.root}") from None

    # -- writes ------------------------------------------------------------------------------------

    def put(self, task: str, config_bytes: bytes, weight_bytes: bytes) -> str:
        validate_task_id(task)
        version = content_version(config_bytes, weight_bytes)
        meta = json.dumps({"created_s": time.time(), "num_bytes": len(config_bytes) + len(weight_bytes)})
        for _ in range(2):  # a second pass only if a concurrent delete_task removed the files meanwhile
            if not self.files.has_version(task, version):
                self.files.commit(task, self.files.stage(config_bytes, weight_bytes))
            with self._redis():
                pipe = self._client.pipeline(transaction=True)
                pipe.hsetnx(self._task_key(task, "versions"), version, meta).sadd(self._key("tasks"), task).execute()
            if self.files.has_version(task, version):
                break
        return version

    def activate(self, task: str, version: str) -> None:
        validate_task_id(task)
        validate_version(version)
        self._transact(task, lambda old, _: activated(old, version, self.max_history), version=version)

    def rollback(self, task: str) -> str:
        validate_task_id(task)
        new = self._transact(task, lambda old, existing: rolled_back(old, task, existing))
        assert new.active is not None
        return new.active

    def set_split(self, task: str, weights: Mapping[str, int]) -> None:
        validate_task_id(task)
        weights = dict(validated_split(weights))  # malformed splits fail before Redis is asked
        self._transact(task, lambda old, existing: with_split(old, task, weights, existing))

    def clear_split(self, task: str) -> None:
        validate_task_id(task)
        self._transact(task, lambda old, _: without_split(old))

    def delete_version(self, task: str, version: str) -> None:
        validate_task_id(task)
        validate_version(version)
        self._transact(task, lambda old, _: without_version(old, task, version), version=version, is_delete=True)
        self.files.remove_version(task, version)

    def delete_task(self, task: str) -> None:
        validate_task_id(task)
        keys = [self._task_key(task, name) for name in ("active", "history", "split", "versions")]

        def body(pipe: Any) -> str | None:
            if not pipe.sismember(self._key("tasks"), task):
                raise UnknownTaskError(task)
            active = pipe.get(keys[0])
            pipe.multi()
            pipe.delete(*keys).srem(self._key("tasks"), task)
            if active is not None:
                pipe.publish(self._key("changes"), json.dumps({"task": task, "active": None}))
            return active

        with self._redis():
            was_active = self._client.transaction(body, self._key("tasks"), *keys, value_from_callable=True)
        self.files.remove_task(task)
        if was_active is not None:
            self._notifier.publish(task, None)

    # -- notifications -----------------------------------------------------------------------------

    def subscribe(self, callback: ChangeCallback) -> Unsubscribe:
        unsubscribe = self._notifier.subscribe(callback)
        self.start()
        return unsubscribe

    def poll(self) -> dict[str, str | None]:
        return self._notifier.reconcile(self._snapshot())

    def _on_message(self, data: str) -> None:
        # The message only says which task changed; the pointer is re-read, so a late message can
        # never roll a subscriber back to a value that was already superseded.
        try:
            task = json.loads(data)["task"]
        except (ValueError, KeyError, TypeError):
            log.warning("adapter store: ignoring malformed change message %r", data)
            return
        if is_task_id(task):
            self._notifier.observe(task, self._token(task))

    # -- internals ---------------------------------------------------------------------------------

    def _transact(self, task: str, change: Change, version: str | None = None, is_delete: bool = False) -> TaskState:
        """Read the task's state, apply `change`, write it back and publish, all-or-nothing.

        `version`, if given, must exist (UnknownVersionError); with `is_delete` it is also unlisted.
        A change of the active version or the split is published (and notified here) once.
        """
        active_key, history_key, split_key, versions_key = (
            self._task_key(task, n) for n in ("active", "history", "split", "versions"))

        def body(pipe: Any) -> tuple[TaskState, TaskState]:
            if not pipe.sismember(self._key("tasks"), task):
                raise UnknownTaskError(task)
            old = TaskState(pipe.get(active_key), tuple(pipe.lrange(history_key, 0, -1)),
                            self._parse_split(pipe.get(split_key), split_key))
            existing = set(pipe.hkeys(versions_key))
            if version is not None and version not in existing:
                raise UnknownVersionError(task, version)
            new = change(old, existing)
            pipe.multi()
            if is_delete:
                pipe.hdel(versions_key, version)
            if new.history != old.history:
                pipe.delete(history_key)
                if new.history:
                    pipe.rpush(history_key, *new.history)
            if new.active != old.active:
                pipe.set(active_key, new.active)  # rollback and activate always leave one active
            if new.split != old.split:
                if new.split:
                    pipe.set(split_key, json.dumps(split_to_list(new.split)))
                else:
                    pipe.delete(split_key)
            if routing_token(new) != routing_token(old):
                pipe.publish(self._key("changes"), json.dumps({"task": task, "active": new.active}))
            return old, new

        with self._redis():
            old, new = self._client.transaction(body, self._key("tasks"), active_key, history_key, split_key,
                                                versions_key, value_from_callable=True)
        if routing_token(new) != routing_token(old):
            self._notifier.publish(task, routing_token(new))
        return new

    def _snapshot(self) -> dict[str, str]:
        """{task: routing token} for every task with an active version: one MGET of pointers and splits."""
        with self._redis():
            tasks = sorted(self._client.smembers(self._key("tasks")))
            keys = [self._task_key(t, name) for t in tasks for name in ("active", "split")]
            values = self._client.mget(keys) if tasks else []
        snapshot: dict[str, str] = {}
        for i, task in enumerate(tasks):
            active, raw_split, split_key = values[2 * i], values[2 * i + 1], keys[2 * i + 1]
            token = None if active is None else routing_token(Routing(active, self._parse_split(raw_split, split_key)))
            if token is not None:
                snapshot[task] = token
        return snapshot

    def _token(self, task: str) -> str | None:
        """The task's current routing token (None: no active version)."""
        routing = self.routing(task)
        return None if routing is None else routing_token(routing)

    def _parse_split(self, raw: str | None, key: str) -> SplitPairs:
        """A split key's value as pairs (absent = none); StoreCorruptError naming the key if damaged."""
        if raw is None:
            return ()
        try:
            return split_from_list(json.loads(raw))
        except (ValueError, TypeError) as e:
            raise StoreCorruptError(f"adapter store Redis at {self.redis_url}: key {key!r} holds an unreadable "
                                    f"traffic split ({e})") from e

    def _require_version(self, task: str, version: str) -> None:
        if not is_task_id(task):
            raise UnknownTaskError(task)
        with self._redis():
            pipe = self._client.pipeline(transaction=True)
            is_known, has_version = pipe.sismember(self._key("tasks"), task).hexists(
                self._task_key(task, "versions"), version).execute()
        if not is_known:
            raise UnknownTaskError(task)
        if not has_version:
            raise UnknownVersionError(task, version)

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def _task_key(self, task: str, name: str) -> str:
        return f"{self.prefix}task:{task}:{name}"

    @contextmanager
    def _redis(self) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as e:
            raise StoreUnavailableError(f"adapter store Redis at {self.redis_url}: {type(e).__name__}: {e}") from e


def _version_info(version: str, meta: str, is_active: bool) -> VersionInfo:
    data: dict[str, Any] = json.loads(meta)
    return VersionInfo(version, float(data["created_s"]), int(data["num_bytes"]), is_active)


def redact_url(url: str) -> str:
    """The URL with any password replaced by '***'."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
