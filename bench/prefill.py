"""Prefill throughput: prompt tokens/s of `PrefillRunner.run` for one batch spread over many PrAd tasks.

What is measured, per dtype (`--dtypes`, default float32): `--prompts` (64) random prompts of
`--prompt-len` (64) tokens, prefilled from position 0 by `PrefillRunner.run` on the whole batch, or on
consecutive sub-batches of at most `--max-prefill-tokens` (4096) prompt tokens (the scheduler's budget).
Conditions, one row each:

* base: no adapter on any row (the runner passes no hooks at all);
* prad-pa xT for T in `--tasks` (1, 8, 16, 64): T distinct random PrAd-PA adapters of rank `--rank`
  (8), row i using task i mod T. T = 1 takes the shared-weights path, T > 1 the stacked-bank gather;
* mixed xT (T = the largest of --tasks): task t is prad-pa, prad-sa or prad-lora (targets q, v) for
  t mod 3 = 0, 1, 2, of rank `--rank` for even t and 2 * rank for odd t (so ranks are zero-padded).

Adapter application strategy (`--strategies`, default gather,segment; see prad/adapters/hooks.py):
every row with T > 1 is measured once per strategy, named e.g. "prad-pa x64 segment" (T = 1 uses the
shared weights in both, so it is measured once). The server uses "gather"; this is the A/B behind it.

Adapters are random and non-identity (init_tensors with up_std 0.05), in the model's dtype, as the
adapter cache holds them. tokens/s = prompt tokens / wall seconds of all `run` calls of the batch
(building the padded batch, the per-row adapter hooks, the forward, extracting each row's KV).
Every condition is warmed up on `--warmup-rows` (8) prompts, then timed `--repeats` (3) times with
conditions interleaved; the median is reported, as a ratio to the 1-task run (target at 64 tasks:
>= 0.85) and to the base model. Writes prefill.json and prefill.png to `--out` (default bench/results/).

Distance to the machine's limit: before any model is loaded the run probes the peak GEMM rate of each
dtype (bench/peak.py; `--no-peak-probe` skips it). `fraction_of_floor` per condition = the batch's
base-model prefill FLOPs at that peak / the measured time. FLOPs counted (`bench.peak.prefill_flops`):
2 * tokens * (q|k|v, o, gate|up, down weights of every layer), causal attention 4 * layers * heads *
head_dim per (query, key) pair, and the LM head on one row per prompt; not counted: embedding, norms,
RoPE, SiLU, softmax, KV extraction and the adapters' own FLOPs (so an adapted row is held to the base
model's floor: its extra work shows as a lower fraction).

Run from the repo root: `python -m bench.prefill` (full run) or, for a smoke run,
`python -m bench.prefill --prompts 8 --prompt-len 16 --tasks 1,8 --repeats 1`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import (
    add_common_args,
    format_table,
    load,
    machine_info,
    make_adapter,
    median,
    parse_ints,
    pyplot,
    random_prompts,
    save_results,
    settings_of,
    setup_threads,
    time_call,
)
from bench.peak import (
    FLOP_COUNT,
    add_probe_args,
    fraction_of_floor,
    model_config,
    or_dash,
    peak_of,
    prefill_flops,
    probe_for_run,
)
from prad.adapters import Adapter, RowAdapters
from prad.adapters.hooks import STRATEGIES
from prad.loading import LoadedModel
from prad.model import Model
from prefill_service.runner import ChunkInput, PrefillRunner

MIXED_VARIANTS = ("prad-pa", "prad-sa", "prad-lora")


@dataclass
class Condition:
    """One benchmarked batch: which adapter each row uses."""

    name: str
    num_tasks: int  # distinct adapters (0 = base model)
    variants: str  # e.g. "prad-pa" or "prad-pa,prad-sa,prad-lora"
    row_adapters: list[Adapter | None]
    strategy: str = "gather"


@dataclass
class ConditionResult:
    dtype: str
    name: str
    num_tasks: int
    variants: str
    strategy: str
    tokens: int  # prompt tokens per run
    calls: int  # PrefillRunner.run calls per run (sub-batches under the token budget)
    tokens_per_s: float  # median
    tokens_per_s_runs: list[float]
    vs_one_task: float | None
    vs_base: float | None
    flops: float = 0.0  # base-model prefill FLOPs of the batch (bench/peak.py)
    peak_flops_per_s: float | None = None  # the run's peak probe, this dtype
    fraction_of_floor: float | None = None  # compute floor at that peak / median seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--prompts", type=int, default=64, help="prompts in the batch (default 64)")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (default 64)")
    parser.add_argument("--tasks", type=parse_ints, default=parse_ints("1,8,16,64"),
                        help="comma-separated task counts for the prad-pa rows (default 1,8,16,64)")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-variant row")
    parser.add_argument("--strategies", type=parse_strategies, default=list(STRATEGIES),
                        help=f"adapter application strategies to compare (default {','.join(STRATEGIES)})")
    parser.add_argument("--max-prefill-tokens", type=int, default=4096,
                        help="prompt tokens per PrefillRunner.run call (default 4096: one call for 64x64)")
    parser.add_argument("--warmup-rows", type=int, default=8,
                        help="prompts in each condition's untimed warm-up (default 8)")
    add_common_args(parser, default_dtypes="float32")
    add_probe_args(parser)
    return parser.parse_args(argv)


def parse_strategies(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown strategy {unknown}; choose from {', '.join(STRATEGIES)}")
    return names


def split_by_budget(prompts: list[list[int]], budget: int) -> list[range]:
    """Consecutive row ranges whose prompt tokens sum to at most `budget` (a longer prompt goes alone)."""
    groups: list[range] = []
    start, used = 0, 0
    for i, p in enumerate(prompts):
        if i > start and used + len(p) > budget:
            groups.append(range(start, i))
            start, used = i, 0
        used += len(p)
    groups.append(range(start, len(prompts)))
    return groups


def build_conditions(loaded: LoadedModel, args: argparse.Namespace) -> list[Condition]:
    rows, most = args.prompts, max(args.tasks)
    pa = [make_adapter(loaded, "prad-pa", args.rank, args.seed + t) for t in range(most)]
    conditions = [Condition("base", 0, "-", [None] * rows)]
    named = len(args.strategies) > 1

    def add(name: str, tasks: int, variants: str, row_adapters: list[Adapter | None]) -> None:
        for strategy in args.strategies[:1] if tasks == 1 else args.strategies:
            label = f"{name} {strategy}" if named and tasks > 1 else name
            conditions.append(Condition(label, tasks, variants, row_adapters, strategy))

    for t in args.tasks:
        add(f"prad-pa x{t}", t, "prad-pa", [pa[i % t] for i in range(rows)])
    if not args.no_mixed:
        mixed = [make_adapter(loaded, MIXED_VARIANTS[t % 3], args.rank * (1 + t % 2), args.seed + 1000 + t)
                 for t in range(most)]
        add(f"mixed x{most}", most, ",".join(MIXED_VARIANTS), [mixed[i % most] for i in range(rows)])
    return conditions


class StrategyPrefillRunner(PrefillRunner):
    """The serving PrefillRunner with its per-row adapters applied by `strategy`
    (prad/adapters/hooks.py) instead of RowAdapters' default."""

    def __init__(self, model: Model, strategy: str) -> None:
        super().__init__(model)
        self.strategy = strategy

    def row_adapters(self, adapters: list[Adapter | None], prompt_mask: torch.Tensor) -> RowAdapters:
        return RowAdapters(self.model.config, adapters, prompt_mask, self.strategy)


