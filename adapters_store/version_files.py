"""Immutable version folders on a (possibly shared) filesystem.

Layout: root/<task>/versions/<version>/{adapter_config.json, adapter.safetensors}, version =
content_version(config, weights). A version is written into root/.tmp/ first, fsynced, then renamed
into place in one step, so a reader sees a version whole or not at all; deleting renames it back
into root/.tmp/ before removing it. root/.tmp sits on the same filesystem, so both renames are atomic
(also on NFS). Names starting with '.' are never task ids, so staging and lock files never show up
as tasks.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from adapters_store.base import VERSION_RE, StoredAdapter, UnknownVersionError, VersionInfo, validate_version
from prad.adapters.config import TASK_ID_RE
from prad.adapters.io import CONFIG_FILE, WEIGHTS_FILE, content_version

STAGING_DIR = ".tmp"
VERSIONS_DIR = "versions"


def is_task_id(task: str) -> bool:
    """A syntactically valid task id (read paths treat anything else as an unknown task)."""
    return isinstance(task, str) and bool(TASK_ID_RE.fullmatch(task)) and task != "base"


@dataclass(frozen=True)
class StagedVersion:
    version: str  # content version of the staged bytes
    path: Path  # folder under root/.tmp holding both files, fsynced


class VersionFiles:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / STAGING_DIR).mkdir(parents=True, exist_ok=True)

    def task_dir(self, task: str) -> Path:
        return self.root / task

    def version_dir(self, task: str, version: str) -> Path:
        return self.root / task / VERSIONS_DIR / version

    def task_ids(self) -> list[str]:
        """Tasks with a folder under root, sorted."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_task_id(p.name))

    def has_task(self, task: str) -> bool:
        return is_task_id(task) and self.task_dir(task).is_dir()

    def has_version(self, task: str, version: str) -> bool:
        return is_task_id(task) and self.version_dir(task, version).is_dir()

    def version_ids(self, task: str) -> list[str]:
        folder = self.task_dir(task) / VERSIONS_DIR
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and VERSION_RE.fullmatch(p.name))

    def stage(self, config_bytes: bytes, weight_bytes: bytes) -> StagedVersion:
        """Write both files into a fresh staging folder and fsync them; nothing is visible yet."""
        version = content_version(config_bytes, weight_bytes)
        path = self.root / STAGING_DIR / f"{version}.{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        try:
            _write_synced(path / CONFIG_FILE, config_bytes)
            _write_synced(path / WEIGHTS_FILE, weight_bytes)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return StagedVersion(version, path)

    def commit(self, task: str, staged: StagedVersion) -> str:
        """Rename a staged version into place; if that version is already there, drop the copy."""
        target = self.version_dir(task, staged.version)
        try:
            if not target.is_dir():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staged.path, target)
                _fsync_dir(target.parent)
        except OSError:
            if not target.is_dir():  # not a lost race with an identical put: a real failure
                shutil.rmtree(staged.path, ignore_errors=True)
                raise
        shutil.rmtree(staged.path, ignore_errors=True)
        return staged.version

    def read(self, task: str, version: str) -> StoredAdapter:
        folder = self.version_dir(task, validate_version(version))
        try:
            config = (folder / CONFIG_FILE).read_bytes()
            weights = (folder / WEIGHTS_FILE).read_bytes()
        except FileNotFoundError:
            raise UnknownVersionError(task, version) from None
        return StoredAdapter(task, config, weights, version)

    def info(self, task: str, version: str, is_active: bool) -> VersionInfo:
        folder = self.version_dir(task, version)
        try:
            config, weights = (folder / CONFIG_FILE).stat(), (folder / WEIGHTS_FILE).stat()
        except FileNotFoundError:
            raise UnknownVersionError(task, version) from None
        return VersionInfo(version, config.st_mtime, config.st_size + weights.st_size, is_active)

    def remove_version(self, task: str, version: str) -> None:
        self._remove(self.version_dir(task, version))

    def remove_task(self, task: str) -> None:
        self._remove(self.task_dir(task))

    def _remove(self, path: Path) -> None:
        # Rename first, so no reader ever sees a half-deleted folder.
        trash = self.root / STAGING_DIR / f"deleted.{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step: write a temporary sibling, fsync, os.replace."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
