"""A daemon thread that turns Redis pub/sub messages and periodic polls into store notifications.

Pub/sub is fast but lossy: a message published while this node is disconnected is gone. So the
thread also polls every `poll_interval_s`, and polls once right after every (re)subscription, which
catches whatever was missed during the gap. It never dies on a Redis error: it logs, backs off
(0.1 s doubling to 2 s) and reconnects.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import redis
from redis.client import PubSub

from adapters_store.base import StoreError

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 2.0
MAX_BACKOFF_S = 2.0
WAIT_STEP_S = 0.25  # longest blocking read, so stop() is quick


class ChangeListener:
    def __init__(self, client: redis.Redis, channel: str, on_message: Callable[[str], None],
                 poll: Callable[[], object], poll_interval_s: float) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self.client = client
        self.channel = channel
        self.on_message = on_message  # called with each message's data (a str)
        self.poll = poll  # full comparison of active pointers; raises on Redis errors
        self.poll_interval_s = poll_interval_s
        self._pubsub: PubSub | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def is_connected(self) -> bool:
        return self._pubsub is not None

    def start(self) -> None:
        """Subscribe now if Redis answers (so no change after this call is missed), then run the thread."""
        if self.is_running:
            return
        self._stop.clear()
        try:
            self._pubsub = self._connect()
        except (redis.RedisError, StoreError) as e:
            log.warning("adapter store listener: cannot subscribe to %r yet (%s); will retry", self.channel, e)
        self._thread = threading.Thread(target=self._run, name="adapter-store-listener", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        backoff_s = 0.1
        while not self._stop.is_set():
            try:
                if self._pubsub is None:
                    self._pubsub = self._connect()
                    log.info("adapter store listener: subscribed to %r", self.channel)
                backoff_s = 0.1
                self._pump(self._pubsub)
            except (redis.RedisError, StoreError) as e:
                log.warning("adapter store listener: %s; reconnecting in %.1f s", e, backoff_s)
                self._close_pubsub()
                self._stop.wait(backoff_s)
                backoff_s = min(2 * backoff_s, MAX_BACKOFF_S)
        self._close_pubsub()

    def _connect(self) -> PubSub:
        """Subscribe, wait for Redis to confirm it, then poll once (baseline, or catch up on a gap)."""
        pubsub = self.client.pubsub()
        try:
            pubsub.subscribe(self.channel)
            deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
            while (message := pubsub.get_message(timeout=WAIT_STEP_S)) is None or message["type"] != "subscribe":
                if time.monotonic() > deadline:
                    raise redis.TimeoutError(f"no confirmation of SUBSCRIBE {self.channel!r}")
            self.poll()
        except BaseException:
            pubsub.close()
            raise
        return pubsub

    def _pump(self, pubsub: PubSub) -> None:
        next_poll_s = time.monotonic() + self.poll_interval_s
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=min(WAIT_STEP_S, self.poll_interval_s))
            if message is not None and message["type"] == "message":
                self.on_message(message["data"])
            if time.monotonic() >= next_poll_s:
                self.poll()
                next_poll_s = time.monotonic() + self.poll_interval_s

    def _close_pubsub(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                self._pubsub.close()
            self._pubsub = None
