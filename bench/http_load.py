"""HTTP load generator for the benchmarks: R streamed `POST /generate` requests sent at once.

It runs as its own process (`python -m bench.http_load`, one JSON job on stdin, one JSON result on
stdout), as real clients do: in the server's process the client's Python would hold the GIL the
server and its engines need, and its cost would be charged to the server.

The client is plain asyncio streams speaking HTTP/1.1 (one connection per request, opened before the
clock starts; the chunked SSE body parsed by hand), because on a 2-core machine every CPU second the
client spends is taken from the server it measures. With httpx (one AsyncClient per request) the
client used ~1.2 s of CPU per 64 x 64-token run, with a shared 64-connection httpx pool more (its
pool rescans every connection on each request event).

Job: {"url": "http://host:port", "requests": [{"task", "prompt", "prompt_tokens"}], "gen"}.
Result: {"total_s", "prefill_s", "ttft_s", "client_cpu_s", "tokens": [[ids] per request]}: total
from just before the requests are sent until the last stream ends; prefill until the last request's
first token; ttft_s each request's time to its first token; client_cpu_s the load generator's own
CPU time in that window.
Every request must end with finish_reason "length", `gen` tokens and its expected prompt token count,
else the process exits non-zero naming the request.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True)
class Request:
    task: str
    prompt: str
    prompt_tokens: int


def check_final(task: str, final: dict[str, Any], token_ids: list[int], gen: int, prompt_tokens: int) -> None:
    """Raise unless the stream ended as a benchmark run must: `gen` tokens, finish_reason "length"."""
    usage = final.get("usage", {})
    if final.get("finish_reason") != "length" or len(token_ids) != gen or usage.get("prompt_tokens") != prompt_tokens:
        raise RuntimeError(f"task {task}: finish {final.get('finish_reason')!r}, {len(token_ids)} tokens, "
                           f"usage {usage}; expected length, {gen} tokens, {prompt_tokens} prompt tokens")


def post_bytes(host: str, path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status code and (lower-cased) headers of an HTTP/1.1 response."""
    status = int((await reader.readline()).split(b" ", 2)[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The pieces of a `Transfer-Encoding: chunked` body, as they arrive."""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()  # the CRLF after the last chunk (no trailers)
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def stream_one(conn: Connection, host: str, req: Request, gen: int) -> tuple[float, list[int]]:
    """One streamed request over an open connection; returns (time of its first token, its token ids)."""
    reader, writer = conn
    body = {"task": req.task, "prompt": req.prompt, "max_new_tokens": gen, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    writer.write(post_bytes(host, "/generate", body))
    status, headers = await read_head(reader)
    if status != 200:
        text = await reader.read(int(headers.get("content-length", "300")))
        raise RuntimeError(f"task {req.task}: HTTP {status}: {text[:300]!r}")
    if headers.get("transfer-encoding") != "chunked":
        raise RuntimeError(f"task {req.task}: expected a chunked event stream, got headers {headers}")
    first_s: float | None = None
    token_ids: list[int] = []
    final: dict[str, Any] = {}
    pending = b""
    async for piece in chunks(reader):
        *events, pending = (pending + piece).split(b"\n\n")
        for raw in events:
            if not raw.startswith(b"data: "):
                continue
            event = json.loads(raw[6:])
            if "error" in event:
                raise RuntimeError(f"task {req.task}: {event['error']}")
            if event["token_ids"] and first_s is None:
                first_s = time.perf_counter()
            token_ids += event["token_ids"]
            final = event
    check_final(req.task, final, token_ids, gen, req.prompt_tokens)
    assert first_s is not None
    return first_s, token_ids


async def run_load(url: str, requests: list[Request], gen: int) -> dict[str, Any]:
    """All requests at once, each over its own connection opened beforehand."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    conns = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in requests))
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        pairs = zip(conns, requests, strict=True)
        outs = await asyncio.gather(*(stream_one(conn, parts.netloc, req, gen) for conn, req in pairs))
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        for _, writer in conns:
            writer.close()
    return {"total_s": total, "prefill_s": max(first for first, _ in outs) - start, "client_cpu_s": cpu,
            "ttft_s": [first - start for first, _ in outs], "tokens": [ids for _, ids in outs]}


def parse_job(text: str) -> tuple[str, list[Request], int]:
    job = json.loads(text)
    return job["url"], [Request(**r) for r in job["requests"]], int(job["gen"])


def main() -> None:
    url, requests, gen = parse_job(sys.stdin.read())
    json.dump(asyncio.run(run_load(url, requests, gen)), sys.stdout)


if __name__ == "__main__":
    main()
