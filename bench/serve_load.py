"""Open-loop serving load in the style of vLLM's serving benchmark: Poisson arrivals at a sweep of
request rates over many tasks, latency percentiles and goodput per rate.

Workload: `--tasks` N (16) random PrAd task adapters (`--variant`, default prad-pa; non-identity,
up/B std `--adapter-scale`), `--requests` R (48) requests per rate, each with its own random word
prompt of exactly `--prompt-len` (64) tokens (bench/multitask.py's `build_workload`; prompts differ
between rates, so the prefix cache cannot flatter later rates) and a task drawn at random; streamed
`POST /generate`, greedy, `--gen` (32) tokens with EOS ignored. The server is PrAd Serve's embedded
app (role all, transport inproc, the server's own defaults otherwise) under uvicorn in this process;
before the first rate every task serves one request, so adapter loading is not measured.

Rates: with `--capacity-fractions` (default 0.5,0.8,1.0) all R requests are first sent at once
(rate inf), which measures the capacity C = R / that run's duration (requests/s), then Poisson runs
at each fraction of C; `--rates 0.5,1,inf` gives the rates in requests/s instead. Arrival gaps are
unit-rate exponentials from `--seed` (numpy), scaled by 1 / rate, the first request at time 0: the
same seed gives the same arrival pattern at every rate and in every run. Rate inf: all at time 0.

The client is its own process (`python -m bench.serve_load --client`, one JSON job on stdin, one JSON
result on stdout; bench/http_load.py's `run_arrivals`), so its Python is not charged to the server's
GIL; it opens each request's connection at the request's arrival time (connect time is in TTFT, as
for a real client) and records when each streamed event carrying tokens arrives.

Reported per rate (seconds from the client's clock; the run's duration is from time 0 to the end of
the last stream):

* TTFT: first token's arrival - the request's send (p50, p99).
* ITL, inter-token latency, per token: the gap between two successive token-carrying events divided
  by the tokens in the later event, counted once per such token (the server streams one event per
  token, and merges tokens when its event loop falls behind; a merged event must not count as a zero
  gap). p50 and p99 over every token of every request of the rate, and their ratio p99 / p50 (issue
  #22's goal: <= 2 at 80 % of capacity).
* TPOT: (last token - first token) / (gen - 1) per request; the median over requests.
* request throughput (R / duration), output token throughput (R x gen / duration), and goodput:
  requests per second of duration that met the SLO, TTFT <= `--slo-ttft-ms` and every ITL of the
  request <= `--slo-itl-ms`.
* fraction of floor: the rate's workload FLOPs at the run's probed peak (bench/peak.py) / its
  duration; below 1 by how far the machine is from compute-bound (at low rates mostly idle time).
* the server's prefill passes and decode steps during the run (engine counters).

The JSON also keeps each request's raw record per rate ("runs": task, scheduled and actual send time,
arrival time and token count of each token-carrying event; times in s to 0.1 ms), for analyses the
table does not make (e.g. which gaps overlap a prefill pass).

Caveats: server and engines share one process (and the GIL), the client is a second process on the
same cores; with other work on the machine the latencies are noisy (machine_info records the load
average at the start and end). A run of R requests includes its ramp-up and the drain of its last
streams, so a Poisson run achieves less than its target rate (the more so the longer each request
lasts against R / rate); a larger `--requests` narrows that. The capacity comes from a burst, whose
prompts are prefilled in a few large passes and decoded as one batch: Poisson arrivals at 1 C are
at or past what the server sustains with prompts arriving one by one.

Run from the repo root: `python -m bench.serve_load` (defaults above), or a smoke run:
`python -m bench.serve_load --tasks 2 --requests 6 --prompt-len 16 --gen 4 --capacity-fractions 0.5`.
Writes serve_load.json and serve_load.png (latency vs achieved throughput) to `--out` (default
bench/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.common import (
    DEFAULT_OUT,
    REPO_ROOT,
    format_table,
    load,
    machine_info,
    pyplot,
    run_http_load,
    save_results,
    serve_app,
    settings_of,
    setup_threads,
)
from bench.http_load import Request, run_arrivals
from bench.multitask import Workload, build_workload
from bench.peak import (
    FLOP_COUNT,
    add_probe_args,
    fraction_of_floor,
    generation_flops,
    model_config,
    or_dash,
    peak_of,
    probe_for_run,
)
from launcher.roles import build_app
from launcher.settings import ServeSettings
from prad.adapters import AdapterConfig, save_adapter
from prad.adapters.io import init_tensors
from prad.loading import LoadedModel

LOAD_TIMEOUT_S = 3600.0  # one rate's client process
GOAL_FRACTION, GOAL_ITL_RATIO = 0.8, 2.0  # issue #22: ITL p99 / p50 <= 2 at 80 % of capacity


def parse_floats(text: str) -> list[float]:
    """'0.5,1,inf' -> [0.5, 1.0, inf]; every value must be > 0."""
    values = [float(x) for x in text.split(",") if x.strip()]
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"need positive numbers (or inf), got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=16, help="task adapters; each request picks one at random")
    p.add_argument("--requests", type=int, default=48, help="requests per rate")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--gen", type=int, default=32, help="tokens generated per request (EOS ignored), >= 2")
    rates = p.add_mutually_exclusive_group()
    rates.add_argument("--capacity-fractions", type=parse_floats, default=[0.5, 0.8, 1.0],
                       help="measure capacity (rate inf) first, then Poisson at these fractions of it "
                            "(default 0.5,0.8,1.0)")
    rates.add_argument("--rates", type=parse_floats, default=None, help="request rates in requests/s, inf = at once")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput SLO on TTFT (default 1000)")
    p.add_argument("--slo-itl-ms", type=float, default=200.0, help="goodput SLO on every ITL (default 200)")
    p.add_argument("--variant", choices=("prad-pa", "prad-sa", "prad-lora"), default="prad-pa")
    p.add_argument("--rank", type=int, default=8, help="adapter rank (default 8)")
    p.add_argument("--adapter-scale", type=float, default=0.1, help="std of the adapters' up/B weights")
    p.add_argument("--max-batch-size", type=int, default=64, help="server: decode rows per step (its default 64)")
    p.add_argument("--max-prefill-tokens", type=int, default=2048,
                   help="server: prompt tokens per prefill pass (its default 2048)")
    p.add_argument("--mixed-prefill-tokens", type=int, default=0,
                   help="server: prompt tokens each decode step computes in its own pass (0 = off, its default)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default=None, help="a local HF model directory (default: the embedded SmolLM2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, task picks, arrivals, adapters")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--client", action="store_true", help="internal: run as the load client (job on stdin)")
    add_probe_args(p)
    args = p.parse_args(argv)
    if args.tasks < 1 or args.requests < 1 or args.prompt_len < 1 or args.gen < 2:
        p.error("tasks, requests and prompt-len must be >= 1, gen >= 2")
    return args


# --- workload -----------------------------------------------------------------------------------------


def write_tasks(loaded: LoadedModel, root: Path, args: argparse.Namespace) -> list[str]:
    """One random, non-identity adapter folder per task under `root`; returns the task names."""
    names = []
    for t in range(args.tasks):
        config = AdapterConfig(variant=args.variant, rank=args.rank, base_model_fingerprint=loaded.fingerprint,
                               metadata={"init": "random", "seed": args.seed + t, "scale": args.adapter_scale})
        names.append(f"task-{t:03d}")
        save_adapter(root / names[-1], config, init_tensors(config, loaded.config, args.seed + t, args.adapter_scale))
    return names


def arrivals_s(count: int, rate: float, seed: int) -> list[float]:
    """Poisson arrival times (s) of `count` requests at `rate` per second, the first at 0: seeded
    unit-rate exponential gaps scaled by 1 / rate; all at 0 for rate inf."""
    if math.isinf(rate):
        return [0.0] * count
    gaps = np.random.default_rng(seed).standard_exponential(count - 1) / rate
    return [0.0, *np.cumsum(gaps).tolist()]


def requests_of(work: Workload, tasks: list[str], picks: list[int], first: int, count: int) -> list[dict[str, Any]]:
    """Requests `first`..`first + count` of the workload, each with its picked task."""
    return [{"task": tasks[picks[i]], "prompt": work.texts[i], "prompt_tokens": len(work.prompt_ids[i])}
            for i in range(first, first + count)]


# --- the client process ----------------------------------------------------------------------------


def client_main() -> None:
    """The load client: job {"url", "gen", "label", "requests", "arrivals_s"} on stdin, `run_arrivals`'s
    result on stdout, a progress bar on stderr."""
    job = json.loads(sys.stdin.read())
    requests = [Request(**r) for r in job["requests"]]
    with tqdm(total=len(requests), desc=f"rate {job['label']}", unit="req", file=sys.stderr, leave=False) as bar:
        out = asyncio.run(run_arrivals(job["url"], requests, int(job["gen"]), job["arrivals_s"],
                                       lambda: bar.update()))
    json.dump(out, sys.stdout)


def run_client(job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.serve_load", "--client"], input=json.dumps(job),
                          stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, timeout=LOAD_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"the load client failed (exit {proc.returncode}); its error is on stderr above")
    return json.loads(proc.stdout)


# --- metrics ---------------------------------------------------------------------------------------


def itl_samples_s(chunk_s: list[float], chunk_tokens: list[int]) -> list[float]:
    """Per-token inter-token latencies of one stream: each gap between successive token-carrying
    events, divided by the later event's tokens, once per token (the first event's tokens: none)."""
    out: list[float] = []
    for before, at, num_tokens in zip(chunk_s, chunk_s[1:], chunk_tokens[1:], strict=False):
        out += [(at - before) / num_tokens] * num_tokens
    return out


@dataclass
class RateResult:
    """One rate's run, latencies in ms (percentiles: numpy's linear interpolation)."""

    label: str  # "inf", "0.8 C" (fraction of capacity) or the rate, as in the table
    rate_rps: float | None  # target arrival rate, requests/s; None = all at once
    capacity_fraction: float | None  # the fraction of capacity it targets (capacity mode)
    num_requests: int
    duration_s: float  # first arrival (0) to the end of the last stream
    request_throughput_rps: float  # requests / duration
    output_throughput_tok_s: float  # generated tokens / duration
    goodput_rps: float  # requests meeting the SLO / duration
    slo_met: float  # fraction of requests meeting both SLOs
    ttft_slo_met: float  # ... meeting the TTFT SLO
    itl_slo_met: float  # ... whose every ITL meets the ITL SLO
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    itl_max_ms: float
    itl_p99_over_p50: float
    tpot_median_ms: float
    e2e_p50_ms: float  # send to last token
    e2e_p99_ms: float
    send_lag_max_ms: float  # latest send after its scheduled arrival: the client kept up if small
    client_cpu_s: float
    num_prefill_passes: int  # server engine steps during the run
    num_decode_steps: int
    fraction_of_floor: float | None  # workload FLOPs at the probed peak / duration
    num_tokens: list[int]  # tokens received per request, request order (each must be gen)


def percentiles_ms(values: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(values) * 1e3, [50, 99])
    return float(p50), float(p99)


def summarise(out: dict[str, Any], gen: int, slo_ttft_ms: float, slo_itl_ms: float) -> dict[str, Any]:
    """The client's record of one run -> RateResult's latency, throughput and goodput fields."""
    reqs = out["requests"]
    ttft = [r["chunk_s"][0] - r["sent_s"] for r in reqs]
    e2e = [r["chunk_s"][-1] - r["sent_s"] for r in reqs]
    itls = [itl_samples_s(r["chunk_s"], r["chunk_tokens"]) for r in reqs]
    all_itl = [x for per in itls for x in per]
    ttft_ok = [t * 1e3 <= slo_ttft_ms for t in ttft]
    itl_ok = [max(per, default=0.0) * 1e3 <= slo_itl_ms for per in itls]
    num_good = sum(a and b for a, b in zip(ttft_ok, itl_ok, strict=True))
    duration = out["duration_s"]
    (ttft_p50, ttft_p99), (itl_p50, itl_p99), (e2e_p50, e2e_p99) = map(percentiles_ms, (ttft, all_itl, e2e))
    return {"num_requests": len(reqs), "duration_s": duration, "request_throughput_rps": len(reqs) / duration,
            "output_throughput_tok_s": sum(len(r["tokens"]) for r in reqs) / duration,
            "goodput_rps": num_good / duration, "slo_met": num_good / len(reqs),
            "ttft_slo_met": sum(ttft_ok) / len(reqs), "itl_slo_met": sum(itl_ok) / len(reqs),
            "ttft_p50_ms": ttft_p50, "ttft_p99_ms": ttft_p99, "itl_p50_ms": itl_p50, "itl_p99_ms": itl_p99,
            "itl_max_ms": max(all_itl) * 1e3, "itl_p99_over_p50": itl_p99 / itl_p50 if itl_p50 > 0 else math.inf,
            "tpot_median_ms": float(np.median([(e - t) / (gen - 1) for e, t in zip(e2e, ttft, strict=True)])) * 1e3,
            "e2e_p50_ms": e2e_p50, "e2e_p99_ms": e2e_p99,
            "send_lag_max_ms": max(r["sent_s"] - r["scheduled_s"] for r in reqs) * 1e3,
            "client_cpu_s": out["client_cpu_s"], "num_tokens": [len(r["tokens"]) for r in reqs]}


# --- the runs ----------------------------------------------------------------------------------------


def engine_steps(app: Any) -> tuple[int, int]:
    """(prefill passes, decode steps) the in-process server's engines have run so far."""
    engines = app.state.engines
    return engines["prefill"].stats()["num_steps"], engines["decode"].stats()["num_steps"]


