"""Prefix cache benchmark: requests of several tasks whose prompts share a long few-shot prefix per task,
through the HTTP server with the prefix cache off and on, measured side by side in one run.

Workload (defaults, issue #25): 8 tasks, each with its own PrAd-PA adapter and a few-shot prompt
template of about 512 tokens (SST-2 dev examples with their labels, a different selection per task),
64 requests (8 per task, each a different review) sent at once, a few generated tokens each. Before
each measured run every task has served one request (so a warm cache holds each template, as in
steady state; the same warm-up runs with the cache off). Reported per arm: TTFT (median, p90, max)
and prefill throughput (prompt tokens / time to the last first token), and the ratio on/off.

Distance to the machine's limit: before the model is loaded the run probes the peak GEMM rate of its
dtype (bench/peak.py; `--no-peak-probe` skips it). Per arm, `fraction_of_floor` = the workload's
base-model FLOPs at that peak / the run's total seconds, and `prefill_fraction_of_floor` = the
prompts' prefill FLOPs at that peak / the time to the last first token (medians over repeats).
FLOPs counted (`bench.peak.generation_flops`): every prompt token in full, as if nothing were cached
(2 * tokens * every layer's projection weights, causal attention 4 * layers * heads * head_dim per
(query, key) pair, the LM head on each prompt's last token and on every decode step), then `--gen` - 1
decode steps per request; not counted: embedding, norms, RoPE, SiLU, softmax, KV writes, sampling and
the adapters. With the cache on, the cached prefix's FLOPs are not done, so that arm's fraction is an
effective one (the cache's gain over the floor of recomputing) and may pass 1; the cache-off arm's is
the plain distance to the limit.

Run from the repo root: `python -m bench.prefix_cache` (about 5 minutes on 2 cores in fp32), or a
smoke run: `python -m bench.prefix_cache --tasks 2 --requests 4 --prefix-tokens 64 --repeats 1`.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.common import (
    DEFAULT_OUT,
    format_table,
    load,
    machine_info,
    median,
    pyplot,
    run_http_load,
    save_results,
    serve_app,
    settings_of,
    setup_threads,
)
from bench.peak import (
    FLOP_COUNT,
    add_probe_args,
    fraction_of_floor,
    generation_flops,
    model_config,
    or_dash,
    peak_of,
    prefill_flops,
    probe_for_run,
)
from launcher.roles import build_app
from launcher.settings import ServeSettings
from prad.adapters import AdapterConfig, save_adapter
from prad.adapters.io import init_tensors
from prad.loading import LoadedModel

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
ARMS = ("cache-off", "cache-on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--requests", type=int, default=64, help="sent at once, spread evenly over the tasks")
    p.add_argument("--prefix-tokens", type=int, default=512, help="few-shot template length per task (about)")
    p.add_argument("--gen", type=int, default=4, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=2, help="runs per arm, arms alternating")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cache-mb", type=int, default=256, help="the cache-on arm's --prefix-cache-mb")
    p.add_argument("--data", type=Path, default=DATA, help="SST-2 folder with dev.jsonl (few-shot examples)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    add_probe_args(p)
    return p.parse_args(argv)


def load_examples(data: Path) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in (data / "dev.jsonl").read_text().splitlines() if line.strip()]
    return [{"input": r["input"], "target": r["target"]} for r in rows]


def few_shot_template(loaded: LoadedModel, examples: list[dict[str, str]], rng: random.Random,
                      prefix_tokens: int) -> str:
    """Labelled examples drawn at random until the prefix holds about `prefix_tokens` tokens."""
    head = "Classify the sentiment of each review as positive or negative.\n\n"
    while len(loaded.tokenizer(head).input_ids) < prefix_tokens:
        ex = rng.choice(examples)
        head += f"Review: {ex['input']}\nSentiment: {ex['target']}\n\n"
    return head + "Review: {input}\nSentiment:"


def write_tasks(loaded: LoadedModel, root: Path, args: argparse.Namespace, examples: list[dict[str, str]]) -> list[str]:
    rng = random.Random(args.seed)
    tasks = []
    for t in range(args.tasks):
        task = f"fewshot{t}"
        config = AdapterConfig(variant="prad-pa", rank=8, base_model_fingerprint=loaded.fingerprint,
                               prompt_template=few_shot_template(loaded, examples, rng, args.prefix_tokens))
        save_adapter(root / task, config, init_tensors(config, loaded.config, args.seed + t, 0.2))
        tasks.append(task)
    return tasks


def requests_for(loaded: LoadedModel, root: Path, tasks: list[str], count: int, examples: list[dict[str, str]],
                 offset: int) -> list[dict[str, Any]]:
    """`count` requests spread over the tasks, each prompt its task's template around a fresh review."""
    out = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        template = json.loads((root / task / "adapter_config.json").read_text())["prompt_template"]
        prompt = template.replace("{input}", examples[(offset + i) % len(examples)]["input"])
        out.append({"task": task, "prompt": prompt, "prompt_tokens": len(loaded.tokenizer(prompt).input_ids)})
    return out


