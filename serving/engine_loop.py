"""The lifecycle the prefill and decode engines share: one supervised daemon thread running
schedule -> execute -> update, a condition that wakes it when work arrives, and a stop flag read under
that condition. Each engine supplies the steps; the loop, the failure handling and the supervision
are here, once.

Scheduling runs under the engine's lock (submissions and aborts from other threads touch the
scheduler's queues); executing, and every tensor copy, runs outside it (only the loop thread touches
the model and the KV). A step that raises fails the requests it held, never the engine.

Supervision: an exception that escapes the loop (a bug: every per-request failure is caught inside
the loop and fails that request alone) is logged, every request the engine holds gets an explicit
error event, new submissions are refused with EngineUnavailableError, and `liveness()` reports it,
so /healthz fails and the orchestrator restarts the process. A loop that makes no progress for
`stall_timeout_s` while work waits (a hung step) is reported by `liveness()` the same way, without
taking the engine's lock (which a hung loop may hold).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Generic, TypeVar

from kv_transfer.outcome import EngineUnavailableError

log = logging.getLogger(__name__)
DEFAULT_STALL_TIMEOUT_S = 60.0
Plan = TypeVar("Plan")  # what one schedule() hands to the step: a prefill batch, decode's schedule
Batch = TypeVar("Batch")  # what one forward pass runs over: the prefill batch, decode's running rows
Result = TypeVar("Result")  # what executing a batch produces: logits and KV, sampled tokens


class EngineLoop(Generic[Plan, Batch, Result]):
    thread_name = "engine"

    def __init__(self, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> None:
        if stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {stall_timeout_s}")
        self.stall_timeout_s = stall_timeout_s
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failure: str | None = None  # why the loop died, once it has
        self._progress_s = time.monotonic()  # last time the loop went round (idle waits included)

    def start(self) -> None:
        self._progress_s = time.monotonic()
        self._thread = threading.Thread(target=self._supervised, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    def liveness(self) -> str | None:
        """None while the loop runs and makes progress; otherwise why not. Never takes the lock."""
        if self.failure is not None:
            return self.failure
        if self._thread is None or self._stopping:
            return None  # not started yet, or shutting down on purpose
        if not self._thread.is_alive():
            return f"{self.thread_name} thread is not running"
        stalled_s = time.monotonic() - self._progress_s
        if stalled_s > self.stall_timeout_s and self.has_work():
            return f"{self.thread_name} made no progress for {stalled_s:.0f} s with work waiting"
        return None

    def check_accepting(self) -> None:
        """Raise EngineUnavailableError when the loop is dead (called on submission, under no lock)."""
        if self.failure is not None:
            raise EngineUnavailableError(self.failure)
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            raise EngineUnavailableError(f"{self.thread_name} thread is not running")

    def note_progress(self) -> None:
        """Called by the loop each time round (after a step, and before waiting for work)."""
        self._progress_s = time.monotonic()

    def _supervised(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug in the loop: fail loudly, hold no client waiting
            log.critical("%s stopped by an unexpected error; failing its requests", self.thread_name, exc_info=True)
            self.failure = f"{self.thread_name} stopped: {e!r}"
            try:
                with self._lock:
                    self._fail_all(self.failure)
            except Exception:
                log.exception("failing the requests of a stopped %s", self.thread_name)

    def _loop(self) -> None:
        """schedule -> step until stopped; on stop, every request still held gets an error event."""
        while True:
            with self._lock:
                self.note_progress()
                while not self.has_work() and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    self._fail_all(f"{self.thread_name} shutting down")
                    return
                plan = self._schedule()
            self._step(plan)

    def _run(self, batch: Batch) -> None:
        """execute -> update; if executing raises, only the batch's requests are failed."""
        try:
            result = self._execute(batch)
        except Exception as e:
            log.exception("%s step failed", self.thread_name)
            self._step_failed(batch, e)
            return
        self._update(batch, result)

    # --- each engine's own steps ---------------------------------------------------------------
    def has_work(self) -> bool:
        """Whether requests wait or run (also read without the lock: a hint for the stall check)."""
        raise NotImplementedError

    def _schedule(self) -> Plan:
        """Plan the next step from the scheduler (lock held)."""
        raise NotImplementedError

    def _step(self, plan: Plan) -> None:
        """Carry a plan out (lock not held): prepare its batch, then `self._run(batch)`."""
        raise NotImplementedError

    def _execute(self, batch: Batch) -> Result:
        """The model's work for one step (lock not held)."""
        raise NotImplementedError

    def _update(self, batch: Batch, result: Result) -> None:
        """Deliver a step's results to its requests."""
        raise NotImplementedError

    def _step_failed(self, batch: Batch, error: Exception) -> None:
        """Executing `batch` raised `error`: fail (or retry) its requests."""
        raise NotImplementedError

    def _fail_all(self, message: str) -> None:
        """Send an error event to every request the engine holds and forget them (lock held)."""
        raise NotImplementedError
