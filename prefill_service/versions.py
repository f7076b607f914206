"""Which adapter version serves a request, and loading it: the task's traffic split (sticky per routing
key), an explicit pin when the operator allows it, and versions this node cannot load skipped.

A version of a split that fails to load is reported (log, `prad:version_load_failures_total`,
GET /admin/adapters/{task}) and its traffic goes to the split's other versions, then to the active
version; requests fail only when no version of the task can be served.
"""

from __future__ import annotations

import logging
import random
import threading

from adapters_store.base import Routing, UnknownTaskError, UnknownVersionError
from adapters_store.routing import choose_version
from kv_transfer.outcome import ErrorKind
from prad.adapters import Adapter, AdapterError
from prefill_service.adapter_cache import AdapterCache
from serving.metrics import Metrics

log = logging.getLogger(__name__)


class VersionError(Exception):
    """A request's version cannot be chosen or served; `kind` says how the front door answers."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class VersionRouter:
    def __init__(self, adapters: AdapterCache, metrics: Metrics, allow_pinning: bool = False,
                 rng: random.Random | None = None) -> None:
        self.adapters = adapters
        self.metrics = metrics
        self.allow_pinning = allow_pinning
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()  # random.Random is not safe to share between threads
        self._reported: set[tuple[str, str]] = set()  # (task, version) already reported unloadable

    def select(self, task: str, routing_key: str | None = None, pinned: str | None = None,
               may_pin: bool = False) -> Adapter:
        """The adapter version this request of `task` runs with; raises UnknownTaskError for an
        unknown task and VersionError when no version can be served."""
        if pinned is not None:
            return self._pinned(task, pinned, may_pin)
        routing = self.adapters.routing(task)
        skipped: dict[str, str] = {}
        while (version := self._pick(routing, routing_key, skipped)) is not None:
            try:
                return self.adapters.get(task, version)
            except (AdapterError, OSError, UnknownVersionError) as e:  # unknown: deleted since routing was read
                if not routing.split:
                    raise VersionError(ErrorKind.UNAVAILABLE, f"task {task!r} cannot be served: {e}") from e
                skipped[version] = str(e)
                self._report(task, version, e)
        raise VersionError(ErrorKind.UNAVAILABLE, f"task {task!r}: no version of its traffic split can be served "
                                                  f"here: {skipped}")

    def _pick(self, routing: Routing, key: str | None, skipped: dict[str, str]) -> str | None:
        """The split's choice among versions not skipped yet, else the active version (once)."""
        if routing.split:
            with self._rng_lock:
                chosen = choose_version(routing.split, key, self._rng, exclude=skipped)
            if chosen is not None:
                return chosen
        return routing.active if routing.active not in skipped else None

    def _pinned(self, task: str, version: str, may_pin: bool) -> Adapter:
        if not (self.allow_pinning or may_pin):
            raise VersionError(ErrorKind.FORBIDDEN, "pinning an adapter version is not allowed on this server "
                                                    "(--allow-version-pinning, or the admin token in "
                                                    "X-PrAd-Admin-Token)")
        try:
            return self.adapters.get(task, version)
        except UnknownVersionError as e:
            raise VersionError(ErrorKind.UNKNOWN_VERSION, str(e)) from None
        except (AdapterError, OSError) as e:
            raise VersionError(ErrorKind.UNAVAILABLE, f"task {task!r} version {version!r} cannot be served: "
                                                      f"{e}") from e

    def _report(self, task: str, version: str, error: Exception) -> None:
        """Once per version: it stays skipped (a version's bytes never change), not re-reported per request."""
        with self._rng_lock:
            if (task, version) in self._reported:
                return
            self._reported.add((task, version))
        log.error("task %s: version %s of the traffic split cannot be loaded here; its share goes to the "
                  "other versions: %s", task, version, error)
        label = self.metrics.task(task)
        self.metrics.version_load_failures.labels(label, self.metrics.version(label, version)).inc()


__all__ = ["UnknownTaskError", "VersionError", "VersionRouter"]
