"""Adapters loaded for prefill: an LRU cache of validated adapters, keyed by task and stored version.

A miss reads and validates the adapter in the caller's thread (the HTTP worker of the request that
needs it), never in the engine loop, so requests of loaded tasks keep flowing. A request holds its
Adapter object from admission to handoff, so eviction or a version change never touches it. A
version that fails validation is remembered as broken (its bytes never change), so requests routed
to it fail fast instead of re-reading it.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapters_store.base import AdapterStore, Routing, UnknownTaskError
from prad.adapters import Adapter, AdapterError
from prad.adapters.config import PRAD_VARIANTS, AdapterConfig
from prad.adapters.io import content_version, parse_adapter
from prad.model import Model

MAX_BROKEN = 1024  # broken versions remembered (oldest forgotten first)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


@dataclass(frozen=True)
class AdapterInfo:
    """What a listing shows of a task's active adapter."""

    version: str  # content version of the active adapter
    variant: str | None = None
    rank: int | None = None
    error: str | None = None  # why it cannot be served, when known


class AdapterCache:
    def __init__(self, store: AdapterStore, model: Model, fingerprint: str, max_loaded: int,
                 on_event: Callable[[str, str], None] | None = None) -> None:
        """on_event(event, task) sees every hit, miss, load and eviction (for metrics)."""
        if max_loaded < 1:
            raise ValueError(f"max_loaded_adapters must be >= 1, got {max_loaded}")
        self.store = store
        self.model = model
        self.fingerprint = fingerprint
        self.max_loaded = max_loaded
        self.stats = CacheStats()
        self.on_event = on_event or (lambda event, task: None)
        self._entries: OrderedDict[tuple[str, str], Adapter] = OrderedDict()
        self._infos: dict[str, tuple[str, AdapterInfo]] = {}  # task -> (stamp, info), for describe()
        self._broken: OrderedDict[tuple[str, str], str] = OrderedDict()  # (task, version) -> why, bounded
        self._lock = threading.Lock()

    def tasks(self) -> list[str]:
        return self.store.tasks()

    def routing(self, task: str) -> Routing:
        """The task's active version and traffic split; UnknownTaskError if it has no active version."""
        routing = self.store.routing(task)
        if routing is None:
            raise UnknownTaskError(task)
        return routing

    def broken_versions(self, task: str) -> dict[str, str]:
        """{version: why} for the task's versions that failed to load here."""
        with self._lock:
            return {version: why for (t, version), why in self._broken.items() if t == task}

    def get(self, task: str, version: str | None = None) -> Adapter:
        """The task's adapter on the model's device: `version`, or the active one; raises UnknownTaskError,
        UnknownVersionError or AdapterError."""
        version = version or self.store.stamp(task)
        key = (task, version)
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                self.on_event("hit", task)
                return adapter
            broken = self._broken.get(key)
            self.stats.misses += 1
        if broken is not None:
            raise AdapterError(broken)
        self.on_event("miss", task)
        try:
            adapter = self._load(task, version)
        except AdapterError as e:
            self._note_broken(key, str(e))
            raise
        except OSError as e:  # possibly transient (a shared filesystem): not remembered
            self._remember(task, version, AdapterInfo(version, error=str(e)))
            raise
        self._remember(task, version, AdapterInfo(adapter.version, adapter.config.variant, adapter.config.rank))
        evicted = []
        with self._lock:
            self.stats.loads += 1
            self._entries[key] = adapter
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_loaded:
                (evicted_task, _), _ = self._entries.popitem(last=False)
                evicted.append(evicted_task)
                self.stats.evictions += 1
        self.on_event("load", task)
        for evicted_task in evicted:
            self.on_event("eviction", evicted_task)
        return adapter

    def describe(self, task: str) -> AdapterInfo:
        """The task's active version and config, for listings: from a loaded adapter or an earlier
        load's outcome when there is one, else from the stored config alone. Never parses weights or
        changes the LRU order, so listing tasks cannot evict hot adapters. Reads the store (blocking
        I/O): call it off the event loop. Raises UnknownTaskError."""
        stamp = self.store.stamp(task)
        with self._lock:
            adapter = self._entries.get((task, stamp))
            known = self._infos.get(task)
        if adapter is not None:
            return AdapterInfo(adapter.version, adapter.config.variant, adapter.config.rank)
        if known is not None and known[0] == stamp:
            return known[1]
        info = self._read_info(task, stamp)
        self._remember(task, stamp, info)
        return info

    def _read_info(self, task: str, stamp: str) -> AdapterInfo:
        try:
            stored = self.store.read(task)
            config = AdapterConfig.from_dict(json.loads(stored.config_bytes))
        except (AdapterError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return AdapterInfo(stamp, error=str(e))
        version = stored.version or content_version(stored.config_bytes, stored.weight_bytes)
        if config.base_model_fingerprint != self.fingerprint:
            return AdapterInfo(version, error=f"task {task!r}: made for model fingerprint "
                                              f"{config.base_model_fingerprint!r}, but this server runs "
                                              f"{self.fingerprint!r}")
        if config.variant not in PRAD_VARIANTS:
            return AdapterInfo(version, error=f"task {task!r}: variant {config.variant!r} cannot be served")
        return AdapterInfo(version, config.variant, config.rank)

    def _remember(self, task: str, stamp: str, info: AdapterInfo) -> None:
        with self._lock:
            self._infos[task] = (stamp, info)

    def _note_broken(self, key: tuple[str, str], why: str) -> None:
        self._remember(key[0], key[1], AdapterInfo(key[1], error=why))
        with self._lock:
            self._broken[key] = why
            while len(self._broken) > MAX_BROKEN:
                self._broken.popitem(last=False)

    def _load(self, task: str, version: str) -> Adapter:
        stored = self.store.read_version(task, version)
        adapter = parse_adapter(stored.config_bytes, stored.weight_bytes, self.model.config, self.fingerprint,
                                source=f"task {task!r} version {version}")
        if adapter.config.variant not in PRAD_VARIANTS:
            raise AdapterError(f"task {task!r}: variant {adapter.config.variant!r} applies to every token and "
                               f"cannot be served by an adapter-free decode; serve a PrAd variant {PRAD_VARIANTS}")
        return adapter.to(self.model.device, self.model.dtype)

    def validate_all(self) -> dict[str, str]:
        """Load every task once; returns {task: error message} for the ones that fail."""
        errors: dict[str, str] = {}
        for task in self.store.tasks():
            try:
                self.get(task)
            except (AdapterError, UnknownTaskError, OSError) as e:
                errors[task] = str(e)
        return errors


__all__ = ["AdapterCache", "AdapterInfo", "CacheStats"]
