"""The lifecycle the prefill and decode engines share: one daemon thread running the engine's loop,
a condition that wakes it when work arrives, and a stop flag read under that condition."""

from __future__ import annotations

import threading


class EngineLoop:
    thread_name = "engine"

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        """schedule -> execute -> update until stopped (each engine's own)."""
        raise NotImplementedError
