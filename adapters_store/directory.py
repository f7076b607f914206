"""A folder of adapters: every sub-folder with a valid task-id name is a task (its active version)."""

from __future__ import annotations

from pathlib import Path

from adapters_store.base import AdapterStore, StoredAdapter, UnknownTaskError
from prad.adapters.config import TASK_ID_RE, AdapterError
from prad.adapters.io import PICKLE_SUFFIXES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"


class DirectoryStore(AdapterStore):
    def __init__(self, root: Path | None) -> None:
        self.root = None if root is None else Path(root)
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"--adapters {self.root}: not a directory")

    def tasks(self) -> list[str]:
        if self.root is None:
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and TASK_ID_RE.fullmatch(p.name) and p.name != "base")

    def _folder(self, task: str) -> Path:
        if self.root is None or not TASK_ID_RE.fullmatch(task) or not (self.root / task).is_dir():
            raise UnknownTaskError(task)
        return self.root / task

    def read(self, task: str) -> StoredAdapter:
        folder = self._folder(task)
        config, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not weights.is_file():
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
            raise AdapterError(f"task {task!r}: missing {WEIGHTS_FILE}{hint}")
        if not config.is_file():
            raise AdapterError(f"task {task!r}: missing {CONFIG_FILE}")
        return StoredAdapter(task, config.read_bytes(), weights.read_bytes())

    def stamp(self, task: str) -> str:
        folder = self._folder(task)
        parts = []
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            p = folder / name
            parts.append(f"{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.exists() else "-")
        return "/".join(parts)