def measure_arm(loaded: LoadedModel, root: Path, tasks: list[str], args: argparse.Namespace, cache_mb: int,
                examples: list[dict[str, str]], repeat: int) -> dict[str, Any]:
    settings = ServeSettings(adapters=root, dtype=args.dtype, device="cpu", max_seq_len=2048,
                             max_batch_size=args.requests, max_waiting=max(256, args.requests),
                             prefix_cache_mb=cache_mb, request_timeout_s=3600.0, log_level="warning")
    with serve_app(build_app(settings, loaded)) as url:
        warm = requests_for(loaded, root, tasks, len(tasks), examples, offset=len(examples) // 2)
        run_http_load({"url": url, "gen": 1, "requests": warm}, timeout_s=3600)
        measured = requests_for(loaded, root, tasks, args.requests, examples, offset=repeat * args.requests)
        out = run_http_load({"url": url, "gen": args.gen, "requests": measured}, timeout_s=3600)
    prompt_lens = [r["prompt_tokens"] for r in measured]
    prompt_tokens = sum(prompt_lens)
    ttft = sorted(out["ttft_s"])
    return {"prefill_s": out["prefill_s"], "total_s": out["total_s"], "prompt_tokens": prompt_tokens,
            "flops": generation_flops(loaded.config, prompt_lens, args.gen),
            "prefill_flops": sum(prefill_flops(loaded.config, n) for n in prompt_lens),
            "prefill_tokens_per_s": prompt_tokens / out["prefill_s"], "ttft_median_s": median(ttft),
            "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))], "ttft_max_s": ttft[-1], "ttft_s": out["ttft_s"],
            "tokens": out["tokens"]}


def floor_fractions(run: dict[str, Any], peak: float | None) -> dict[str, float | None]:
    """One run's fractions of the compute floor at `peak` (bench/peak.py): whole run and prefill."""
    return {"fraction_of_floor": fraction_of_floor(run["flops"], run["total_s"], peak),
            "prefill_fraction_of_floor": fraction_of_floor(run["prefill_flops"], run["prefill_s"], peak)}


def summarise(runs: dict[str, list[dict[str, Any]]], peak: float | None = None) -> dict[str, Any]:
    """Median over repeats per arm, and on/off ratios (tokens must agree: the cache is exact);
    `peak`: the run's probed peak FLOP/s (None: no fraction of the floor)."""
    summary: dict[str, Any] = {}
    for arm, rs in runs.items():
        summary[arm] = {key: median([r[key] for r in rs]) for key in
                        ("prefill_s", "prefill_tokens_per_s", "ttft_median_s", "ttft_p90_s", "ttft_max_s")}
        fractions = [floor_fractions(r, peak) for r in rs]
        summary[arm]["peak_flops_per_s"] = peak
        for key in ("fraction_of_floor", "prefill_fraction_of_floor"):
            values = [v for f in fractions if (v := f[key]) is not None]
            summary[arm][key] = median(values) if values else None
    on, off = summary["cache-on"], summary["cache-off"]
    summary["ttft_median_speedup"] = off["ttft_median_s"] / on["ttft_median_s"]
    summary["prefill_throughput_ratio"] = on["prefill_tokens_per_s"] / off["prefill_tokens_per_s"]
    summary["tokens_identical"] = all(a["tokens"] == b["tokens"] for a, b in
                                      zip(runs["cache-on"], runs["cache-off"], strict=True))
    return summary


def plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in ARMS:
        ttft = sorted(t for r in runs[arm] for t in r["ttft_s"])
        ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=arm)
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT with and without the prefix cache")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_threads(args.threads)
    machine = machine_info([args.dtype])  # before the runs: its load average is the run's start
    peak = probe_for_run(args, [args.dtype], model_config())
    loaded = load(args.dtype)
    examples = load_examples(args.data)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="prad-prefix-bench-") as tmp:
        root = Path(tmp)
        tasks = write_tasks(loaded, root, args, examples)
        order = [(rep, arm) for rep in range(args.repeats) for arm in (ARMS if rep % 2 == 0 else ARMS[::-1])]
        for rep, arm in tqdm(order, desc="prefix cache arms", unit="run"):
            cache_mb = args.cache_mb if arm == "cache-on" else 0
            runs[arm].append(measure_arm(loaded, root, tasks, args, cache_mb, examples, rep))
    summary = summarise(runs, peak_of(peak, args.dtype))
    rows = [[arm, f"{summary[arm]['ttft_median_s']:.3f}", f"{summary[arm]['ttft_p90_s']:.3f}",
             f"{summary[arm]['prefill_s']:.2f}", f"{summary[arm]['prefill_tokens_per_s']:.0f}",
             or_dash(summary[arm]["prefill_fraction_of_floor"]), or_dash(summary[arm]["fraction_of_floor"])]
            for arm in ARMS]
    print(format_table(["arm", "TTFT median s", "TTFT p90 s", "prefill s", "prefill tok/s", "prefill frac of floor",
                        "frac of floor"], rows))
    print("frac of floor: the uncached workload's FLOPs at the run's probed peak / the measured time (cache on: "
          "effective, may pass 1)")
    print(f"TTFT median x{summary['ttft_median_speedup']:.2f}, prefill throughput x"
          f"{summary['prefill_throughput_ratio']:.2f}, tokens identical: {summary['tokens_identical']}")
    payload = {"benchmark": "prefix_cache", "settings": settings_of(args), "machine": machine,
               "peak": peak, "flop_count": FLOP_COUNT, "summary": summary,
               "runs": {arm: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for arm, rs in runs.items()}}
    save_results(args.out, "prefix_cache", payload, lambda path: plot(runs, path))
    return payload


if __name__ == "__main__":
    main()
