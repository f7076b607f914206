"""HTTP load generator for the benchmarks: R `POST /generate` requests sent at once, streamed or not.

It runs as its own process (`python -m bench.http_load`, one JSON job on stdin, one JSON result on
stdout), as real clients do: in the server's process the client's Python would hold the GIL the
server and its engines need, and its cost would be charged to the server.

The client is plain asyncio streams speaking HTTP/1.1 (one connection per request, opened before the
clock starts; the chunked SSE body parsed by hand), because on a 2-core machine every CPU second the
client spends is taken from the server it measures. With httpx (one AsyncClient per request) the
client used ~1.2 s of CPU per 64 x 64-token run, with a shared 64-connection httpx pool more (its
pool rescans every connection on each request event).

Job: {"url": "http://host:port", "requests": [{"task", "prompt", "prompt_tokens"}], "gen", "stream"}
("stream" defaults to true; false sends plain requests, each answered by one JSON body).
Result: {"total_s", "prefill_s", "ttft_s", "latency_s", "client_cpu_s", "tokens": [[ids] per request]}:
total from just before the requests are sent until the last response ends; prefill until the last
request's first token and ttft_s each request's time to its first token (both null without
streaming: no token arrives before the whole answer); latency_s each request's time to its last
byte; client_cpu_s the load generator's own CPU time in that window.
Every request must end with finish_reason "length", `gen` tokens and its expected prompt token count,
else the process exits non-zero naming the request.

For open-loop load (bench/serve_load.py) the module also offers `run_arrivals`: each request sent at
its own arrival time over a connection opened then, with the arrival time of every streamed token
chunk recorded (`timed_events`, `stream_timed`).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
    accept = "text/event-stream" if body.get("stream") else "application/json"
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Accept: {accept}\r\nContent-Length: {len(data)}\r\n\r\n")
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
    first_s: float | None = None
    token_ids: list[int] = []
    final: dict[str, Any] = {}
    async for arrived_s, event in timed_events(conn, host, req, gen):
        if event["token_ids"] and first_s is None:
            first_s = arrived_s
        token_ids += event["token_ids"]
        final = event
    check_final(req.task, final, token_ids, gen, req.prompt_tokens)
    assert first_s is not None
    return first_s, token_ids


async def whole_one(conn: Connection, host: str, req: Request, gen: int) -> tuple[None, list[int]]:
    """One non-streamed request over an open connection; returns (None: no first-token time, its token ids)."""
    reader, writer = conn
    body = {"task": req.task, "prompt": req.prompt, "max_new_tokens": gen, "temperature": 0.0,
            "ignore_eos": True, "stream": False}
    writer.write(post_bytes(host, "/generate", body))
    status, headers = await read_head(reader)
    if "content-length" in headers:
        text = await reader.readexactly(int(headers["content-length"]))
    else:
        text = b"".join([piece async for piece in chunks(reader)])
    if status != 200:
        raise RuntimeError(f"task {req.task}: HTTP {status}: {text[:300]!r}")
    answer = json.loads(text)
    check_final(req.task, answer, answer["token_ids"], gen, req.prompt_tokens)
    return None, answer["token_ids"]


async def run_load(url: str, requests: list[Request], gen: int, stream: bool = True) -> dict[str, Any]:
    """All requests at once, each over its own connection opened beforehand."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    conns = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in requests))
    one: Callable[[Connection, str, Request, int], Awaitable[tuple[float | None, list[int]]]] = \
        stream_one if stream else whole_one
    start, cpu_start = time.perf_counter(), time.process_time()

    async def timed(conn: Connection, req: Request) -> tuple[float | None, float, list[int]]:
        first_s, token_ids = await one(conn, parts.netloc, req, gen)
        return first_s, time.perf_counter(), token_ids

    try:
        outs = await asyncio.gather(*(timed(conn, req) for conn, req in zip(conns, requests, strict=True)))
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        for _, writer in conns:
            writer.close()
    firsts = [first - start for first, _, _ in outs if first is not None] if stream else None
    return {"total_s": total, "prefill_s": max(firsts) if firsts else None, "ttft_s": firsts,
            "latency_s": [done - start for _, done, _ in outs], "client_cpu_s": cpu,
            "tokens": [ids for _, _, ids in outs]}


async def timed_events(conn: Connection, host: str, req: Request,
                       gen: int) -> AsyncIterator[tuple[float, dict[str, Any]]]:
    """Send one streamed request over an open connection; yield each SSE event with the perf_counter()
    time the piece of body carrying it was read (events read together share it). Raises on an HTTP error
    or an error event, naming the task."""
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
    pending = b""
    async for piece in chunks(reader):
        arrived_s = time.perf_counter()
        *events, pending = (pending + piece).split(b"\n\n")
        for raw in events:
            if not raw.startswith(b"data: "):
                continue
            event = json.loads(raw[6:])
            if "error" in event:
                raise RuntimeError(f"task {req.task}: {event['error']}")
            yield arrived_s, event


async def stream_timed(url: str, req: Request, gen: int, start_s: float) -> dict[str, Any]:
    """One streamed request over a connection opened now. Returns, in seconds after `start_s`:
    "sent_s" (just before connecting), "chunk_s" (arrival of each event carrying tokens) with
    "chunk_tokens" (tokens in each), and "tokens" (the ids)."""
    parts = urlsplit(url)
    sent_s = time.perf_counter()
    conn = await asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 80)
    chunk_s: list[float] = []
    chunk_tokens: list[int] = []
    token_ids: list[int] = []
    final: dict[str, Any] = {}
    try:
        async for arrived_s, event in timed_events(conn, parts.netloc, req, gen):
            if event["token_ids"]:
                chunk_s.append(arrived_s - start_s)
                chunk_tokens.append(len(event["token_ids"]))
            token_ids += event["token_ids"]
            final = event
    finally:
        conn[1].close()
    check_final(req.task, final, token_ids, gen, req.prompt_tokens)
    return {"sent_s": sent_s - start_s, "chunk_s": chunk_s, "chunk_tokens": chunk_tokens, "tokens": token_ids}


async def run_arrivals(url: str, requests: list[Request], gen: int, arrivals_s: list[float],
                       on_done: Callable[[], None] | None = None) -> dict[str, Any]:
    """Open-loop load: request i is sent `arrivals_s[i]` seconds after the start, whatever the server's
    pace (a late server does not slow the arrivals). Returns "duration_s" (start to the last stream's
    end), "client_cpu_s" and per request `stream_timed`'s record plus "scheduled_s"; `on_done` is
    called as each request finishes (progress)."""
    start_s, cpu_start_s = time.perf_counter(), time.process_time()

    async def one(req: Request, at_s: float) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, start_s + at_s - time.perf_counter()))
        out = await stream_timed(url, req, gen, start_s)
        if on_done is not None:
            on_done()
        return out | {"scheduled_s": at_s}

    outs = await asyncio.gather(*(one(req, at) for req, at in zip(requests, arrivals_s, strict=True)))
    return {"duration_s": time.perf_counter() - start_s, "client_cpu_s": time.process_time() - cpu_start_s,
            "requests": outs}


def parse_job(text: str) -> tuple[str, list[Request], int, bool]:
    job = json.loads(text)
    return job["url"], [Request(**r) for r in job["requests"]], int(job["gen"]), bool(job.get("stream", True))


def main() -> None:
    url, requests, gen, stream = parse_job(sys.stdin.read())
    json.dump(asyncio.run(run_load(url, requests, gen, stream)), sys.stdout)


if __name__ == "__main__":
    main()
