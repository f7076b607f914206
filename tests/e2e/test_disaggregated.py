"""Prefill and decode as separate OS processes, linked by gRPC or Redis, against the embedded server."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port
from tests.processes import ServeProcess
from tests.redis_fixture import running_redis

REQUESTS = [{"task": t, "prompt": p, "max_new_tokens": 10}
            for t in ("base", "pa-task", "sa-task", "lora-task", "t3")
            for p in ("The capital of France is", "Once upon a time")]


def _generate(url: str, body: dict) -> dict:
    r = httpx.post(url + "/generate", json=body, timeout=180)
    assert r.status_code == 200, f"{url} {body} -> {r.status_code} {r.text}"  # name the request that failed
    return r.json()


def _run_all(url: str, bodies: list[dict], workers: int = 4) -> list[dict]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda b: _generate(url, b), bodies))


@pytest.fixture(scope="module")
def inproc_tokens(server: str) -> list[list[int]]:
    return [r["token_ids"] for r in _run_all(server, REQUESTS)]


def test_grpc_two_prefills_one_decode_same_tokens_as_inproc(inproc_tokens, adapters_dir: Path, tmp_path) -> None:
    grpc_port = free_port()
    with ExitStack() as stack:
        decode = ServeProcess(["--role", "decode", "--transport", "grpc", "--grpc-port", str(grpc_port),
                               "--grpc-secret", "s3cret"], tmp_path, "decode").start()
        stack.callback(decode.stop)
        prefills = []
        for i in range(2):
            p = ServeProcess(["--role", "prefill", "--transport", "grpc", "--decode-addr", f"127.0.0.1:{grpc_port}",
                              "--adapters", str(adapters_dir), "--grpc-secret", "s3cret"], tmp_path, f"prefill{i}")
            stack.callback(p.stop)
            prefills.append(p.start())
        # both front doors at once, sharing the one decode service
        halves = [REQUESTS[i::2] for i in range(2)]
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda i: _run_all(prefills[i].url, halves[i]), range(2)))
        got = {json.dumps(b, sort_keys=True): r["token_ids"] for i in range(2) for b, r in zip(halves[i], results[i],
                                                                                                strict=True)}
        assert [got[json.dumps(b, sort_keys=True)] for b in REQUESTS] == inproc_tokens
        # every process serves its own metrics
        assert "prad:num_requests_running" in httpx.get(decode.url + "/metrics", timeout=30).text
        assert 'prad:kv_transfer_bytes_total{transport="grpc"}' in httpx.get(prefills[0].url + "/metrics",
                                                                               timeout=30).text

        # a wrong secret is refused, and the client hears why
        intruder = ServeProcess(["--role", "prefill", "--transport", "grpc", "--decode-addr",
                                 f"127.0.0.1:{grpc_port}", "--grpc-secret", "wrong"], tmp_path, "intruder")
        stack.callback(intruder.stop)
        intruder.start(wait_ready=False)
        r = httpx.post(intruder.url + "/generate", json={"task": "base", "prompt": "hi", "max_new_tokens": 2},
                       timeout=60)
        assert r.status_code == 502 and "UNAUTHENTICATED" in r.text

        # decode down: 503 with a reason, fast; decode back: service resumes without restarting prefill
        decode.stop()
        started = time.time()
        r = httpx.post(prefills[0].url + "/generate", json=REQUESTS[0], timeout=60)
        assert r.status_code == 503 and "decode service unavailable" in r.text
        assert time.time() - started < 15
        assert httpx.get(prefills[0].url + "/readyz", timeout=30).status_code == 503
        decode.start(wait_ready=False)
        prefills[0].wait("/readyz", 60)
        assert httpx.post(prefills[0].url + "/generate", json=REQUESTS[0], timeout=120).json()["token_ids"] == \
            inproc_tokens[0]


def _redis_args(url: str, *more: str) -> list[str]:
    return ["--transport", "redis", "--redis-url", url, "--claim-idle-s", "2", *more]


def test_redis_same_tokens_and_replica_killed_mid_stream(inproc_tokens, adapters_dir: Path, tmp_path) -> None:
    import redis

    with running_redis(tmp_path / "redis") as rs, ExitStack() as stack:
        decodes = []
        for i in range(2):
            d = ServeProcess(["--role", "decode", *_redis_args(rs.url, "--replica-name", f"replica{i}")], tmp_path,
                             f"decode{i}")
            stack.callback(d.stop)
            decodes.append(d.start())
        prefill = ServeProcess(["--role", "prefill", *_redis_args(rs.url), "--adapters", str(adapters_dir)],
                               tmp_path, "prefill")
        stack.callback(prefill.stop)
        prefill.start()
        assert [r["token_ids"] for r in _run_all(prefill.url, REQUESTS)] == inproc_tokens

        # Long streams spread over both replicas; kill one while it decodes some of them, once every
        # stream has its first tokens.
        bodies = [{"task": ("base", "t1", "t2", "t4")[i % 4], "prompt": f"Story {i}: once upon a time",
                   "max_new_tokens": 40, "ignore_eos": True} for i in range(6)]
        expected = [r["token_ids"] for r in _run_all(prefill.url, bodies)]

        first_tokens: list[list[float]] = [[] for _ in bodies]
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(_stream_tokens, prefill.url, b, f) for b, f in zip(bodies, first_tokens,
                                                                                        strict=True)]
            deadline = time.time() + 90
            while not (all(first_tokens) and _num_running(decodes[0]) > 0) and time.time() < deadline:
                time.sleep(0.02)
            assert all(first_tokens), "every stream must have tokens before the kill"
            assert _num_running(decodes[0]) > 0, "the killed replica must hold streams"
            decodes[0].kill()
            results = [f.result(timeout=240) for f in futures]
        for (tokens, reason), want in zip(results, expected, strict=True):
            assert reason in ("length", "error"), reason
            if reason == "length":
                assert tokens == want  # no duplicate, no lost token
        assert sum(reason == "length" for _, reason in results) >= len(bodies) - 1

        # nothing left behind but the infrastructure keys
        client = redis.Redis.from_url(rs.url)
        time.sleep(1.0)
        leftovers = [k.decode() for k in client.keys("prad:*")
                     if not k.decode().startswith(("prad:jobs", "prad:wake:", "prad:decode-alive:"))]
        assert leftovers == []
        assert client.xlen("prad:jobs") == 0


def test_redis_restart_fails_in_flight_cleanly_and_recovers(adapters_dir: Path, tmp_path) -> None:
    with running_redis(tmp_path / "redis") as rs, ExitStack() as stack:
        decode = ServeProcess(["--role", "decode", *_redis_args(rs.url)], tmp_path, "decode")
        stack.callback(decode.stop)
        decode.start()
        prefill = ServeProcess(["--role", "prefill", *_redis_args(rs.url)], tmp_path, "prefill")
        stack.callback(prefill.stop)
        prefill.start()
        body = {"task": "base", "prompt": "Count slowly:", "max_new_tokens": 80, "ignore_eos": True}
        with ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(lambda: httpx.post(prefill.url + "/generate", json=body, timeout=180))
            time.sleep(2.0)
            rs.stop()
            r = httpx.post(prefill.url + "/generate", json=body, timeout=60)
            assert r.status_code == 503, r.text  # Redis down: a clear refusal, not a hang
            done = in_flight.result(timeout=120)
        assert done.status_code in (200, 503), done.text
        rs.start()
        prefill.wait("/readyz", 60)
        ok = httpx.post(prefill.url + "/generate", json={**body, "max_new_tokens": 4}, timeout=120)
        assert ok.status_code == 200, ok.text


def _num_running(decode: ServeProcess) -> int:
    return int(httpx.get(decode.url + "/readyz", timeout=10).json()["num_running"])


def _stream_tokens(url: str, body: dict, first_token: list[float]) -> tuple[list[int], str | None]:
    """Stream one request; records when its first token came in `first_token`."""
    tokens, reason = [], None
    with httpx.stream("POST", url + "/generate", json={**body, "stream": True}, timeout=180) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["token_ids"] and not first_token:
                    first_token.append(time.time())
                tokens += event["token_ids"]
                reason = event.get("finish_reason") or reason
    return tokens, reason


@pytest.mark.parametrize("transport", ["grpc", "redis"])
def test_sigterm_drains_decode_running_requests_finish(transport: str, adapters_dir: Path, tmp_path) -> None:
    """SIGTERM to decode mid-stream: the running request (several seconds of decoding, longer than
    gRPC's old 2 s stop grace) still gets every token, and the process then exits by itself."""
    body = {"task": "pa-task", "prompt": "Once upon a time", "max_new_tokens": 120, "ignore_eos": True}
    with ExitStack() as stack:
        if transport == "grpc":
            port = free_port()
            link = ["--transport", "grpc"]
            decode_args, prefill_args = ["--grpc-port", str(port)], ["--decode-addr", f"127.0.0.1:{port}"]
        else:
            rs = stack.enter_context(running_redis(tmp_path / "redis"))
            link, decode_args, prefill_args = _redis_args(rs.url), [], []
        decode = ServeProcess(["--role", "decode", *link, *decode_args], tmp_path, f"decode-{transport}")
        stack.callback(decode.stop)
        decode.start()
        prefill = ServeProcess(["--role", "prefill", *link, *prefill_args, "--adapters", str(adapters_dir)], tmp_path,
                               f"prefill-{transport}")
        stack.callback(prefill.stop)
        prefill.start()
        expected = httpx.post(prefill.url + "/generate", json=body, timeout=180).json()["token_ids"]

        first_token: list[float] = []
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(_stream_tokens, prefill.url, body, first_token)
            deadline = time.time() + 60
            while not first_token and time.time() < deadline:
                time.sleep(0.02)
            assert decode.process is not None
            decode.process.terminate()  # SIGTERM, as an orchestrator stopping the replica sends
            tokens, reason = running.result(timeout=120)
        assert reason == "length" and tokens == expected  # finished on the draining replica, nothing lost
        # uvicorn re-raises the signal once its graceful shutdown is done: -SIGTERM, not a SIGKILL
        assert decode.process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "draining" in decode.log_tail() or transport == "grpc"