def plan(args: argparse.Namespace) -> list[tuple[str, float | None]]:
    """The runs in order: (label, fraction of capacity) in capacity mode (rate inf first), else
    (label, None) per rate."""
    if args.rates is not None:
        return [("inf" if math.isinf(r) else f"{r:g}", None) for r in args.rates]
    return [("inf", None), *((f"{f:g} C", f) for f in args.capacity_fractions)]


def serve_settings(args: argparse.Namespace, adapters: Path) -> ServeSettings:
    """The server's defaults, but for the flags this benchmark exposes and bounds that fit the load."""
    return ServeSettings(adapters=adapters, dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size,
                         max_prefill_tokens=args.max_prefill_tokens, max_waiting=max(256, args.requests),
                         max_loaded_adapters=max(64, args.tasks), request_timeout_s=LOAD_TIMEOUT_S,
                         mixed_prefill_tokens=args.mixed_prefill_tokens, log_level="warning")


def measure(app: Any, job: dict[str, Any], args: argparse.Namespace, rate: float, fraction: float | None,
            floor: tuple[float, float | None]) -> tuple[RateResult, dict[str, Any]]:
    """One rate: the client's run of `job` against `app`, summarised; and its raw per-request record.
    `floor`: (the workload's FLOPs, the probed peak FLOP/s or None)."""
    before = engine_steps(app)
    out = run_client(job)
    after = engine_steps(app)
    rate_rps = None if math.isinf(rate) else rate
    result = RateResult(label=job["label"], rate_rps=rate_rps, capacity_fraction=fraction,
                        num_prefill_passes=after[0] - before[0], num_decode_steps=after[1] - before[1],
                        fraction_of_floor=fraction_of_floor(floor[0], out["duration_s"], floor[1]),
                        **summarise(out, args.gen, args.slo_ttft_ms, args.slo_itl_ms))
    raw = [{"task": q["task"], "scheduled_s": round(r["scheduled_s"], 4), "sent_s": round(r["sent_s"], 4),
            "chunk_s": [round(t, 4) for t in r["chunk_s"]], "chunk_tokens": r["chunk_tokens"]}
           for r, q in zip(out["requests"], job["requests"], strict=True)]  # times to 0.1 ms: a smaller JSON
    return result, {"label": job["label"], "requests": raw}


