"""Redis receiver on the decode side: one consumer of the decode group per replica.

Jobs are read with XREADGROUP only while this replica has room in its queue. A replica heartbeats
its jobs in flight (XCLAIM resets their idle time) and its liveness key; jobs idle past
`claim_idle_s` belong to a dead replica and are taken over with XAUTOCLAIM, then replayed from the
KV still in Redis (at-least-once; the prefill side drops repeated tokens). A job's KV, its stream
entry and its pending entry are removed when it finishes; TTLs are the backstop.

Work nobody reads is dropped: a request whose token stream is gone (its prefill side gave up, or Redis
restarted empty) is aborted when a publish to it finds no stream, and by a check of every request in
flight once per heartbeat. A request whose events could not be published is given back: aborted
here and left pending, so a replica replays it from its KV if the prefill side still follows it.
A header is checked against decode's limits, and the KV blob's size (STRLEN) against the header,
before the blob is fetched.

A streamed job (format version 4) is queued when its prefill pass starts; its KV arrives layer by layer
on the request's kv_layers stream, ending with a trailer. One assembler thread reads every such stream
at once, checks each entry against the announced size as it comes, and admits the request when the
trailer's checksum matches; a stream that stops (its prefill died) is refused after STREAM_STALL_S,
and one whose request was aborted is dropped. Taking over a streamed job replays its stream from the
start, like a whole one's blob.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import cast

import redis

from kv_transfer.base import DecodeBackend, TokenEvent
from kv_transfer.handoff import HandoffError
from kv_transfer.outcome import EngineUnavailableError, QueueFullError
from kv_transfer.protos import kv_handoff_pb2 as pb
from kv_transfer.redis_keys import GROUP, RedisKeys, StreamEntry, StreamReply
from kv_transfer.redis_sender import connect
from kv_transfer.wire import (
    STREAMED_FORMAT_VERSION,
    KVLimits,
    KVReceived,
    check_header,
    event_to_proto,
    handoff_from_proto,
    parse_header,
    parse_trailer,
)

log = logging.getLogger(__name__)
BLOCK_MS = 500
ASSEMBLE_BLOCK_MS = 50  # longest wait before a newly streamed job's stream is read too
STREAM_STALL_S = 60.0  # a streamed job whose KV stops coming this long is refused (its prefill is gone)
HEARTBEAT_S = 1.0
ALIVE_TTL_S = max(3, int(3 * HEARTBEAT_S))  # a replica's alive key outlives a few missed beats
MAX_TAKEOVER = 64  # abandoned jobs taken over per heartbeat


@dataclass
class _Assembly:
    """A streamed job whose KV is arriving, and where its reading stands."""

    received: KVReceived  # its header and the KV bytes so far
    entry_id: bytes  # its entry on the jobs stream
    progress_s: float  # time.monotonic() of the last entry read
    last_id: str = "0"  # last kv_layers entry read


class RedisDecodeWorker:
    def __init__(self, backend: DecodeBackend, url: str, prefix: str, replica: str, claim_idle_s: float = 5.0,
                 limits: KVLimits | None = None) -> None:
        self.backend = backend
        self.keys = RedisKeys(prefix)
        self.replica = replica
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.limits = limits  # decode's layout and max length; None: only the header's own consistency
        self.redis = connect(url)
        self._in_flight: dict[str, bytes] = {}  # request id -> job entry id
        self._aborted: set[str] = set()  # nobody reads their events (client aborted, stream gone, given back)
        self._lock = threading.Lock()
        self._outbox: queue.Queue[tuple[str, TokenEvent] | None] = queue.Queue()
        self._assembling: dict[str, _Assembly] = {}  # streamed jobs whose KV is still arriving
        self._assembled = threading.Condition(self._lock)  # notified when a streamed job arrives
        self._stopping = threading.Event()
        self._draining = threading.Event()  # no new jobs; in-flight ones finish and stay claimed
        self._last_error = ""
        self._threads = [threading.Thread(target=self._jobs_loop, name="redis-jobs", daemon=True),
                         threading.Thread(target=self._publish_loop, name="redis-events", daemon=True),
                         threading.Thread(target=self._aborts_loop, name="redis-aborts", daemon=True),
                         threading.Thread(target=self._assemble_loop, name="redis-kv-in", daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop_intake(self) -> None:
        """Drain: take no new jobs (nor other replicas' abandoned ones); in-flight jobs keep publishing."""
        self._draining.set()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._assembled.notify_all()
        self._outbox.put(None)
        for t in self._threads:
            t.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(self.keys.alive(self.replica))
            self.redis.srem(self.keys.replicas, self.replica)

    def readiness(self) -> dict[str, str]:
        try:
            self.redis.ping()
        except redis.RedisError as e:
            return {"redis": f"redis unreachable: {e}"}
        return {}

    # --- jobs ---------------------------------------------------------------------------------
    def _jobs_loop(self) -> None:
        next_beat = 0.0
        while not self._stopping.is_set():
            try:
                if time.monotonic() >= next_beat:
                    self._heartbeat()
                    next_beat = time.monotonic() + HEARTBEAT_S
                if self._draining.is_set():
                    time.sleep(0.1)
                    continue
                self._read_jobs()
                self._last_error = ""
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):
                    self._ensure_group()
                else:
                    self._note_error(e)
            except redis.RedisError as e:
                self._note_error(e)
            except Exception as e:  # never let the job loop die: log and go on
                log.exception("redis job loop error")
                self._note_error(e)

    def _note_error(self, e: Exception) -> None:
        if str(e) != self._last_error:
            log.warning("redis: %s (retrying)", e)
            self._last_error = str(e)
        time.sleep(0.5)

    def _ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys.jobs, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _room(self) -> int:
        """Jobs to take now: only as many as the decode queue can hold (none while the engine is unwell)."""
        if self.backend.liveness() is not None:
            return 0
        stats = self.backend.stats()
        with self._lock:
            num_assembling = len(self._assembling)  # each is a handoff about to be submitted
        return max(0, min(16, stats["max_waiting"] - stats["num_waiting"] - num_assembling))

    def _read_jobs(self) -> None:
        room = self._room()
        if room == 0:
            time.sleep(0.05)
            return
        replies = cast(StreamReply | None, self.redis.xreadgroup(GROUP, self.replica, {self.keys.jobs: ">"},
                                                                 count=room, block=BLOCK_MS))
        for _, entries in replies or []:
            for entry_id, fields in entries:
                self._start_job(entry_id, fields)

    def _heartbeat(self) -> None:
        if self.backend.liveness() is not None:
            # A dead or stalled engine: stop looking alive, so senders refuse at once and another
            # replica takes over what this one holds.
            return
        pipe = self.redis.pipeline(transaction=True)  # atomic, see redis_sender's liveness count
        pipe.set(self.keys.alive(self.replica), "1", ex=ALIVE_TTL_S)
        pipe.sadd(self.keys.replicas, self.replica)
        pipe.execute()
        self._drop_unread()
        with self._lock:
            mine: list[bytes | str | int | memoryview] = list(self._in_flight.values())
        if mine:  # keep our jobs from looking abandoned (XCLAIM resets their idle time)
            self.redis.xclaim(self.keys.jobs, GROUP, self.replica, 0, mine, justid=True)
        if self._draining.is_set():
            return
        reply = self.redis.xautoclaim(self.keys.jobs, GROUP, self.replica, self.claim_idle_ms, "0-0",
                                      count=MAX_TAKEOVER)
        claimed = reply[1]  # Redis 6.2 answers [next, entries]; 7.x adds the deleted ids
        for entry_id, fields in claimed:
            if fields:  # deleted entries come back empty
                log.info("taking over job %s from a replica that stopped", entry_id)
                self._start_job(entry_id, fields)

    def _start_job(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            header = parse_header(fields[b"header"])
        except (HandoffError, KeyError) as e:
            log.error("dropping malformed job %s: %s", entry_id, e)
            self._finish_job(entry_id, None)
            return
        rid = header.request_id
        with self._lock:
            if rid in self._in_flight:
                return
            self._in_flight[rid] = entry_id
        try:
            check_header(header, self.limits)  # before the KV blob is fetched
        except HandoffError as e:
            self._refuse(rid, e)
            return
        if header.format_version == STREAMED_FORMAT_VERSION:  # its KV is still coming: the assembler waits
            with self._lock:
                self._assembling[rid] = _Assembly(KVReceived(header), entry_id, time.monotonic())
                self._assembled.notify()
            return
        data = self._fetch_kv(rid, entry_id, header.num_kv_bytes)
        if data is None:
            return
        self._admit(header, data)

    def _admit(self, header: pb.HandoffHeader, data: bytes | bytearray, crc: int | None = None) -> None:
        """Submit a complete handoff to the backend; its refusal becomes the request's final event."""
        rid = header.request_id
        try:
            self.backend.submit(handoff_from_proto(header, data, crc), lambda ev: self._outbox.put((rid, ev)))
        except (ValueError, QueueFullError, EngineUnavailableError) as e:  # HandoffError is a ValueError
            self._refuse(rid, e)
        else:
            with self._lock:
                is_unread = rid in self._aborted
            if is_unread:  # aborted while it was being admitted
                self.backend.abort(rid)

    # --- streamed handoffs (format version 4) -------------------------------------------------------
    def _assemble_loop(self) -> None:
        """Reads the KV of every streamed job at once (one XREAD over their kv_layers streams) and admits
        each when its trailer arrives; a job whose stream stalls, or nobody reads any more, is dropped."""
        while not self._stopping.is_set():
            with self._lock:
                while not self._assembling and not self._stopping.is_set():
                    self._assembled.wait(timeout=1.0)
                streams: dict[str | bytes | memoryview, str | bytes | memoryview | int] = {
                    self.keys.kv_layers(rid): a.last_id for rid, a in self._assembling.items()}
            if not streams:
                continue
            try:
                replies = cast(StreamReply | None, self.redis.xread(streams, block=ASSEMBLE_BLOCK_MS, count=64))
            except redis.RedisError as e:
                self._note_error(e)
                continue
            for key, entries in replies or []:
                key = key.decode() if isinstance(key, bytes) else key
                self._take_layers(key.removeprefix(self.keys.kv_layers("")), entries)
            self._drop_stalled()

    def _take_layers(self, rid: str, entries: list[StreamEntry]) -> None:
        with self._lock:
            assembly = self._assembling.get(rid)
        if assembly is None:
            return
        try:
            for entry_id, fields in entries:
                assembly.last_id = entry_id.decode()
                assembly.progress_s = time.monotonic()
                received = assembly.received
                if b"kv" in fields:
                    received.add(fields[b"kv"])
                elif b"trailer" in fields:
                    header = received.finish(parse_trailer(fields[b"trailer"]))
                    with self._lock:
                        self._assembling.pop(rid, None)
                    self._admit(header, received.data, received.crc)
                    return
        except HandoffError as e:
            with self._lock:
                self._assembling.pop(rid, None)
            self._refuse(rid, e)

    def _drop_stalled(self) -> None:
        """Stop assembling jobs nobody reads (aborted) or whose KV stopped coming (their prefill died)."""
        now = time.monotonic()
        with self._lock:
            aborted = [(r, a) for r, a in self._assembling.items() if r in self._aborted]
            stalled = [(r, a) for r, a in self._assembling.items()
                       if r not in self._aborted and now - a.progress_s > STREAM_STALL_S]
            for rid, _ in aborted + stalled:
                del self._assembling[rid]
        for rid, assembly in aborted:
            self._finish_job(assembly.entry_id, rid)
            with self._lock:
                self._in_flight.pop(rid, None)
                self._aborted.discard(rid)
        for rid, _ in stalled:
            self._refuse(rid, HandoffError(f"the KV stream stopped for {STREAM_STALL_S:g} s before its trailer"))

    def _fetch_kv(self, rid: str, entry_id: bytes, num_kv_bytes: int) -> bytes | None:
        """The job's KV blob once its size matches the header; None when refused or nobody follows the request."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.keys.tokens(rid))
        pipe.strlen(self.keys.kv(rid))
        has_stream, num_bytes = pipe.execute()
        if not has_stream:  # the prefill side gave up on it: no work for nobody
            log.info("dropping job of %s: nobody follows it any more", rid)
            with self._lock:
                self._in_flight.pop(rid, None)
            self._finish_job(entry_id, rid)
            return None
        if num_bytes not in (0, num_kv_bytes):
            self._refuse(rid, HandoffError(f"KV blob has {num_bytes} bytes, header announced {num_kv_bytes}"))
            return None
        data = cast(bytes | None, self.redis.get(self.keys.kv(rid))) if num_bytes else None
        if data is None:
            self._refuse(rid, HandoffError("KV for this request expired or was already consumed"))
        return data

    def _drop_unread(self) -> None:
        """Abort the requests in flight whose token stream is gone (one pipelined EXISTS each)."""
        with self._lock:
            rids = [rid for rid in self._in_flight if rid not in self._aborted]
        if not rids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for rid in rids:
            pipe.exists(self.keys.tokens(rid))
        for rid, has_stream in zip(rids, pipe.execute(), strict=True):
            if not has_stream:
                self._drop(rid, "its token stream is gone")

    def _drop(self, rid: str, why: str) -> None:
        """Abort a request nobody reads; its job is removed with its final event."""
        with self._lock:
            if rid not in self._in_flight or rid in self._aborted:
                return
            self._aborted.add(rid)
        log.info("aborting %s: %s", rid, why)
        self.backend.abort(rid)

    def _give_back(self, rids: set[str]) -> None:
        """Abort requests whose events were lost, leaving their jobs pending: a replica takes them over
        after claim_idle_s and replays them, or drops them if nobody follows them any more."""
        for rid in rids:
            with self._lock:
                if self._in_flight.pop(rid, None) is None:
                    continue
                self._aborted.add(rid)
            self.backend.abort(rid)

    def _refuse(self, rid: str, e: Exception) -> None:
        self._outbox.put((rid, TokenEvent.refused(rid, e)))

    def _finish_job(self, entry_id: bytes, rid: str | None) -> None:
        pipe = self.redis.pipeline(transaction=True)
        self._queue_cleanup(pipe, entry_id, rid)
        pipe.execute()

    # --- events back ----------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            batch = [item]
            while not self._outbox.empty() and len(batch) < 256:
                nxt = self._outbox.get_nowait()
                if nxt is None:
                    self._outbox.put(None)
                    break
                batch.append(nxt)
            try:
                self._publish(batch)
            except redis.RedisError as e:
                log.warning("could not publish %d events, giving their requests back: %s", len(batch), e)
                self._give_back({rid for rid, event in batch if not event.is_final})

    def _publish(self, batch: list[tuple[str, TokenEvent]]) -> None:
        # One MULTI/EXEC: a request's final event and the removal of its job and KV happen together,
        # so a replica dying in between can never leave a finished job to be replayed.
        pipe = self.redis.pipeline(transaction=True)
        sent: list[tuple[int, str]] = []  # (index in the pipeline, request id) of the non-final events
        for rid, event in batch:
            if event.is_final:
                with self._lock:
                    entry_id = self._in_flight.pop(rid, None)
                if entry_id is not None:
                    self._queue_cleanup(pipe, entry_id, rid)
            with self._lock:
                is_unread = rid in self._aborted
                if is_unread and event.is_final:
                    self._aborted.discard(rid)
            if is_unread:  # nobody reads these events any more
                continue
            if not event.is_final:
                sent.append((len(pipe), rid))
            # NOMKSTREAM: a stream the prefill side already closed stays closed.
            pipe.xadd(self.keys.tokens(rid), {"event": event_to_proto(event, event.first_token_index)
                                              .SerializeToString()}, nomkstream=True)
        results = pipe.execute()
        for index, rid in sent:
            if results[index] is None:  # no such stream: nobody reads this request
                self._drop(rid, "its token stream is gone")

    def _queue_cleanup(self, pipe: redis.client.Pipeline, entry_id: bytes, rid: str | None) -> None:
        pipe.xack(self.keys.jobs, GROUP, entry_id)
        pipe.xdel(self.keys.jobs, entry_id)
        if rid is not None:
            pipe.delete(self.keys.kv(rid), self.keys.kv_layers(rid))

    # --- aborts ---------------------------------------------------------------------------------
    def _aborts_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.keys.aborts)
                while not self._stopping.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg and msg.get("type") == "message":
                        rid = msg["data"].decode()
                        self._drop(rid, "aborted by its client")
            except redis.RedisError:
                time.sleep(0.5)
