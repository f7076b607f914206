"""Soak: keep a server saturated for N minutes with good, bad and abandoned requests; watch its memory.

What runs: `--concurrency` (32) closed-loop clients, or with `--rate R` Poisson arrivals at R requests/s
with at most `--max-inflight` (128) in flight, against `--url` or against a `prad serve` this script
starts on loopback (ServeProcess, CPU, fp32, the example adapters in examples/adapters; its log is kept
next to the results). Each request is one kind, drawn by weight (`KINDS`, bench/soak_requests.py),
over the tasks GET /tasks lists: good ones (/generate plain and streamed, seeded top-p/top-k sampling with stop strings,
/v1/completions, /v1/chat/completions; must answer 200), extreme but valid sampling (top_p 1e-9,
temperature 1e-30, top_k 2^20, ...; 200), bad ones (unknown task 404, invalid parameters 422 or 400 on
/v1, a prompt over the context 413, malformed JSON, a body over the 1 MiB limit 413, announced or sent
chunked) and abandoned ones (streams closed after a few tokens, non-streaming clients that hang up
before the answer).

429 is always accepted (back-pressure) and counted. Unexplained: any 5xx but the documented 503, in a
status line or in a stream's error event, and any connection error, truncated stream or request with
no complete answer within `--request-timeout-s` (a hang). The process exits 1 when there was any.

The server's RSS (VmRSS of /proc/<pid>/status; `--pid` with `--url`, else the started server's) is
sampled every `--sample-s`; growth = median of the last 10 % of the run over the median of the 10 %
after the warm-up (the first 20 %), in %. The request kinds and the raw asyncio HTTP client are in
bench/soak_requests.py.

`python -m bench.soak --minutes 3` writes soak_<time>.json and .png to `--out` (default bench/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from bench.common import DEFAULT_OUT, machine_info, median, pyplot, save_results, settings_of
from bench.soak_requests import HANG_OUTCOMES, is_unexplained, pick, send
from launcher.local import ServeProcess

EXAMPLE_ADAPTERS = Path(__file__).resolve().parent.parent / "examples" / "adapters"
WARMUP_FRACTION, WINDOW_FRACTION = 0.2, 0.1
IDLE_GAUGES = ("prad:num_requests_running", "prad:num_requests_waiting", "prad:kv_cache_usage_perc")
SUMMARY_KEYS = ("num_requests", "rate_429", "outcomes", "errors", "unexplained")  # printed at the end
FAILURE_COUNTERS = ("prad:engine_step_failures_total", "prad:request_row_failures_total")


@dataclass(frozen=True)
class Record:
    kind: str
    sent_s: float  # since the run started
    latency_s: float  # until the answer was complete, or the client hung up
    outcome: str  # "200", "404", "stream_error_500", "abandoned", "timeout", ...
    detail: str  # the start of the answer or the exception, for the report
    is_error: bool  # an outcome the kind does not expect (429 excepted)
    is_unexplained: bool  # 5xx but 503, a connection error, a truncated stream or a hang


class Soak:
    """The load, the RSS samples and the records of one run."""

    def __init__(self, url: str, pid: int | None, tasks: list[str], args: argparse.Namespace,
                 server_gone: Callable[[], str | None]) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.pid, self.tasks, self.args, self.server_gone = pid, tasks, args, server_gone
        self.rng = random.Random(args.seed)
        self.records: list[Record] = []
        self.rss_samples: list[tuple[float, float]] = []  # (s since start, MB)
        self.num_inflight = self.num_dropped = 0
        self.server_exit: str | None = None
        self.start_s = self.end_s = 0.0

    def is_running(self) -> bool:
        return time.monotonic() < self.end_s and self.server_exit is None

    async def run(self) -> None:
        self.start_s = time.monotonic()
        self.end_s = self.start_s + self.args.minutes * 60
        monitor = asyncio.create_task(self.monitor())
        await (self.open_loop() if self.args.rate else self.closed_loop())
        self.sample_rss()
        monitor.cancel()

    async def one_request(self) -> None:
        kind, call = pick(self.rng, self.tasks)
        self.num_inflight += 1
        sent_s = time.monotonic()
        try:
            outcome, detail = await send(self.host, self.port, call, self.args.request_timeout_s)
        finally:
            self.num_inflight -= 1
        is_error = outcome not in call.expect and outcome != "429"
        self.records.append(Record(kind, sent_s - self.start_s, time.monotonic() - sent_s, outcome, detail,
                                   is_error, is_unexplained(outcome)))

    async def closed_loop(self) -> None:
        async def client() -> None:
            while self.is_running():
                await self.one_request()

        await asyncio.gather(*(client() for _ in range(self.args.concurrency)))

    async def open_loop(self) -> None:
        running: set[asyncio.Task[None]] = set()
        while self.is_running():
            await asyncio.sleep(self.rng.expovariate(self.args.rate))
            if len(running) >= self.args.max_inflight:
                self.num_dropped += 1  # the server is behind: the bound holds, this arrival is not sent
                continue
            task = asyncio.create_task(self.one_request())
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running)

    async def monitor(self) -> None:
        last_print_s = 0.0
        while True:
            self.sample_rss()
            self.server_exit = self.server_exit or self.server_gone()
            if time.monotonic() - last_print_s >= self.args.progress_s:
                last_print_s = time.monotonic()
                self.print_progress()
            await asyncio.sleep(self.args.sample_s)

    def sample_rss(self) -> None:
        rss_mb = read_rss_mb(self.pid) if self.pid is not None else None
        if rss_mb is not None:
            self.rss_samples.append((time.monotonic() - self.start_s, rss_mb))

    def print_progress(self) -> None:
        outcomes = Counter(r.outcome for r in self.records)
        rss = f"{self.rss_samples[-1][1]:.0f} MB" if self.rss_samples else "n/a"
        print(f"[soak] {time.monotonic() - self.start_s:5.0f}/{self.args.minutes * 60:.0f} s  "
              f"requests {len(self.records)}  in flight {self.num_inflight}  429 {outcomes['429']}  "
              f"errors {sum(r.is_error for r in self.records)}  "
              f"unexplained {sum(r.is_unexplained for r in self.records)}  rss {rss}", file=sys.stderr, flush=True)


def read_rss_mb(pid: int) -> float | None:
    """VmRSS of process `pid` in MB, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((x for x in text.splitlines() if x.startswith("VmRSS:")), None)
    return int(line.split()[1]) / 1024 if line else None


