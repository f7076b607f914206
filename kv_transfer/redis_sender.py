"""Redis sender on the prefill side: KV under a TTL'd key, a job on the stream, tokens on a per-request stream.

One reader thread follows the token streams of every request in flight with a single blocking XREAD
(woken through a private stream when requests are added). Decode delivery is at-least-once: a replica
that takes over a dead one's job replays it, and DedupSink drops the tokens already delivered.
A lost Redis connection fails every request in flight with a 503 rather than leaving it waiting.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import redis

from kv_transfer.base import DedupSink, EventSink, KVSender, TokenEvent
from kv_transfer.handoff import KVHandoff
from kv_transfer.protos import kv_handoff_pb2 as pb
from kv_transfer.redis_keys import RedisKeys
from kv_transfer.wire import encode_handoff, event_from_proto

log = logging.getLogger(__name__)
BLOCK_MS = 1000
MAX_JOBS = 100_000  # approximate cap on the job stream's length


def connect(url: str) -> redis.Redis:
    """A client that never hangs: bounded connect and read timeouts (passwords/TLS come in the URL)."""
    return redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=10)


@dataclass
class _Follow:
    sink: DedupSink
    last_id: str  # last stream entry read
    deadline_s: float  # time.time() after which we give up


class RedisSender(KVSender):
    transport_name = "redis"

    def __init__(self, url: str, prefix: str = "prad:", kv_ttl_s: float = 600.0, timeout_s: float = 300.0) -> None:
        self.url = url
        self.keys = RedisKeys(prefix)
        self.kv_ttl_ms = int(kv_ttl_s * 1000)
        self.timeout_s = timeout_s
        self.redis = connect(url)
        self.sender_id = uuid.uuid4().hex[:12]
        self._follows: dict[str, _Follow] = {}
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._read_loop, name="redis-tokens", daemon=True)
        self._thread.start()

    def send(self, handoff: KVHandoff, sink: EventSink) -> None:
        """Store the KV and queue the job; raises redis errors (the caller answers 503)."""
        header, data = encode_handoff(handoff)
        rid = handoff.request_id
        deadline = handoff.deadline_s or time.time() + self.timeout_s
        with self._lock:
            self._follows[rid] = _Follow(DedupSink(sink), "0", deadline)
        try:
            pipe = self.redis.pipeline(transaction=True)
            # The token stream is created here, and decode only appends to an existing one
            # (NOMKSTREAM): once this side deletes it, a late or duplicate replica cannot recreate it.
            pipe.xadd(self.keys.tokens(rid), {"open": b"1"})
            pipe.pexpire(self.keys.tokens(rid), self.kv_ttl_ms)
            pipe.set(self.keys.kv(rid), data, px=self.kv_ttl_ms)
            pipe.xadd(self.keys.jobs, {"header": header}, maxlen=MAX_JOBS, approximate=True)
            pipe.xadd(self.keys.wake(self.sender_id), {"r": rid}, maxlen=10, approximate=True)
            pipe.execute()
        except redis.RedisError:
            with self._lock:
                self._follows.pop(rid, None)
            raise

    def abort(self, request_id: str) -> None:
        with self._lock:
            follow = self._follows.pop(request_id, None)
        if follow is None:
            return
        try:
            self.redis.publish(self.keys.aborts, request_id)
            self.redis.delete(self.keys.tokens(request_id))
        except redis.RedisError as e:
            log.warning("abort of %s not published: %s", request_id, e)

    def is_ready(self) -> tuple[bool, str]:
        try:
            self.redis.ping()
            if next(iter(self.redis.scan_iter(self.keys.alive_pattern, count=100)), None) is None:
                return False, "no decode replica is alive on Redis"
        except redis.RedisError as e:
            return False, f"redis unreachable: {e}"
        return True, "ok"

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout=BLOCK_MS / 1000 + 6)
        self.redis.delete(self.keys.wake(self.sender_id))
        self.redis.close()

    # --- the reader thread ------------------------------------------------------------------
    def _read_loop(self) -> None:
        wake_key = self.keys.wake(self.sender_id)
        wake_id = "$"
        while True:
            with self._lock:
                if self._stopping:
                    return
                streams = {self.keys.tokens(r): f.last_id for r, f in self._follows.items()}
            streams[wake_key] = wake_id
            try:
                replies = self.redis.xread(streams, block=BLOCK_MS, count=64)
            except redis.RedisError as e:
                self._fail_all(f"redis connection lost: {e}")
                time.sleep(0.5)
                continue
            for key, entries in replies or []:
                key = key.decode() if isinstance(key, bytes) else key
                if key == wake_key:
                    wake_id = entries[-1][0].decode()
                    continue
                self._deliver(key.removeprefix(self.keys.tokens("")), entries)
            self._expire()

    def _deliver(self, request_id: str, entries: list) -> None:
        with self._lock:
            follow = self._follows.get(request_id)
        if follow is None:
            return
        for entry_id, fields in entries:
            follow.last_id = entry_id.decode()
            if b"event" not in fields:
                continue  # the entry that opened the stream
            event = event_from_proto(pb.TokenEvent.FromString(fields[b"event"]))
            follow.sink(event)
            if follow.sink.is_finished:
                self._forget(request_id)
                return

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._follows.pop(request_id, None)
        with contextlib.suppress(redis.RedisError):  # else the stream's TTL removes it
            self.redis.delete(self.keys.tokens(request_id))

    def _expire(self) -> None:
        now = time.time()
        with self._lock:
            late = [r for r, f in self._follows.items() if now > f.deadline_s + 5.0]
        for rid in late:
            follow = self._follows.get(rid)
            if follow is not None:
                follow.sink(TokenEvent(rid, [], "", finish_reason="error", error="no answer from decode in time",
                                       error_status=504))
            self.abort(rid)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            follows, self._follows = self._follows, {}
        for rid, follow in follows.items():
            follow.sink(TokenEvent(rid, [], "", finish_reason="error", error=message, error_status=503))
