"""The adapter store boundary: which tasks exist, and the bytes of each task's active version."""

from __future__ import annotations

import abc
from dataclasses import dataclass


class UnknownTaskError(KeyError):
    """No such task in the store."""


@dataclass(frozen=True)
class StoredAdapter:
    task: str  # task id
    config_bytes: bytes  # adapter_config.json
    weight_bytes: bytes  # adapter.safetensors


class AdapterStore(abc.ABC):
    @abc.abstractmethod
    def tasks(self) -> list[str]:
        """Task ids with an active adapter, sorted."""

    @abc.abstractmethod
    def read(self, task: str) -> StoredAdapter:
        """The active version's bytes; UnknownTaskError if there is none."""

    @abc.abstractmethod
    def stamp(self, task: str) -> str:
        """A cheap token that changes whenever the task's active bytes change (cache key)."""