def prefill_batch(runner: PrefillRunner, prompts: list[list[int]], adapters: list[Adapter | None],
                  groups: list[range]) -> None:
    """Prefill every prompt from position 0, one `run` call per group of rows."""
    for group in groups:
        runner.run([ChunkInput(prompts[i], 0, adapters[i], None) for i in group])


def time_conditions(runners: Mapping[str, PrefillRunner], prompts: list[list[int]], conditions: list[Condition],
                    groups: list[range], args: argparse.Namespace, dtype: str) -> dict[str, list[float]]:
    """tokens/s per condition, `repeats` runs each, conditions interleaved (order alternating)."""
    tokens = sum(len(p) for p in prompts)
    warm = [range(min(args.warmup_rows, len(prompts)))]
    for c in tqdm(conditions, desc=f"warm-up {dtype}", unit="cond", leave=False):
        prefill_batch(runners[c.strategy], prompts, c.row_adapters, warm)
    runs: dict[str, list[float]] = {c.name: [] for c in conditions}
    with tqdm(total=args.repeats * len(conditions), desc=f"prefill {dtype}", unit="run") as bar:
        for rep in range(args.repeats):
            for c in conditions if rep % 2 == 0 else conditions[::-1]:
                seconds = time_call(partial(prefill_batch, runners[c.strategy], prompts, c.row_adapters, groups))
                runs[c.name].append(tokens / seconds)
                bar.update()
    return runs