def rss_summary(samples: list[tuple[float, float]], duration_s: float, sample_s: float) -> dict[str, Any]:
    warmup_s = WARMUP_FRACTION * duration_s
    window_s = max(WINDOW_FRACTION * duration_s, 2 * sample_s)
    first = [mb for t, mb in samples if warmup_s <= t < warmup_s + window_s]
    last = [mb for t, mb in samples if duration_s - window_s <= t]
    first_mb, last_mb = (median(first) if first else None), (median(last) if last else None)
    growth = 100 * (last_mb / first_mb - 1) if first_mb and last_mb else None
    return {"warmup_s": warmup_s, "window_s": window_s, "first_window_median_mb": first_mb,
            "last_window_median_mb": last_mb, "growth_pct": growth,
            "max_mb": max((mb for _, mb in samples), default=None), "samples": [[round(t, 2), mb] for t, mb in samples]}


def latency_summary(records: list[Record]) -> dict[str, dict[str, float]]:
    """p50/p99 per kind over the requests that were answered (not abandoned, not failed in transport)."""
    answered: dict[str, list[float]] = {}
    for r in records:
        if r.outcome not in ("abandoned", *HANG_OUTCOMES):
            answered.setdefault(r.kind, []).append(r.latency_s)
    return {kind: {"count": len(v), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}
            for kind, v in sorted(answered.items())}


def by_kind(records: list[Record]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter[str]] = {}
    for r in records:
        out.setdefault(r.kind, Counter())[r.outcome] += 1
    return {kind: dict(sorted(c.items())) for kind, c in sorted(out.items())}


def summarize(soak: Soak) -> dict[str, Any]:
    records, duration_s = soak.records, soak.args.minutes * 60
    unexplained = [r for r in records if r.is_unexplained]
    examples = {(r.kind, r.outcome, r.detail[:80]): r for r in unexplained}  # one per distinct failure
    return {"duration_s": duration_s, "num_requests": len(records), "requests_per_s": len(records) / duration_s,
            "num_dropped_arrivals": soak.num_dropped, "server_exit": soak.server_exit,
            "rate_429": sum(r.outcome == "429" for r in records) / max(len(records), 1),
            "rss": rss_summary(soak.rss_samples, duration_s, soak.args.sample_s),
            "latency_s": latency_summary(records),
            "counts": by_kind(records), "outcomes": dict(Counter(r.outcome for r in records).most_common()),
            "errors": by_kind([r for r in records if r.is_error]),
            "unexplained": {"total": len(unexplained) + (soak.server_exit is not None),
                            "by_kind": by_kind(unexplained),
                            "examples": [{"kind": r.kind, "outcome": r.outcome, "sent_s": round(r.sent_s, 1),
                                          "detail": r.detail} for r in list(examples.values())[:25]]}}


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    rss = result["rss"]
    if rss["samples"]:
        times, mbs = zip(*rss["samples"], strict=True)
        left.plot(times, mbs, marker=".", label="server RSS")
        left.axvline(rss["warmup_s"], color="grey", linestyle=":", label="end of warm-up")
    growth = rss["growth_pct"]
    left.set(xlabel="s since start", ylabel="RSS, MB",
             title=f"server RSS (growth after warm-up {growth:+.1f} %)" if growth is not None else "server RSS")
    kinds = list(result["latency_s"])
    x = np.arange(len(kinds))
    for offset, q in ((-0.2, "p50"), (0.2, "p99")):
        right.bar(x + offset, [result["latency_s"][k][q] for k in kinds], width=0.4, label=q)
    right.set_xticks(x, kinds, rotation=45, ha="right", fontsize=8)
    right.set(yscale="log", ylabel="latency, s", title=f"latency per kind (429 rate {result['rate_429']:.1%})")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fetch_tasks(url: str) -> list[str]:
    rows = httpx.get(url + "/tasks", timeout=30).raise_for_status().json()["tasks"]
    return [row["task"] for row in rows if row.get("adapter_version") is not None]


