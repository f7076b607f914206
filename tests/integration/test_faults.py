"""Faults injected into real processes on loopback: every stream ends with an explicit event within a
stated bound (never a silent wait for the request timeout), decode drops work nobody reads, and the
service recovers once the failed part is back.

One Redis deployment (one prefill, one decode replica at a time) serves the Redis cases in order; the
gRPC case runs its own pair. Streams are long (ignore_eos) only where a fault must hit them mid-stream.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from launcher.local import RedisServer, ServeProcess, free_port
from tests.redis_fixture import running_redis

CLAIM_IDLE_S = 2.0
REPLICA_LOST_S = 4.0  # the prefill side's bound (PRAD_REPLICA_LOST_S), > CLAIM_IDLE_S
# On top of the bound: the once-a-second check, the replica's heartbeat period and scheduling on 2 cores.
MARGIN_S = 4.0
LONG = {"task": "base", "max_new_tokens": 200, "ignore_eos": True}  # still running when the fault hits


@dataclass
class Stream:
    """What one streaming client received, and when (time.monotonic())."""

    tokens: list[int] = field(default_factory=list)
    reason: str | None = None
    error: dict | None = None
    first_token_s: float | None = None
    ended_s: float | None = None


def _stream(url: str, body: dict, out: Stream) -> Stream:
    with httpx.stream("POST", url + "/generate", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                out.tokens += event.get("token_ids", [])
                if out.tokens and out.first_token_s is None:
                    out.first_token_s = time.monotonic()
                out.reason = event.get("finish_reason") or out.reason
                out.error = event.get("error") or out.error
    out.ended_s = time.monotonic()
    return out


def _start_streams(pool: ThreadPoolExecutor, url: str, prompts: list[str]) -> tuple[list[Stream], list[Future]]:
    """Open one long stream per prompt and return once each has received a token (asserted)."""
    streams = [Stream() for _ in prompts]
    futures = [pool.submit(_stream, url, {**LONG, "prompt": p}, s) for p, s in zip(prompts, streams, strict=True)]
    deadline = time.monotonic() + 90
    while any(s.first_token_s is None for s in streams) and time.monotonic() < deadline:
        assert not any(f.done() for f in futures), [f.result() for f in futures if f.done()]
        time.sleep(0.05)
    assert all(s.first_token_s is not None for s in streams), "every stream must have tokens before the fault"
    return streams, futures


def _generate(url: str, body: dict, timeout_s: float = 120) -> httpx.Response:
    return httpx.post(url + "/generate", json=body, timeout=timeout_s)


def _decode_stats(decode: ServeProcess) -> dict:
    return httpx.get(decode.url + "/readyz", timeout=5).json()  # 503 while not ready, same JSON


def _wait_idle(decode: ServeProcess, timeout_s: float) -> float:
    """Seconds until decode runs and queues nothing; fails after `timeout_s`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        stats = _decode_stats(decode)
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"decode still busy after {timeout_s} s: {_decode_stats(decode)}")


# --- Redis ------------------------------------------------------------------------------------------
@dataclass
class RedisDeployment:
    redis: RedisServer
    prefill: ServeProcess
    decode: ServeProcess
    tmp: Path
    stack: ExitStack
    num_replicas: int = 1

    def start_decode(self) -> ServeProcess:
        """A new decode replica (the previous one is dead or stopped)."""
        self.num_replicas += 1
        self.decode = _redis_decode(self.redis.url, self.tmp, f"replica{self.num_replicas}", self.stack)
        self.prefill.wait("/readyz", 30)
        return self.decode


def _redis_args(url: str) -> list[str]:
    return ["--transport", "redis", "--redis-url", url, "--claim-idle-s", str(CLAIM_IDLE_S)]


def _redis_decode(url: str, tmp: Path, name: str, stack: ExitStack) -> ServeProcess:
    decode = ServeProcess(["--role", "decode", *_redis_args(url), "--replica-name", name], tmp, name)
    stack.callback(decode.stop)
    return decode.start()


@pytest.fixture(scope="module")
def redis_deployment(tmp_path_factory) -> Iterator[RedisDeployment]:
    tmp = tmp_path_factory.mktemp("faults-redis")
    with running_redis(tmp / "redis") as rs, ExitStack() as stack:
        decode = _redis_decode(rs.url, tmp, "replica1", stack)
        prefill = ServeProcess(["--role", "prefill", *_redis_args(rs.url)], tmp, "prefill",
                               env={"PRAD_REPLICA_LOST_S": str(REPLICA_LOST_S)})
        stack.callback(prefill.stop)
        prefill.start()
        yield RedisDeployment(rs, prefill, decode, tmp, stack)


