"""The soak's request kinds and its HTTP client (see bench/soak.py).

Each kind is a builder `(rng, task, text) -> Call`: the bytes to send, the outcomes that count as right
and, for abandoned requests, when to hang up. `send()` speaks HTTP/1.1 over plain asyncio streams, one
connection per request (`Connection: close`), so malformed bodies, false Content-Lengths and hang-ups
go out exactly as written; it returns an outcome: the status code ("200", "404", ...),
"stream_error_<status>" for an error event inside a 200 stream, "abandoned" when the client hung up on
purpose, or one of HANG_OUTCOMES when the server never gave a complete answer.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from bench.http_load import chunks, read_head
from prad.sampling import MAX_SEED
from prefill_service.api_models import MAX_TOP_K
from prefill_service.app import MAX_REQUEST_BYTES

INPUTS = {"sst2": ("a gorgeous, witty and moving film.", "the plot is thin and the acting is wooden."),
          "e2e": ("name[The Punter], eatType[pub], food[Italian], area[riverside]",
                  "name[Blue Spice], food[Chinese], priceRange[cheap], area[city centre]"),
          "multi30k": ("Ein Mann fährt mit dem Fahrrad.", "Zwei Hunde spielen im Schnee.")}
GENERIC_INPUTS = ("My favourite food is", "The capital of France is", "Write one sentence about the sea.")
HANG_OUTCOMES = ("timeout", "connection_error", "truncated", "bad_response")


@dataclass(frozen=True)
class Call:
    """One HTTP request to send, and the outcomes that count as right for it (429 always does)."""

    path: str  # /generate, /v1/completions or /v1/chat/completions
    body: bytes  # sent as is: malformed on purpose for some kinds
    expect: frozenset[str]  # e.g. {"200"}; "abandoned" where the client hangs up on purpose
    abandon_after_events: int | None = None  # streams: hang up after this many data events
    abandon_after_s: float | None = None  # hang up if no response head came in this long
    declared_bytes: int | None = None  # Content-Length to claim instead of len(body)
    is_chunked: bool = False  # send the body with Transfer-Encoding: chunked, no Content-Length


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


OK, ABANDONED = frozenset({"200"}), frozenset({"abandoned", "200"})
OVERSIZED = frozenset({"413", "reset"})  # "reset": the server closed on a body it would not read
EXTREME = ({"temperature": 1.0, "top_p": 1e-9}, {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 1e-30},
           {"temperature": 1e-30, "top_p": 1e-9}, {"temperature": 10.0}, {"temperature": 10.0, "top_k": 1},
           {"temperature": 1.0, "top_k": MAX_TOP_K}, {"temperature": 0.5, "seed": MAX_SEED},
           {"max_new_tokens": 1, "temperature": 1e-7}, {"stop": ["e", "a", " ", ".", ",", "o", "i", "\n"]})
INVALID_GENERATE = ({"top_p": 0.0}, {"temperature": -1.0}, {"temperature": 11.0}, {"max_new_tokens": 0},
                    {"max_new_tokens": 5000}, {"top_k": -1}, {"top_k": 10**12}, {"seed": -1}, {"stop": [""]},
                    {"stop": ["x"] * 9}, {"prompt": "and a prompt"}, {"input": None}, {"max_new_tokens": "many"},
                    {"colour": "blue"}, {"task": ""}, {"task": "t" * 65})
INVALID_OPENAI = ({"temperature": 3.0}, {"n": 2}, {"max_tokens": 0}, {"prompt": ["one", "two"]}, {"top_p": 0.0})
MALFORMED = (b'{"task": "base", "prompt": "cut', b"not json at all", b"", b"[1, 2, 3]",
             b'{"task": "base", "prompt": "x",}', b"\xff\xfe\x00garbage")


def good_generate(rng: random.Random, task: str, text: str, stream: bool) -> Call:
    return Call("/generate", _json({"task": task, "input": text, "max_new_tokens": rng.randint(4, 32),
                                    "stream": stream}), OK)


def sampled_generate(rng: random.Random, task: str, text: str) -> Call:
    body = {"task": task, "input": text, "max_new_tokens": rng.randint(4, 32), "stream": rng.random() < 0.5,
            "temperature": rng.choice([0.3, 0.7, 1.0]), "top_p": rng.choice([0.8, 0.95, 1.0]),
            "top_k": rng.choice([0, 20, 50]), "seed": rng.randrange(MAX_SEED),
            "stop": rng.choice([[], ["."], [".", "\n"], [" the"]])}
    return Call("/generate", _json(body), OK)


def completions(rng: random.Random, task: str, text: str) -> Call:
    body = {"model": task, "prompt": text, "max_tokens": rng.randint(4, 32), "stream": rng.random() < 0.5,
            "temperature": rng.choice([0.0, 0.8]), "seed": rng.randrange(1 << 31), "stop": rng.choice([None, "\n"])}
    return Call("/v1/completions", _json(body), OK)


def chat(rng: random.Random, task: str, text: str) -> Call:
    body = {"model": task, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
            "max_tokens": rng.randint(4, 32), "stream": rng.random() < 0.5, "temperature": rng.choice([0.0, 0.7])}
    return Call("/v1/chat/completions", _json(body), OK)


def extreme(rng: random.Random, task: str, text: str) -> Call:
    body = {"task": task, "input": text, "max_new_tokens": rng.randint(2, 16), "stream": rng.random() < 0.5,
            **rng.choice(EXTREME)}
    return Call("/generate", _json(body), OK)


def unknown_task(rng: random.Random, task: str, text: str) -> Call:
    name = f"no-such-task-{rng.randrange(1000)}"
    path = rng.choice(["/generate", "/v1/completions", "/v1/chat/completions"])
    body = {"/generate": {"task": name, "input": text}, "/v1/completions": {"model": name, "prompt": text},
            "/v1/chat/completions": {"model": name, "messages": [{"role": "user", "content": text}]}}[path]
    return Call(path, _json(body), frozenset({"404"}))


def invalid(rng: random.Random, task: str, text: str) -> Call:
    if rng.random() < 0.6:
        return Call("/generate", _json({"task": task, "input": text, **rng.choice(INVALID_GENERATE)}),
                    frozenset({"422"}))
    if rng.random() < 0.5:
        return Call("/v1/completions", _json({"model": task, "prompt": text, **rng.choice(INVALID_OPENAI)}),
                    frozenset({"400"}))
    messages = rng.choice([[], [{"role": "robot", "content": text}]])
    return Call("/v1/chat/completions", _json({"model": task, "messages": messages}), frozenset({"400"}))


def too_long(rng: random.Random, task: str, text: str) -> Call:
    prompt = " ".join(rng.choice(["hello", "world", "soak", "test"]) for _ in range(6000))  # > 2048 tokens
    if rng.random() < 0.5:
        return Call("/generate", _json({"task": task, "prompt": prompt}), frozenset({"413"}))
    return Call("/v1/completions", _json({"model": task, "prompt": prompt}), frozenset({"413"}))


def malformed(rng: random.Random, task: str, text: str) -> Call:
    path = rng.choice(["/generate", "/v1/completions"])
    return Call(path, rng.choice(MALFORMED), frozenset({"422" if path == "/generate" else "400"}))


def oversized(rng: random.Random, task: str, text: str) -> Call:
    """Claims a body over the limit and sends only its first 16 KiB: the 413 must come from the header."""
    body = _json({"task": task, "prompt": "x" * (16 << 10)})[: 16 << 10]
    path = rng.choice(["/generate", "/v1/completions"])
    return Call(path, body, OVERSIZED, declared_bytes=MAX_REQUEST_BYTES + rng.randint(1, 1 << 20))


def oversized_chunked(rng: random.Random, task: str, text: str) -> Call:
    """A body over the limit sent chunked, so no Content-Length announces it: still 413."""
    body = _json({"task": task, "prompt": "x" * (MAX_REQUEST_BYTES + rng.randint(1, 1 << 20))})
    return Call(rng.choice(["/generate", "/v1/completions"]), body, OVERSIZED, is_chunked=True)


def abandon_stream(rng: random.Random, task: str, text: str) -> Call:
    if rng.random() < 0.5:
        body = _json({"task": task, "input": text, "max_new_tokens": 64, "stream": True, "ignore_eos": True})
        return Call("/generate", body, ABANDONED, abandon_after_events=rng.randint(1, 3))
    body = _json({"model": task, "prompt": text, "max_tokens": 64, "stream": True})
    return Call("/v1/completions", body, ABANDONED, abandon_after_events=rng.randint(1, 3))


def abandon_wait(rng: random.Random, task: str, text: str) -> Call:
    body = _json({"task": task, "input": text, "max_new_tokens": 64, "ignore_eos": True})
    return Call("/generate", body, ABANDONED, abandon_after_s=rng.uniform(0.05, 1.0))


Builder = Callable[[random.Random, str, str], Call]
KINDS: dict[str, tuple[int, Builder]] = {  # name: (weight, builder)
    "generate": (14, lambda rng, task, text: good_generate(rng, task, text, stream=False)),
    "generate_stream": (14, lambda rng, task, text: good_generate(rng, task, text, stream=True)),
    "generate_sampled": (10, sampled_generate), "completions": (10, completions), "chat": (10, chat),
    "extreme_sampling": (6, extreme), "unknown_task": (5, unknown_task), "invalid_params": (6, invalid),
    "prompt_too_long": (3, too_long), "malformed_json": (4, malformed), "oversized_body": (3, oversized),
    "oversized_chunked": (1, oversized_chunked),
    "abandon_stream": (8, abandon_stream), "abandon_wait": (7, abandon_wait)}


def pick(rng: random.Random, tasks: list[str]) -> tuple[str, Call]:
    kind = rng.choices(list(KINDS), weights=[w for w, _ in KINDS.values()])[0]
    task = rng.choice(tasks)
    return kind, KINDS[kind][1](rng, task, rng.choice(INPUTS.get(task, GENERIC_INPUTS)))


async def send(host: str, port: int, call: Call, timeout_s: float) -> tuple[str, str]:
    """Send one call on its own connection; (outcome, detail)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10.0)
    except (OSError, TimeoutError) as e:
        return "connection_error", repr(e)
    try:
        return await asyncio.wait_for(_exchange(reader, writer, f"{host}:{port}", call), timeout_s)
    except TimeoutError:
        return "timeout", f"no complete answer in {timeout_s:.0f} s"
    except (ConnectionResetError, BrokenPipeError) as e:
        return "reset" if "reset" in call.expect else "connection_error", repr(e)
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        return "connection_error", repr(e)
    finally:
        writer.close()