def summarise(conditions: list[Condition], runs: dict[str, list[float]], dtype: str, tokens: int,
              calls: int, flops: float = 0.0, peak: float | None = None) -> list[ConditionResult]:
    medians = {c.name: median(runs[c.name]) for c in conditions}
    one_task = next((medians[c.name] for c in conditions if c.num_tasks == 1 and c.variants == "prad-pa"), None)
    base = medians.get("base")
    return [ConditionResult(
        dtype=dtype, name=c.name, num_tasks=c.num_tasks, variants=c.variants, strategy=c.strategy, tokens=tokens,
        calls=calls,
        tokens_per_s=medians[c.name], tokens_per_s_runs=runs[c.name],
        vs_one_task=None if one_task is None else medians[c.name] / one_task,
        vs_base=None if base is None else medians[c.name] / base, flops=flops, peak_flops_per_s=peak,
        fraction_of_floor=fraction_of_floor(flops, tokens / medians[c.name], peak)) for c in conditions]


def measure_dtype(dtype: str, args: argparse.Namespace, peak: float | None = None) -> list[ConditionResult]:
    """The dtype's results; `peak`: the run's probed peak FLOP/s for it (None: no fraction of the floor)."""
    loaded = load(dtype)
    prompts = random_prompts(args.prompts, args.prompt_len, loaded.config.vocab_size, args.seed)
    groups = split_by_budget(prompts, args.max_prefill_tokens)
    conditions = build_conditions(loaded, args)
    runners = {strategy: StrategyPrefillRunner(loaded.model, strategy) for strategy in STRATEGIES}
    runs = time_conditions(runners, prompts, conditions, groups, args, dtype)
    flops = sum(prefill_flops(loaded.config, len(p)) for p in prompts)
    return summarise(conditions, runs, dtype, sum(len(p) for p in prompts), len(groups), flops, peak)


def print_report(results: list[ConditionResult]) -> None:
    headers = ["dtype", "condition", "tasks", "calls", "tokens/s", "frac of floor", "ms/batch", "vs 1-task",
               "vs base"]

    def ratio(v: float | None) -> object:
        return "-" if v is None else v

    rows = [[r.dtype, r.name, r.num_tasks, r.calls, r.tokens_per_s, or_dash(r.fraction_of_floor),
             1000.0 * r.tokens / r.tokens_per_s,
             ratio(r.vs_one_task), ratio(r.vs_base)] for r in results]
    print(format_table(headers, rows))
    print("target: vs 1-task >= 0.85 at 64 tasks; frac of floor: the base model's prefill FLOPs at the run's "
          "probed peak / the measured time")


def bar_color(result: ConditionResult) -> str:
    if result.num_tasks == 0:
        return "tab:gray"
    if result.variants == "prad-pa":
        return "tab:blue" if result.strategy == "gather" or result.num_tasks == 1 else "tab:cyan"
    return "tab:orange" if result.strategy == "gather" else "tab:olive"


def plot(results: list[ConditionResult], path: Path) -> None:
    plt = pyplot()
    dtypes = list(dict.fromkeys(r.dtype for r in results))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        rs = [r for r in results if r.dtype == dtype]
        colors = [bar_color(r) for r in rs]
        bars = ax.bar([r.name for r in rs], [r.tokens_per_s for r in rs], color=colors)
        for bar, r in zip(bars, rs, strict=True):
            label = "1-task ref" if r.vs_one_task is None else f"{r.vs_one_task:.2f}x"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8)
        one_task = next((r.tokens_per_s for r in rs if r.num_tasks == 1 and r.variants == "prad-pa"), None)
        if one_task is not None:
            ax.axhline(0.85 * one_task, color="grey", linestyle=":", label="0.85 x 1-task (target)")
            ax.legend(fontsize=8, loc="lower right")
        ax.set(ylabel="prompt tokens/s", title=f"prefill {dtype} (median; labels: vs 1-task)")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_threads(args.threads)
    machine = machine_info(args.dtypes)
    peak = probe_for_run(args, args.dtypes, model_config())
    results: list[ConditionResult] = []
    for dtype in args.dtypes:
        results.extend(measure_dtype(dtype, args, peak_of(peak, dtype)))
    print_report(results)
    settings = settings_of(args)
    payload = {"benchmark": "prefill", "settings": settings, "machine": machine, "peak": peak,
               "flop_count": FLOP_COUNT, "results": [asdict(r) for r in results]}
    save_results(args.out, "prefill", payload, lambda path: plot(results, path))


if __name__ == "__main__":
    main()