def run_rates(loaded: LoadedModel, args: argparse.Namespace, peak: float | None) -> tuple[list[RateResult], list[Any]]:
    """Serve the tasks, warm every task up, then run each planned rate; returns results and raw records."""
    runs = plan(args)
    work = build_workload(loaded, args.tasks + len(runs) * args.requests, args.prompt_len, args.gen, args.seed)
    picks = np.random.default_rng(args.seed).integers(0, args.tasks, len(work.texts)).tolist()
    floor = (generation_flops(loaded.config, [args.prompt_len] * args.requests, args.gen), peak)
    results: list[RateResult] = []
    raw: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="prad-serve-load-") as tmp:
        tasks = write_tasks(loaded, Path(tmp), args)
        app = build_app(serve_settings(args, Path(tmp)), loaded)
        with serve_app(app) as url:
            warm = [{"task": t, "prompt": work.texts[i], "prompt_tokens": len(work.prompt_ids[i])}
                    for i, t in enumerate(tasks)]  # the first N prompts: one per task, loads every adapter
            run_http_load({"url": url, "gen": 2, "requests": warm}, LOAD_TIMEOUT_S)
            for i, (label, fraction) in enumerate(tqdm(runs, desc="serve load rates", unit="rate")):
                rate = args.rates[i] if args.rates is not None else math.inf
                if fraction is not None:  # capacity mode: the rate inf run came first
                    rate = fraction * results[0].request_throughput_rps
                job = {"url": url, "gen": args.gen, "label": label,
                       "arrivals_s": arrivals_s(args.requests, rate, args.seed + 1),  # one pattern, every rate
                       "requests": requests_of(work, tasks, picks, args.tasks + i * args.requests, args.requests)}
                result, record = measure(app, job, args, rate, fraction, floor)
                results.append(result)
                raw.append(record)
    return results, raw