async def _write(writer: asyncio.StreamWriter, netloc: str, call: Call) -> None:
    num_bytes = call.declared_bytes or len(call.body)
    length = "Transfer-Encoding: chunked" if call.is_chunked else f"Content-Length: {num_bytes}"
    writer.write(f"POST {call.path} HTTP/1.1\r\nHost: {netloc}\r\nContent-Type: application/json\r\n"
                 f"{length}\r\nConnection: close\r\n\r\n".encode())
    if not call.is_chunked:
        writer.write(call.body)
        return
    for start in range(0, len(call.body), 1 << 16):
        piece = call.body[start:start + (1 << 16)]
        writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
        await writer.drain()
    writer.write(b"0\r\n\r\n")


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, netloc: str,
                    call: Call) -> tuple[str, str]:
    await _write(writer, netloc, call)
    try:
        status, headers = await asyncio.wait_for(read_head(reader), call.abandon_after_s)
    except TimeoutError:
        if call.abandon_after_s is None:
            raise
        return "abandoned", ""
    if headers.get("transfer-encoding") == "chunked":
        if status == 200:
            return await _read_stream(reader, call)
        return str(status), b"".join([piece async for piece in chunks(reader)])[:300].decode(errors="replace")
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    if status == 200:
        try:
            json.loads(body)
        except ValueError:
            return "bad_response", body[:300].decode(errors="replace")
    return str(status), body[:300].decode(errors="replace")


async def _read_stream(reader: asyncio.StreamReader, call: Call) -> tuple[str, str]:
    """An SSE stream of /generate (final event has finish_reason) or /v1 (ends with [DONE])."""
    num_events, pending = 0, b""
    async for piece in chunks(reader):
        *events, pending = (pending + piece).split(b"\n\n")
        for raw in events:
            data = raw.removeprefix(b"data: ")
            if data == b"[DONE]":
                return "200", ""
            event = json.loads(data)
            if "error" in event:
                error = event["error"]
                return f"stream_error_{error.get('status') or error.get('code')}", str(error.get("message"))[:300]
            if "finish_reason" in event:
                return "200", ""
            num_events += 1
            if call.abandon_after_events is not None and num_events >= call.abandon_after_events:
                return "abandoned", ""
    return "truncated", f"stream ended after {num_events} events without its end"


def is_unexplained(outcome: str) -> bool:
    code = outcome.removeprefix("stream_error_")
    return outcome in HANG_OUTCOMES or (code.isdigit() and int(code) >= 500 and int(code) != 503)

