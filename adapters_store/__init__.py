"""Adapter storage: where tasks' adapter bytes live. Runs no models.

* `base` — the interfaces (`AdapterStore` read side, `VersionedAdapterStore`), errors, `VersionInfo`.
* `directory.DirectoryStore` — a plain folder, one sub-folder per task (`prad serve --adapters DIR`).
* `filesystem.FilesystemStore` — versioned store in one folder (single node, or a shared POSIX FS).
* `redis_index.RedisIndexStore` — versioned store for many nodes: index in Redis, bytes on a shared FS.
* `state`, `version_files`, `notify`, `redis_listener` — the pieces the versioned stores share.

Importing this package imports no backend; `redis_index` needs the `redis` package.
"""