# --- output -----------------------------------------------------------------------------------------


def print_table(results: list[RateResult]) -> None:
    headers = ["rate", "target req/s", "req/s", "out tok/s", "goodput req/s", "TTFT p50 ms", "TTFT p99 ms",
               "ITL p50 ms", "ITL p99 ms", "ITL p99/p50", "TPOT med ms", "prefill passes", "frac of floor"]
    rows = [[r.label, or_dash(r.rate_rps), r.request_throughput_rps, r.output_throughput_tok_s, r.goodput_rps,
             r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p50_ms, r.itl_p99_ms, r.itl_p99_over_p50, r.tpot_median_ms,
             r.num_prefill_passes, or_dash(r.fraction_of_floor)] for r in results]
    print(format_table(headers, rows))


def goal(results: list[RateResult]) -> dict[str, Any] | None:
    """Issue #22's goal, where the run has a rate at 80 % of capacity."""
    at = [r for r in results if r.capacity_fraction is not None and math.isclose(r.capacity_fraction, GOAL_FRACTION)]
    if not at:
        return None
    ratio = at[0].itl_p99_over_p50
    return {"goal": f"ITL p99 / p50 <= {GOAL_ITL_RATIO:g} at {GOAL_FRACTION:.0%} of capacity",
            "itl_p99_over_p50": ratio, "is_met": ratio <= GOAL_ITL_RATIO}


