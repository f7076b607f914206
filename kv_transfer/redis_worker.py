"""Redis receiver on the decode side: one consumer of the decode group per replica.

Jobs are read with XREADGROUP only while this replica has room in its queue. A replica heartbeats
its jobs in flight (XCLAIM resets their idle time) and its liveness key; jobs idle past
`claim_idle_s` belong to a dead replica and are taken over with XAUTOCLAIM, then replayed from the
KV still in Redis (at-least-once; the prefill side drops repeated tokens). A job's KV, its stream
entry and its pending entry are removed when it finishes; TTLs are the backstop.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

import redis

from kv_transfer.base import DecodeBackend, TokenEvent
from kv_transfer.handoff import HandoffError
from kv_transfer.redis_keys import GROUP, RedisKeys
from kv_transfer.redis_sender import connect
from kv_transfer.wire import event_to_proto, handoff_from_proto, parse_header
from prad.errors import QueueFullError

log = logging.getLogger(__name__)
BLOCK_MS = 500
HEARTBEAT_S = 1.0


class RedisDecodeWorker:
    def __init__(self, backend: DecodeBackend, url: str, prefix: str, replica: str, claim_idle_s: float = 5.0) -> None:
        self.backend = backend
        self.keys = RedisKeys(prefix)
        self.replica = replica
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.redis = connect(url)
        self._in_flight: dict[str, bytes] = {}  # request id -> job entry id
        self._aborted: set[str] = set()  # aborted by their client: nobody reads their events
        self._lock = threading.Lock()
        self._outbox: queue.Queue[tuple[str, TokenEvent] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._draining = threading.Event()  # no new jobs; in-flight ones finish and stay claimed
        self._last_error = ""
        self._threads = [threading.Thread(target=self._jobs_loop, name="redis-jobs", daemon=True),
                         threading.Thread(target=self._publish_loop, name="redis-events", daemon=True),
                         threading.Thread(target=self._aborts_loop, name="redis-aborts", daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop_intake(self) -> None:
        """Drain: take no new jobs (nor other replicas' abandoned ones); in-flight jobs keep publishing."""
        self._draining.set()

    def stop(self) -> None:
        self._stopping.set()
        self._outbox.put(None)
        for t in self._threads:
            t.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(self.keys.alive(self.replica))

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
        """Jobs to take now: only as many as the decode queue can hold."""
        stats = self.backend.stats()
        return max(0, min(16, stats["max_waiting"] - stats["num_waiting"]))

    def _read_jobs(self) -> None:
        room = self._room()
        if room == 0:
            time.sleep(0.05)
            return
        replies = self.redis.xreadgroup(GROUP, self.replica, {self.keys.jobs: ">"}, count=room, block=BLOCK_MS)
        for _, entries in replies or []:
            for entry_id, fields in entries:
                self._start_job(entry_id, fields)

    def _heartbeat(self) -> None:
        self.redis.set(self.keys.alive(self.replica), "1", ex=max(3, int(3 * HEARTBEAT_S)))
        with self._lock:
            mine = list(self._in_flight.values())
        if mine:  # keep our jobs from looking abandoned
            self.redis.xclaim(self.keys.jobs, GROUP, self.replica, 0, mine, justid=True)
        if self._draining.is_set():
            return
        reply = self.redis.xautoclaim(self.keys.jobs, GROUP, self.replica, self.claim_idle_ms, "0-0", count=16)
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
        data = self.redis.get(self.keys.kv(rid))
        if data is None:
            self._refuse(rid, "KV for this request expired or was already consumed", 502)
            return
        try:
            self.backend.submit(handoff_from_proto(header, data), lambda ev: self._outbox.put((rid, ev)))
        except HandoffError as e:
            self._refuse(rid, f"decode refused the KV handoff: {e}", 502)
        except QueueFullError as e:
            self._refuse(rid, f"server busy: {e}; retry later", 429)
        except ValueError as e:
            self._refuse(rid, str(e), 400)

    def _refuse(self, rid: str, message: str, status: int) -> None:
        self._outbox.put((rid, TokenEvent(rid, [], "", finish_reason="error", error=message, error_status=status)))

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
            except redis.RedisError as e:  # the prefill side fails these requests on its own
                log.warning("could not publish %d events: %s", len(batch), e)

    def _publish(self, batch: list[tuple[str, TokenEvent]]) -> None:
        # One MULTI/EXEC: a request's final event and the removal of its job and KV happen together,
        # so a replica dying in between can never leave a finished job to be replayed.
        pipe = self.redis.pipeline(transaction=True)
        for rid, event in batch:
            if event.is_final:
                with self._lock:
                    entry_id = self._in_flight.pop(rid, None)
                if entry_id is not None:
                    self._queue_cleanup(pipe, entry_id, rid)
            if rid in self._aborted:  # nobody reads these events any more
                if event.is_final:
                    self._aborted.discard(rid)
                continue
            key = self.keys.tokens(rid)
            # NOMKSTREAM: a stream the prefill side already closed stays closed.
            pipe.xadd(key, {"event": event_to_proto(event, event.first_token_index).SerializeToString()},
                      nomkstream=True)
        pipe.execute()

    def _queue_cleanup(self, pipe: redis.client.Pipeline, entry_id: bytes, rid: str | None) -> None:
        pipe.xack(self.keys.jobs, GROUP, entry_id)
        pipe.xdel(self.keys.jobs, entry_id)
        if rid is not None:
            pipe.delete(self.keys.kv(rid))

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
                        with self._lock:
                            if rid in self._in_flight:
                                self._aborted.add(rid)
                        self.backend.abort(rid)
            except redis.RedisError:
                time.sleep(0.5)