def healthz(url: str) -> dict[str, Any]:
    try:
        response = httpx.get(url + "/healthz", timeout=10)
        return {"status_code": response.status_code, "body": response.text[:500]}
    except httpx.HTTPError as e:
        return {"status_code": None, "body": repr(e)}


def metric_sums(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each named metric of a Prometheus text page, summed over its labels."""
    sums = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


def wait_idle(url: str, timeout_s: float = 15.0) -> dict[str, Any]:
    """Once the load is over the server must fall idle: nothing running or waiting, no KV reserved (so
    abandoned requests were freed); with the engines' failure counters, from /metrics."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        try:
            text = httpx.get(url + "/metrics", timeout=10).text
        except httpx.HTTPError as e:
            return {"is_idle": None, "error": repr(e)}
        gauges = metric_sums(text, IDLE_GAUGES)
        if not any(gauges.values()) or time.monotonic() > deadline_s:
            return {"is_idle": not any(gauges.values()), **gauges, **metric_sums(text, FAILURE_COUNTERS)}
        time.sleep(0.5)


def attach_server(args: argparse.Namespace, stack: ExitStack, log_name: str) -> dict[str, Any]:
    """{url, pid, log, gone}: the --url server, or a `prad serve` started here (stopped by `stack`)."""
    if args.url:
        if args.pid is None:
            print("no --pid: the server's RSS is not sampled", file=sys.stderr)
        alive = (lambda: None) if args.pid is None else (lambda: None if read_rss_mb(args.pid) else "process gone")
        return {"url": args.url.rstrip("/"), "pid": args.pid, "log": None, "gone": alive}
    args.out.mkdir(parents=True, exist_ok=True)
    server = ServeProcess(["--adapters", str(args.adapters)], args.out, log_name, threads=args.server_threads)
    print(f"starting prad serve ({args.server_threads} threads, log {server.log_path}) ...", file=sys.stderr)
    server.start()
    stack.callback(server.stop)
    assert server.process is not None
    process = server.process
    return {"url": server.url, "pid": process.pid, "log": str(server.log_path),
            "gone": lambda: None if process.poll() is None else f"server exited with {process.returncode}"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="length of the load (default 3)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=32, help="closed-loop clients (default 32)")
    load.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    parser.add_argument("--max-inflight", type=int, default=128, help="with --rate: most requests in flight")
    parser.add_argument("--url", default=None, help="a running server (default: start prad serve here)")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for RSS")
    parser.add_argument("--adapters", type=Path, default=EXAMPLE_ADAPTERS, help="adapters of the started server")
    parser.add_argument("--server-threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--request-timeout-s", type=float, default=120.0, help="no complete answer by then: a hang")
    parser.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling period")
    parser.add_argument("--progress-s", type=float, default=10.0, help="progress line period")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or args.max_inflight < 1 or (args.rate is not None and args.rate <= 0):
        parser.error("--minutes and --rate must be > 0, --concurrency and --max-inflight >= 1")
    if args.pid is not None and args.url is None:
        parser.error("--pid goes with --url (a started server's pid is known)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 1 when there were unexplained errors, else 0."""
    args = parse_args(argv)
    name = f"soak_{datetime.now(UTC):%Y%m%dT%H%M%S}"
    machine = machine_info(["float32"] if args.url is None else [])
    with ExitStack() as stack:
        server = attach_server(args, stack, f"{name}_server")
        tasks = fetch_tasks(server["url"])
        print(f"soak of {server['url']} (pid {server['pid']}) for {args.minutes} min over tasks {tasks}",
              file=sys.stderr)
        soak = Soak(server["url"], server["pid"], tasks, args, server["gone"])
        asyncio.run(soak.run())
        after_load, health = wait_idle(server["url"]), healthz(server["url"])
    result = summarize(soak)
    payload = {"benchmark": "soak", "settings": settings_of(args), "machine": machine,
               "server": {"url": server["url"], "pid": server["pid"], "log": server["log"], "tasks": tasks,
                          "after_load": after_load, "healthz_end": health}, **result}
    save_results(args.out, name, payload, lambda path: plot(result, path))
    print(json.dumps({k: result[k] for k in SUMMARY_KEYS}, indent=1))
    growth = result["rss"]["growth_pct"]
    print(f"RSS growth after warm-up: {'n/a' if growth is None else f'{growth:+.2f} %'}; after the load: {after_load}")
    return 1 if result["unexplained"]["total"] else 0


if __name__ == "__main__":
    sys.exit(main())
