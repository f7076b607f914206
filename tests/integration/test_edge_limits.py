"""The front door's edge over real sockets: body limits on bytes received, admin credentials before
any body, bounded fields, slow clients, cheap 429s, client disconnects, metadata-only task listings,
and secrets from files."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from launcher import cli
from launcher.embedded import build_embedded_app, uvicorn_options
from launcher.settings import ServeSettings
from prefill_service.api_models import MAX_TOP_K
from prefill_service.app import MAX_REQUEST_BYTES
from tests.helpers import running_server

TOKEN = "edge-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
MAX_ADAPTER_BYTES = 1024
ADMIN_LIMIT = MAX_ADAPTER_BYTES + (2 << 20)  # what launcher/roles.py allows an admin body


def serving(app: FastAPI, settings: ServeSettings):
    """running_server with the launcher's uvicorn options (header timeout, keep-alive)."""
    return running_server(app, **uvicorn_options(settings))


@pytest.fixture(scope="module")
def edge(smollm2, adapters_dir, tmp_path_factory) -> Iterator[tuple[str, FastAPI]]:
    settings = ServeSettings(adapters=adapters_dir, dtype="float32", device="cpu", max_seq_len=512,
                             admin_token=TOKEN, store=tmp_path_factory.mktemp("edge-store"),
                             max_adapter_bytes=MAX_ADAPTER_BYTES, max_loaded_adapters=2,
                             http_header_timeout_s=HEADER_TIMEOUT_S, http_body_timeout_s=BODY_TIMEOUT_S)
    app = build_embedded_app(settings, smollm2)
    with serving(app, settings) as url:
        yield url, app


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=15)