def test_redis_only_replica_killed_streams_fail_fast_then_recover(redis_deployment: RedisDeployment) -> None:
    d = redis_deployment
    prompts = [f"Story {i}: once upon a time" for i in range(3)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        streams, futures = _start_streams(pool, d.prefill.url, prompts)
        d.decode.kill()
        killed_s = time.monotonic()
        for f in futures:
            f.result(timeout=REPLICA_LOST_S + MARGIN_S + 30)
    for s in streams:
        assert s.reason == "error" and s.error is not None and s.error["status"] == 503, s
        assert "decode replica lost" in s.error["message"], s.error
        assert s.ended_s is not None and s.ended_s - killed_s < REPLICA_LOST_S + MARGIN_S, s.ended_s - killed_s

    # No replica: refused at once, and prefill says why it is not ready.
    started = time.monotonic()
    r = _generate(d.prefill.url, {"task": "base", "prompt": "hi", "max_new_tokens": 4}, timeout_s=30)
    assert r.status_code == 503 and "no decode replica is alive" in r.text, r.text
    assert time.monotonic() - started < 2.0
    assert httpx.get(d.prefill.url + "/readyz", timeout=10).status_code == 503

    # A new replica: the service recovers, and no stream had a token twice (greedy: each stream is a prefix
    # of the same request run whole).
    d.start_decode()
    with ThreadPoolExecutor(len(prompts)) as pool:
        again = list(pool.map(lambda p, s: _generate(d.prefill.url, {**LONG, "prompt": p,
                                                                    "max_new_tokens": len(s.tokens)}),
                              prompts, streams))
    for r, s in zip(again, streams, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["token_ids"] == s.tokens


def test_redis_restart_fails_streams_and_decode_drops_orphans(redis_deployment: RedisDeployment) -> None:
    d = redis_deployment
    with ThreadPoolExecutor(2) as pool:
        streams, futures = _start_streams(pool, d.prefill.url, ["Count slowly:", "List the planets:"])
        d.redis.stop()
        d.redis.start()  # same port, empty: every job, KV and token stream is gone
        restarted_s = time.monotonic()
        for f in futures:
            f.result(timeout=60)
        # Decode drops the work nobody can read any more, promptly.
        assert _wait_idle(d.decode, timeout_s=5.0) < 5.0
    for s in streams:
        assert s.reason == "error" and s.error is not None and s.error["status"] == 503, s
        assert s.ended_s is not None and s.ended_s - restarted_s < MARGIN_S + 2, s.ended_s - restarted_s
    d.prefill.wait("/readyz", 30)
    # Ready means a replica was alive at that moment; its first heartbeats after the restart may still
    # race a request, which is then refused with a 503 a client retries.
    deadline = time.monotonic() + 15
    while (r := _generate(d.prefill.url, {"task": "base", "prompt": "hi", "max_new_tokens": 4})).status_code == 503 \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert r.status_code == 200, r.text


def _open_unread_stream(url: str, body: dict) -> socket.socket:
    """A client that sends a streaming request and never reads the response (a tiny receive buffer)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    payload = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    return sock


def test_redis_client_that_stops_reading_stalls_no_other_stream(redis_deployment: RedisDeployment) -> None:
    d = redis_deployment
    d.prefill.wait("/readyz", 30)
    slow = _open_unread_stream(d.prefill.url, {**LONG, "prompt": "Tell a very long story:"})
    try:
        bodies = [{"task": "base", "prompt": f"Question {i}: what is {i} plus {i}?", "max_new_tokens": 12,
                   "ignore_eos": True} for i in range(3)]
        started = time.monotonic()
        with ThreadPoolExecutor(len(bodies)) as pool:
            done = list(pool.map(lambda b: _stream(d.prefill.url, b, Stream()), bodies))
        assert all(s.reason == "length" and len(s.tokens) == 12 for s in done), done
        assert time.monotonic() - started < 60
    finally:
        slow.close()
    assert _wait_idle(d.decode, timeout_s=30) < 30  # the abandoned stream is aborted, not decoded for nobody


# --- gRPC -------------------------------------------------------------------------------------------
def test_grpc_decode_restarted_streams_fail_then_new_requests_succeed(tmp_path: Path) -> None:
    port = free_port()
    with ExitStack() as stack:
        decode = ServeProcess(["--role", "decode", "--transport", "grpc", "--grpc-port", str(port)], tmp_path,
                              "decode-grpc")
        stack.callback(decode.stop)
        decode.start()
        prefill = ServeProcess(["--role", "prefill", "--transport", "grpc", "--decode-addr", f"127.0.0.1:{port}"],
                               tmp_path, "prefill-grpc")
        stack.callback(prefill.stop)
        prefill.start()
        with ThreadPoolExecutor(2) as pool:
            streams, futures = _start_streams(pool, prefill.url, ["Count slowly:", "List the planets:"])
            decode.kill()
            killed_s = time.monotonic()
            for f in futures:
                f.result(timeout=60)
        for s in streams:
            assert s.reason == "error" and s.error is not None and s.error["status"] == 503, s
            assert s.ended_s is not None and s.ended_s - killed_s < 5.0, s.ended_s - killed_s
        decode.start()
        prefill.wait("/readyz", 60)
        r = _generate(prefill.url, {"task": "base", "prompt": "hi", "max_new_tokens": 4})
        assert r.status_code == 200 and r.json()["finish_reason"] == "length", r.text
