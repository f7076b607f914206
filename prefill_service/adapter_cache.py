"""Adapters loaded for prefill: an LRU cache of validated adapters, keyed by task and stored version.

A miss reads and validates the adapter in the caller's thread (the HTTP worker of the request that
needs it), never in the engine loop, so requests of loaded tasks keep flowing. A request holds its
Adapter object from admission to handoff, so eviction or a version change never touches it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapters_store.base import AdapterStore, UnknownTaskError
from prad.adapters import Adapter, AdapterError
from prad.adapters.config import PRAD_VARIANTS
from prad.adapters.io import parse_adapter
from prad.model import Model


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


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
        self._lock = threading.Lock()

    def tasks(self) -> list[str]:
        return self.store.tasks()

    def get(self, task: str) -> Adapter:
        """The task's active adapter on the model's device; raises UnknownTaskError / AdapterError."""
        key = (task, self.store.stamp(task))
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                self.on_event("hit", task)
                return adapter
            self.stats.misses += 1
        self.on_event("miss", task)
        adapter = self._load(task)
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

    def _load(self, task: str) -> Adapter:
        stored = self.store.read(task)
        adapter = parse_adapter(stored.config_bytes, stored.weight_bytes, self.model.config, self.fingerprint,
                                source=f"task {task!r}")
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


__all__ = ["AdapterCache", "CacheStats"]