def _read_all(sock: socket.socket, timeout_s: float = 15.0) -> bytes:
    """Everything the server sends until it closes (or the timeout passes)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def _json_body(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


MULTIPART = "multipart/form-data; boundary=b"
FILE_PART = (b'--b\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n'
             b"Content-Type: application/octet-stream\r\n\r\n")


def _send_chunked(url: str, path: str, max_bytes: int, headers: dict[str, str] | None = None,
                  chunk_bytes: int = 64 << 10, prefix: bytes = b"") -> tuple[int, bytes]:
    """POST a chunked body (prefix, then filler), chunk by chunk, stopping as soon as the server
    answers; returns the bytes sent and the response."""
    sock = _connect(url)
    headers = {"Content-Type": "application/json", **(headers or {})}
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(head.encode() + b"\r\n")
    if prefix:
        sock.sendall(b"%x\r\n%s\r\n" % (len(prefix), prefix))
    num_sent = len(prefix)
    try:
        while num_sent < max_bytes and not select.select([sock], [], [], 0.05)[0]:
            sock.sendall(b"%x\r\n%s\r\n" % (chunk_bytes, b"a" * chunk_bytes))
            num_sent += chunk_bytes
        if num_sent >= max_bytes:
            sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server closed while we were sending
    with sock:
        return num_sent, _read_all(sock)


def test_chunked_bodies_are_cut_at_the_limit_on_bytes_received(edge) -> None:
    url, _ = edge
    cap = 4 * MAX_REQUEST_BYTES
    sent, response = _send_chunked(url, "/generate", cap)
    assert _status(response) == 413 and sent < cap, (sent, response[:200])
    assert str(MAX_REQUEST_BYTES) in _json_body(response)["detail"]
    sent, response = _send_chunked(url, "/v1/completions", cap)
    assert _status(response) == 413 and sent < cap
    assert str(MAX_REQUEST_BYTES) in _json_body(response)["error"]["message"]
    sent, response = _send_chunked(url, "/admin/adapters/x/versions", 2 * ADMIN_LIMIT,
                                   {**AUTH, "Content-Type": MULTIPART}, chunk_bytes=256 << 10, prefix=FILE_PART)
    assert _status(response) == 413 and sent < 2 * ADMIN_LIMIT and str(ADMIN_LIMIT) in response.decode()


def test_admin_credentials_are_checked_before_any_body_is_read(edge) -> None:
    url, _ = edge
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 403)):
        # headers of a chunked upload and no body at all: the answer cannot depend on the body
        sock = _connect(url)
        head = "POST /admin/adapters/t0/versions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        head += f"Content-Type: {MULTIPART}\r\n"
        sock.sendall((head + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode())
        assert select.select([sock], [], [], BODY_TIMEOUT_S / 2)[0], "no answer before the body"
        with sock:
            response = _read_all(sock)
        assert _status(response) == status, response[:300]
        assert (b"www-authenticate: bearer" in response.lower()) == (status == 401)
    for path, body in (("/admin/adapters/t0/activate", b"{not json"), ("/admin/adapters/t0/versions", b"--b\r\n")):
        for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 403)):
            r = httpx.post(url + path, content=body, headers={**headers, "Content-Type": MULTIPART}, timeout=10)
            assert r.status_code == status, (path, r.text)


def test_sampling_fields_are_bounded_at_the_edge(edge) -> None:
    url, _ = edge
    base = {"task": "base", "prompt": "Hi", "max_new_tokens": 2}
    for bad in ({"top_k": 2**32}, {"top_k": MAX_TOP_K + 1}, {"seed": 2**64}, {"stop": ["x"] * 9},
                {"stop": ["x" * 257]}, {"stop": [""]}, {"max_new_tokens": 2**32}):
        r = httpx.post(url + "/generate", json={**base, **bad}, timeout=30)
        assert r.status_code == 422, (bad, r.text)
    r = httpx.post(url + "/generate", content=b'{"task": "base", "prompt": "Hi", "temperature": NaN}', timeout=30)
    assert r.status_code == 422
    assert httpx.post(url + "/generate", json={**base, "top_k": MAX_TOP_K}, timeout=60).status_code == 200
    r = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "Hi", "seed": 2**64}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


def test_deeply_nested_json_is_refused_fast(edge) -> None:
    url, _ = edge
    nested = b"[" * 400_000 + b"]" * 400_000
    r = httpx.post(url + "/generate", content=nested, timeout=10)
    assert r.status_code in (400, 422) and "detail" in r.json()
    r = httpx.post(url + "/v1/chat/completions", content=nested, timeout=10)
    assert r.status_code == 400 and "error" in r.json()


@pytest.mark.parametrize("sent", [b"", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Ty"])
def test_incomplete_headers_close_the_connection_within_the_header_timeout(edge, sent: bytes) -> None:
    url, _ = edge
    with _connect(url) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        response = _read_all(sock, timeout_s=HEADER_TIMEOUT_S * 10)
        assert time.monotonic() - started < HEADER_TIMEOUT_S * 10, "connection still open"
    assert response == b"" or _status(response) == 408


def test_trickling_body_gets_408(edge) -> None:
    url, _ = edge
    with _connect(url) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        deadline = time.monotonic() + BODY_TIMEOUT_S * 10
        while time.monotonic() < deadline and not select.select([sock], [], [], 0.3)[0]:
            sock.sendall(b" ")  # one byte at a time, never finishing
        response = _read_all(sock)
    assert _status(response) == 408, response[:300]
    assert str(BODY_TIMEOUT_S) in _json_body(response)["detail"]


def test_unsupported_openai_fields_are_refused_by_name(edge) -> None:
    url, _ = edge
    chat = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for field, value in (("logprobs", True), ("top_logprobs", 2), ("tools", [{"type": "function"}]),
                         ("response_format", {"type": "json_object"}), ("logit_bias", {"1": 5}),
                         ("presence_penalty", 0.5), ("function_call", {"name": "f"})):
        r = httpx.post(url + "/v1/chat/completions", json={**chat, field: value}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    completion = {"model": "base", "prompt": "Hi", "max_tokens": 2}
    for field, value in (("echo", True), ("best_of", 3), ("suffix", "end"), ("frequency_penalty", 1.0)):
        r = httpx.post(url + "/v1/completions", json={**completion, field: value}, timeout=30)
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)
    neutral = {"user": "someone", "logprobs": False, "presence_penalty": 0, "tool_choice": "none", "tools": []}
    assert httpx.post(url + "/v1/chat/completions", json={**chat, **neutral}, timeout=60).status_code == 200
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={**completion, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def _sample(app: FastAPI, name: str, **labels: str) -> float:
    return app.state.service.metrics.registry.get_sample_value(name, labels) or 0.0


def test_non_streaming_client_that_hangs_up_is_aborted(edge) -> None:
    url, app = edge
    finished = {reason: _sample(app, "prad:request_success_total", task="base", finish_reason=reason)
                for reason in ("abort", "length")}
    tokens = _sample(app, "prad:generation_tokens_total", task="base")
    body = json.dumps({"task": "base", "prompt": "Count: one, two,", "max_new_tokens": 480, "ignore_eos": True})
    with _connect(url) as sock:
        sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        deadline = time.monotonic() + 60
        while _sample(app, "prad:generation_tokens_total", task="base") < tokens + 2:
            assert time.monotonic() < deadline, "no tokens generated"
            time.sleep(0.05)
    deadline = time.monotonic() + 60
    while _sample(app, "prad:request_success_total", task="base", finish_reason="abort") == finished["abort"]:
        assert time.monotonic() < deadline, "request not aborted"
        time.sleep(0.05)
    assert _sample(app, "prad:request_success_total", task="base", finish_reason="length") == finished["length"]
    assert _sample(app, "prad:generation_tokens_total", task="base") < tokens + 480


def test_task_listing_loads_no_weights_and_evicts_nothing(edge) -> None:
    url, app = edge
    cache = app.state.service.adapters
    assert httpx.post(url + "/generate", json={"task": "t1", "prompt": "Hi", "max_new_tokens": 1},
                      timeout=60).status_code == 200
    before = (cache.stats.loads, cache.stats.evictions, cache.stats.hits, list(cache._entries))
    rows = {row["task"]: row for row in httpx.get(url + "/tasks", timeout=30).json()["tasks"]}
    assert (cache.stats.loads, cache.stats.evictions, cache.stats.hits, list(cache._entries)) == before
    assert len(rows) == 1 + len(cache.tasks())
    assert all(len(row["adapter_version"]) == 16 and row["variant"].startswith("prad-") and row["rank"] == 8
               for task, row in rows.items() if task != "base")


def test_full_prefill_queue_answers_429_before_the_costly_part(smollm2) -> None:
    """With the prefill engine held mid-step and its queue full, a request for an unknown task gets
    429 (queue checked first), not 404 (which only resolving the task, in prepare, could give)."""
    settings = ServeSettings(dtype="float32", device="cpu", max_waiting=1, max_seq_len=256)
    app = build_embedded_app(settings, smollm2)
    engine = app.state.engines["prefill"]
    with running_server(app) as url, ThreadPoolExecutor(1) as pool:
        with engine.compute_lock:  # the engine takes the request, then waits for the lock in its step
            held = pool.submit(httpx.post, url + "/generate", json={"task": "base", "prompt": "Hi",
                                                                     "max_new_tokens": 2}, timeout=60)
            deadline = time.monotonic() + 30
            while engine.stats()["num_waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            for task in ("no-such-task", "base"):
                r = httpx.post(url + "/generate", json={"task": task, "prompt": "Hi"}, timeout=30)
                assert r.status_code == 429 and "busy" in r.json()["detail"], (task, r.text)
            r = httpx.post(url + "/v1/completions", json={"model": "no-such-task", "prompt": "Hi"}, timeout=30)
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert held.result().status_code == 200


def _serve_with(monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, ServeSettings | None]:
    """Run `prad serve argv` up to the point where it would start serving; returns (exit code, settings)."""
    seen: list[ServeSettings] = []
    monkeypatch.setattr("launcher.logs.configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr("launcher.cli._set_threads", lambda threads: None)
    monkeypatch.setattr("launcher.embedded.serve", seen.append)
    code = cli.main(["serve", *argv])
    return code, seen[0] if seen else None


def test_secrets_from_files_and_warnings_for_flags(monkeypatch, caplog, tmp_path: Path, capsys) -> None:
    for name in ("PRAD_API_KEY", "PRAD_ADMIN_TOKEN", "PRAD_GRPC_SECRET"):
        monkeypatch.delenv(name, raising=False)
    for name, secret in (("api-key", "key-1"), ("admin-token", "tok-2"), ("grpc-secret", "sec-3")):
        (tmp_path / name).write_text(f"  {secret}\n")
    files = [arg for name in ("api-key", "admin-token", "grpc-secret") for arg in (f"--{name}-file",
                                                                                    str(tmp_path / name))]
    with caplog.at_level("WARNING", logger="prad.cli"):
        code, settings = _serve_with(monkeypatch, *files)
    assert code == 0 and settings is not None and not caplog.records
    assert (settings.api_key, settings.admin_token, settings.grpc_secret) == ("key-1", "tok-2", "sec-3")

    with caplog.at_level("WARNING", logger="prad.cli"):
        code, settings = _serve_with(monkeypatch, "--admin-token", "on-the-command-line")
    assert code == 0 and settings is not None and settings.admin_token == "on-the-command-line"
    assert any("--admin-token-file" in r.getMessage() for r in caplog.records)

    code, settings = _serve_with(monkeypatch, "--api-key", "sekrit-456", "--api-key-file", str(tmp_path / "api-key"))
    error = capsys.readouterr().err
    assert code == 2 and settings is None and "api_key is given both" in error and "sekrit-456" not in error
    monkeypatch.setenv("PRAD_ADMIN_TOKEN", "from-env")
    with pytest.raises(ValueError, match="admin_token is given both"):
        ServeSettings(admin_token_file=tmp_path / "admin-token")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        ServeSettings(grpc_secret_file=tmp_path / "empty")