def plot(results: list[RateResult], args: argparse.Namespace, path: Path) -> None:
    """TTFT and ITL percentiles vs achieved throughput: Poisson rates joined in order of offered rate (past
    capacity the curve bends back), a burst (rate inf) as a lone marker (it is no point on that curve)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    poisson = sorted((r for r in results if r.rate_rps is not None), key=lambda r: r.rate_rps or 0.0)
    bursts = [r for r in results if r.rate_rps is None]
    panels = (("TTFT", ("ttft_p50_ms", "ttft_p99_ms"), args.slo_ttft_ms),
              ("ITL", ("itl_p50_ms", "itl_p99_ms"), args.slo_itl_ms))
    for ax, (name, keys, slo) in zip(axes, panels, strict=True):
        for key, style, color in zip(keys, ("o-", "s--"), ("C0", "C1"), strict=True):
            label = f"{name} {key.split('_')[1]}"
            ax.plot([r.request_throughput_rps for r in poisson], [getattr(r, key) for r in poisson], style,
                    color=color, label=label)
            ax.plot([r.request_throughput_rps for r in bursts], [getattr(r, key) for r in bursts], style[0],
                    color=color, mfc="none")
        for r in results:
            ax.annotate(r.label, (r.request_throughput_rps, getattr(r, keys[1])), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.axhline(slo, color="grey", linestyle=":", label=f"SLO {slo:g} ms")
        ax.set_yscale("log")
        ax.set_xlabel("achieved request throughput (requests/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.legend(fontsize=8)
    fig.suptitle(f"serve load: {args.tasks} tasks, {args.requests} requests/rate, prompt {args.prompt_len}, "
                 f"gen {args.gen}, {args.dtype}; hollow: all at once (inf)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.client:
        client_main()
        return None
    setup_threads(args.threads)
    machine = machine_info([args.dtype])  # before the runs: its load average is the run's start
    peak = probe_for_run(args, [args.dtype], model_config(args.model), args.device)
    loaded = load(args.dtype, args.device, args.model)
    results, raw = run_rates(loaded, args, peak_of(peak, args.dtype))
    print_table(results)
    print(f"ITL: per token (event gap / tokens in the event); goodput SLO: TTFT <= {args.slo_ttft_ms:g} ms and "
          f"every ITL <= {args.slo_itl_ms:g} ms")
    if args.rates is None:
        print(f"C = capacity, the rate inf run's throughput: {results[0].request_throughput_rps:.3f} requests/s")
    target = goal(results)
    if target is not None:
        print(f"issue #22 goal, {target['goal']}: {target['itl_p99_over_p50']:.2f} "
              f"({'met' if target['is_met'] else 'not met'})")
    payload = {"benchmark": "serve_load", "settings": settings_of(args), "machine": machine, "peak": peak,
               "flop_count": FLOP_COUNT, "goal": target, "results": [asdict(r) for r in results], "runs": raw}
    save_results(args.out, "serve_load", payload, lambda path: plot(results, args, path))
    return payload


if __name__ == "__main__":
    main()
