"""Redis sender on the prefill side: KV under a TTL'd key, a job on the stream, tokens on a per-request stream.

One reader thread follows the token streams of every request in flight with a single blocking XREAD
(woken through a private stream when requests are added). Decode delivery is at-least-once: a replica
that takes over a dead one's job replays it, and DedupSink drops the tokens already delivered.

No request waits on a decode side that is gone:
* `send` refuses at once (unavailable) when no decode replica is alive (looked up at most every LIVENESS_TTL_S);
* once a second the reader checks the requests it follows: a job whose pending entry has not been
  heartbeated for `replica_lost_s` (its replica died and none took it over), any request while no
  replica at all has been alive for `replica_lost_s`, and any request whose token stream is gone
  (Redis restarted empty, or evicted it) fails as unavailable and its job is removed;
* a lost Redis connection fails every request in flight as unavailable; their jobs are removed once
  Redis answers again, so decode drops them.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import cast

import redis
from redis.typing import EncodableT, FieldT

from kv_transfer.base import DedupSink, EventSink, KVSender, KVStream, TokenEvent
from kv_transfer.handoff import KVHandoff
from kv_transfer.outcome import ErrorKind
from kv_transfer.protos import kv_handoff_pb2 as pb
from kv_transfer.redis_keys import GROUP, RedisKeys, StreamEntry, StreamReply
from kv_transfer.wire import (
    check_wire_format,
    encode_handoff,
    encode_layer,
    event_from_proto,
    header_to_proto,
    kv_checksum,
    kv_wire_num_bytes,
    wire_encoding,
)

log = logging.getLogger(__name__)
BLOCK_MS = 1000
MAX_JOBS = 100_000  # approximate cap on the job stream's length
LIVENESS_TTL_S = 0.5  # a replica liveness lookup is reused this long
CHECK_S = 1.0  # followed requests are checked for a lost replica this often
LOST_MARGIN_S = 3.0  # default replica_lost_s = claim_idle_s + this: a takeover gets its chance first
MAX_STALE_JOBS = 1000  # stale pending entries listed per check
MAX_ORPHANS = 10_000  # requests failed while Redis was unreachable, removed once it answers

# Counts the replicas whose alive key exists, forgetting the others; atomic with a replica's
# heartbeat (SET alive + SADD in one MULTI), so a replica coming back is never forgotten.
_COUNT_ALIVE = """
local n = 0
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. name) == 1 then n = n + 1 else redis.call('SREM', KEYS[1], name) end
end
return n
"""


class NoDecodeReplicaError(RuntimeError):
    """No decode replica is alive: the request is refused (unavailable) instead of waiting for one."""


def connect(url: str) -> redis.Redis:
    """A client that never hangs: bounded connect and read timeouts (passwords/TLS come in the URL)."""
    return redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=10)


@dataclass
class _Follow:
    sink: DedupSink
    last_id: str  # last stream entry read
    deadline_s: float  # time.time() after which we give up
    job_id: str = ""  # the job's entry on the jobs stream ("" until queued)


class RedisSender(KVSender):
    transport_name = "redis"

    def __init__(self, url: str, prefix: str = "prad:", kv_ttl_s: float = 600.0, timeout_s: float = 300.0,
                 claim_idle_s: float = 5.0, replica_lost_s: float | None = None,
                 kv_wire_format: str = "native") -> None:
        """`replica_lost_s`: a followed request fails when decode has shown no life for it this long
        (default claim_idle_s + LOST_MARGIN_S; it must exceed claim_idle_s, after which takeovers start).
        `kv_wire_format`: how the KV bytes travel (kv_transfer.wire: native, bfloat16 or int8)."""
        self.kv_wire_format = check_wire_format(kv_wire_format)
        self.replica_lost_s = claim_idle_s + LOST_MARGIN_S if replica_lost_s is None else replica_lost_s
        if self.replica_lost_s <= claim_idle_s:
            raise ValueError(f"replica_lost_s ({self.replica_lost_s}) must exceed claim_idle_s ({claim_idle_s}): "
                             "a surviving replica takes a dead one's jobs over only after claim_idle_s")
        self.url = url
        self.keys = RedisKeys(prefix)
        self.kv_ttl_ms = int(kv_ttl_s * 1000)
        self.timeout_s = timeout_s
        self.redis = connect(url)
        self._count_alive = self.redis.register_script(_COUNT_ALIVE)
        self.sender_id = uuid.uuid4().hex[:12]
        self._follows: dict[str, _Follow] = {}
        self._orphans: dict[str, str] = {}  # request id -> job id, failed while Redis was unreachable
        self._lock = threading.Condition()
        self._stopping = False
        self._is_alive = False  # last liveness lookup: some decode replica was alive
        self._alive_checked_s = -LIVENESS_TTL_S  # time.monotonic() of that lookup
        self._alive_seen_s = time.monotonic()  # last time a replica was seen alive
        self._next_check_s = 0.0
        self._thread = threading.Thread(target=self._read_loop, name="redis-tokens", daemon=True)
        self._thread.start()
        # streamed handoffs' writes: (stream, layer index | trailer | None = cancel); None stops the thread
        self._outbox: queue.Queue[tuple[_RedisKVStream, int | pb.HandoffTrailer | None] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_layers, name="redis-kv-out", daemon=True)
        self._writer.start()

    def send(self, handoff: KVHandoff, sink: EventSink) -> None:
        """Store the KV and queue the job; raises NoDecodeReplicaError or redis errors (both: unavailable)."""
        if not self._replica_alive():
            raise NoDecodeReplicaError("no decode replica is alive on Redis")
        header, data = encode_handoff(handoff, self.kv_wire_format)
        self._queue_job(handoff, header, sink, data)

    def open_stream(self, handoff: KVHandoff, sink: EventSink) -> KVStream:
        """Queue the job now (decode starts reading the KV as it comes); its layers and trailer follow on
        the request's kv_layers stream, written by this sender's writer thread."""
        if not self._replica_alive():
            raise NoDecodeReplicaError("no decode replica is alive on Redis")
        encoding = wire_encoding(handoff.kv.dtype, self.kv_wire_format)
        header = header_to_proto(handoff, kv_wire_num_bytes(handoff.layout, encoding), 0, encoding, streamed=True)
        self._queue_job(handoff, header.SerializeToString(), sink)
        return _RedisKVStream(handoff, sink, self, encoding)

    def _queue_job(self, handoff: KVHandoff, header: bytes, sink: EventSink, data: bytes | None = None) -> None:
        """Open the token stream, store the KV (`data`; None when it is streamed) and queue the job."""
        rid = handoff.request_id
        deadline = handoff.deadline_s or time.time() + self.timeout_s
        follow = _Follow(DedupSink(sink), "0", deadline)
        with self._lock:
            self._follows[rid] = follow
        try:
            pipe = self.redis.pipeline(transaction=True)
            # The token stream is created here, and decode only appends to an existing one
            # (NOMKSTREAM): once this side deletes it, a late or duplicate replica cannot recreate it.
            pipe.xadd(self.keys.tokens(rid), {"open": b"1"})
            pipe.pexpire(self.keys.tokens(rid), self.kv_ttl_ms)
            if data is not None:
                pipe.set(self.keys.kv(rid), data, px=self.kv_ttl_ms)
            pipe.xadd(self.keys.jobs, {"header": header}, maxlen=MAX_JOBS, approximate=True)
            pipe.xadd(self.keys.wake(self.sender_id), {"r": rid}, maxlen=10, approximate=True)
            follow.job_id = pipe.execute()[-2].decode()
        except redis.RedisError:
            with self._lock:
                self._follows.pop(rid, None)
            raise

    def _write_layers(self) -> None:
        """The writer thread: streamed handoffs' layers, trailers and cancellations, in the order given."""
        while True:
            item = self._outbox.get()
            if item is None:
                return
            stream, what = item
            try:
                stream.write(what)
            except Exception as e:  # Redis gone, or encoding failed: this request fails, the thread goes on
                stream.fail(e)

    def wire_bytes(self, handoff: KVHandoff) -> int:
        return kv_wire_num_bytes(handoff.layout, wire_encoding(handoff.kv.dtype, self.kv_wire_format))

    def abort(self, request_id: str) -> None:
        with self._lock:
            follow = self._follows.pop(request_id, None)
        if follow is not None:
            self._retire(request_id, follow.job_id)

    def is_ready(self) -> tuple[bool, str]:
        try:
            self.redis.ping()
            if not self._replica_alive(fresh=True):  # a probe must not pass on a stale answer
                return False, "no decode replica is alive on Redis"
        except redis.RedisError as e:
            return False, f"redis unreachable: {e}"
        return True, "ok"

    def close(self) -> None:
        self._outbox.put(None)
        self._writer.join(timeout=10)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout=BLOCK_MS / 1000 + 6)
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(self.keys.wake(self.sender_id))
        self.redis.close()

    def _replica_alive(self, fresh: bool = False) -> bool:
        """Whether some decode replica's alive key exists (one lookup per LIVENESS_TTL_S unless `fresh`;
        raises redis errors)."""
        now = time.monotonic()
        if fresh or now - self._alive_checked_s >= LIVENESS_TTL_S:
            self._is_alive = int(self._count_alive(keys=[self.keys.replicas], args=[self.keys.alive("")])) > 0
            self._alive_checked_s = now
        if self._is_alive:
            self._alive_seen_s = now
        return self._is_alive

    def _retire(self, request_id: str, job_id: str) -> None:
        """Stop decode on a request we no longer follow and make sure no replica picks its job up later."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.publish(self.keys.aborts, request_id)
            pipe.delete(self.keys.tokens(request_id), self.keys.kv(request_id), self.keys.kv_layers(request_id))
            if job_id:
                pipe.xack(self.keys.jobs, GROUP, job_id)
                pipe.xdel(self.keys.jobs, job_id)
            pipe.execute()
        except redis.RedisError as e:
            log.warning("abort of %s not published: %s", request_id, e)
            with self._lock:
                if len(self._orphans) < MAX_ORPHANS:
                    self._orphans[request_id] = job_id

    # --- the reader thread ------------------------------------------------------------------
    def _read_loop(self) -> None:
        wake_key = self.keys.wake(self.sender_id)
        wake_id = "$"
        while True:
            with self._lock:
                if self._stopping:
                    return
                streams: dict[str | bytes | memoryview, str | bytes | memoryview | int] = {
                    self.keys.tokens(r): f.last_id for r, f in self._follows.items()}
            streams[wake_key] = wake_id
            try:
                replies = cast(StreamReply | None, self.redis.xread(streams, block=BLOCK_MS, count=64))
                self._retire_orphans()
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
            self._check_follows()

    def _deliver(self, request_id: str, entries: list[StreamEntry]) -> None:
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

    def _give_up(self, request_ids: list[str], kind: ErrorKind, message: str) -> None:
        """End these requests with an error event and retire their jobs."""
        for rid in request_ids:
            with self._lock:
                follow = self._follows.pop(rid, None)
            if follow is not None:
                follow.sink(TokenEvent.failure(rid, kind, message))
                self._retire(rid, follow.job_id)

    def _expire(self) -> None:
        now = time.time()
        with self._lock:
            late = [r for r, f in self._follows.items() if now > f.deadline_s + 5.0]
        self._give_up(late, ErrorKind.TIMEOUT, "no answer from decode in time")

    def _check_follows(self) -> None:
        """Fail the requests decode has shown no life for in replica_lost_s, and those whose token stream
        is gone (checked once per CHECK_S, a few commands for all requests together)."""
        now = time.monotonic()
        if now < self._next_check_s:
            return
        self._next_check_s = now + CHECK_S
        with self._lock:
            jobs = [(rid, f.job_id) for rid, f in self._follows.items() if f.job_id]  # queued ones
        if not jobs:
            return
        try:
            if not self._replica_alive() and now - self._alive_seen_s > self.replica_lost_s:
                lost = [rid for rid, _ in jobs]  # nobody to take the jobs: not yet read ones included
            else:
                stale = set(self._stale_job_ids())
                lost = [rid for rid, job_id in jobs if job_id in stale]
            gone = [rid for rid in self._missing_streams([rid for rid, _ in jobs]) if rid not in lost]
        except redis.RedisError as e:
            log.warning("check of requests in flight failed: %s", e)
            return
        if lost or gone:
            log.warning("%d request(s) lost their decode replica, %d their token stream", len(lost), len(gone))
        self._give_up(lost, ErrorKind.UNAVAILABLE,
                      f"decode replica lost and none took over within {self.replica_lost_s:g} s")
        self._give_up(gone, ErrorKind.UNAVAILABLE, "token stream lost (Redis restarted or evicted it)")

    def _missing_streams(self, request_ids: list[str]) -> list[str]:
        """The requests whose token stream does not exist (one EXISTS for all; per key only on a miss)."""
        keys = [self.keys.tokens(rid) for rid in request_ids]
        if self.redis.exists(*keys) == len(keys):
            return []
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        return [rid for rid, n in zip(request_ids, pipe.execute(), strict=True) if not n]

    def _stale_job_ids(self) -> list[str]:
        """Jobs claimed by a replica that has not heartbeated them for replica_lost_s (replicas re-claim
        their jobs every second and take over those idle past claim_idle_s, so these are orphaned)."""
        try:
            pending = self.redis.xpending_range(self.keys.jobs, GROUP, "-", "+", MAX_STALE_JOBS,
                                                idle=int(self.replica_lost_s * 1000))
        except redis.ResponseError as e:  # no group yet: nothing is pending
            if "NOGROUP" in str(e):
                return []
            raise
        return [cast(bytes, p["message_id"]).decode() for p in cast(list[dict[str, object]], pending)]

    def _retire_orphans(self) -> None:
        """Retire the jobs of requests failed while Redis was unreachable (it answers again)."""
        with self._lock:
            orphans, self._orphans = self._orphans, {}
        for rid, job_id in orphans.items():
            self._retire(rid, job_id)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            follows, self._follows = self._follows, {}
            for rid, follow in list(follows.items())[:MAX_ORPHANS - len(self._orphans)]:
                self._orphans[rid] = follow.job_id
        for rid, follow in follows.items():
            follow.sink(TokenEvent.failure(rid, ErrorKind.UNAVAILABLE, message))


class _RedisKVStream(KVStream):
    """A version-4 handoff on Redis: the job is queued when the stream opens; each layer's bytes, then the
    trailer, are appended to the request's kv_layers stream by the sender's writer thread (encoding and
    checksumming happen there too, off the engine's thread)."""

    def __init__(self, handoff: KVHandoff, sink: EventSink, sender: RedisSender, encoding: str) -> None:
        super().__init__(handoff, sink)
        self.sender = sender
        self.encoding = encoding
        self.crc = 0
        self.is_over = False  # cancelled or failed: later writes are dropped

    def layer_ready(self, layer: int) -> None:
        self.sender._outbox.put((self, layer))

    def finish(self, first_token_id: int) -> None:
        self.handoff.first_token_id = first_token_id
        self.sender._outbox.put((self, pb.HandoffTrailer(first_token_id=first_token_id)))

    def cancel(self, reason: str) -> None:
        self.sender._outbox.put((self, None))

    def write(self, what: int | pb.HandoffTrailer | None) -> None:
        """One write of the writer thread (raises redis errors)."""
        if self.is_over:
            return
        rid, keys = self.handoff.request_id, self.sender.keys
        if what is None:  # cancelled: decode drops the job; prefill retries the request
            self.is_over = True
            with self.sender._lock:
                follow = self.sender._follows.pop(rid, None)
            self.sender._retire(rid, follow.job_id if follow else "")
            return
        if not self.is_followed():  # refused at the header, aborted or timed out: nobody reads the layers
            self.stop_writing()
            return
        entry: dict[FieldT, EncodableT]
        if isinstance(what, pb.HandoffTrailer):
            what.checksum = self.crc
            entry = {"trailer": what.SerializeToString()}
        else:
            data = encode_layer(self.handoff.kv[what], self.encoding)
            self.crc = kv_checksum(data, self.crc)
            entry = {"kv": data}
        pipe = self.sender.redis.pipeline(transaction=False)
        pipe.xadd(keys.kv_layers(rid), entry)
        pipe.pexpire(keys.kv_layers(rid), self.sender.kv_ttl_ms)
        pipe.execute()
        if not self.is_followed():  # retired while this entry was on its way: it must not outlive the request
            self.stop_writing()

    def is_followed(self) -> bool:
        with self.sender._lock:
            return self.handoff.request_id in self.sender._follows

    def stop_writing(self) -> None:
        """Drop this stream's later writes and the layers already written (raises redis errors)."""
        self.is_over = True
        self.sender.redis.delete(self.sender.keys.kv_layers(self.handoff.request_id))

    def fail(self, e: Exception) -> None:
        """A write failed: the request ends with an error (once) and its job is retired."""
        if self.is_over:
            return
        self.is_over = True
        log.warning("streaming the KV of %s failed: %s", self.handoff.request_id, e)
        kind = ErrorKind.UNAVAILABLE if isinstance(e, redis.RedisError) else ErrorKind.INTERNAL
        self.sender._give_up([self.handoff.request_id], kind, f"sending the KV over Redis failed: {e}")
