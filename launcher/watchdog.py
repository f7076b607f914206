"""Exit the process when it stays unhealthy, for supervisors that restart on exit but not on a failed
health check (Docker's restart policies, systemd). Kubernetes needs none of this: its liveness probe
on /healthz restarts the pod."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
EXIT_CODE = 70  # EX_SOFTWARE: an internal error, so restart


class Watchdog:
    def __init__(self, liveness: Callable[[], dict[str, str]], grace_s: float, poll_s: float = 1.0,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.liveness = liveness
        self.grace_s = grace_s
        self.poll_s = poll_s
        self._exit = exit
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=self.poll_s + 1)

    def _run(self) -> None:
        failing_since: float | None = None
        while not self._stopping.wait(self.poll_s):
            problems = self.liveness()
            if not problems:
                failing_since = None
                continue
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since >= self.grace_s:
                log.critical("unhealthy for %.0f s (%s); exiting so the supervisor restarts this process",
                             self.grace_s, problems)
                self._exit(EXIT_CODE)
                return
