"""Decode throughput: tokens/s of `DecodeRunner.decode` at several batch sizes, base vs 64-task KV.

What is measured, per dtype (`--dtypes`) and batch size B (`--batches`):

* (a) base: every row's KV comes from a base-model prefill (`PrefillRunner`, no adapter) of a
  `--context`-token prompt (default 128); (b) tasks: the same prompts prefilled with `--tasks`
  (default 64) different random PrAd-PA adapters, row i using task i mod tasks.
  The KV is inserted into a `DecodeRunner` slot cache (as the decode engine does), then `--steps`
  decode steps are timed: each step feeds every row's newest token at its position (context + step)
  and takes the greedy next token from the logits (`runner.decode(...)` + argmax + `.tolist()`,
  which is what one engine step costs without its Python bookkeeping). Prefill is not timed.
  tokens/s = B * steps / seconds; the ratio (b)/(a) shows that decode costs the same whatever
  adapters produced the KV (decode has no adapter code at all).
  How the ratios are paired: each round times the conditions' steps interleaved one by one (step s
  of every condition, each timed alone, before step s + 1 of any, in orders balanced across step boundaries,
  `step_order`), so all of them see the same machine; a ratio is the median, over every step of all
  rounds, of the two conditions' step-s time ratio (the ratio of the two median tokens/s is also
  recorded). Base and tasks swap their two runners every round (`--repeats` is even by default), so
  a difference between the two caches themselves falls on both alike. On a shared VM the
  speed drifts by tens of per cent within seconds, which whole back-to-back runs did not cancel.
* (c) forward: the base KV stepped through the reference step (`ReferenceStep`: the generic
  token-major `Model.forward`, the eager step, what the decode service ran on a GPU before CUDA
  graphs); step/forward is the paired speed-up of the runner's decode step over it. Which step the
  runner takes is `--decode-graphs` (the server's `decode_graphs` setting): auto = on a CPU the
  feature-major `CpuStepBackend`, on CUDA the static-shape step replayed as CUDA graphs (so there
  step/forward is the graphs' speed-up over the eager step); static = the static-shape step without
  graphs; off = no graphs (the reference step on CUDA). The JSON records the step and, with graphs,
  their capture time and memory (`decode_step`).
* (d) torch-ops: the base KV through the CPU backend on PyTorch ops only
  (`CpuStepBackend(model, native_kernels=False)`): attention through RoPE + `KVCache.update` + SDPA,
  and the residual add + RMSNorm and SiLU * up as separate ops, instead of the native kernels
  (prad/kernels); native/torch is the kernels' paired speed-up of the whole step (1.0 where they are
  not available, and on a GPU, where this condition runs the runner's own step: `machine` records
  whether they were).
* A plain `torch.matmul` FLOP rate, same dtype: [`--ref-rows` (64), d] x [d, intermediate]
  (576 x 1536 on SmolLM2), plus [B, d] x [d, intermediate] per batch size for context; each the
  fastest of three layouts (right operand contiguous; right operand the transposed `[out, in]`
  weight; or the transposed product, weight on the left, as the decode step computes it), sampled
  once per repeat between the decode runs. The reference is also sampled at every timed step: a
  ~20 ms loop of the round's fastest layout right after the base condition's step (`MatmulSampler`).
* The decode step's achieved FLOP rate as a fraction of that matmul rate, paired like the ratios:
  the median over every timed step of (step FLOPs / base step seconds) / the matmul rate sampled
  next to it, with its 95 % interval; the fraction against the per-repeat samples is also recorded
  (`fraction_of_matmul_ref_rounds`); it moves with the VM's drift (session 8, bf16 batch 64: two runs
  whose steps took 130 and 132 ms read 0.574 and 0.979, their references 238 and 138 GFLOP/s).
  FLOPs counted per step:
  2 * B * (all linear weights: q|k|v, o, gate|up and down of every layer, plus the LM head) for the
  projections, plus attention 4 * B * layers * num_heads * head_dim * num_keys (Q.K^T and P.V over
  the num_keys = position + 1 keys each row attends). Not counted: embedding lookup, norms, RoPE,
  SiLU, softmax, the KV write and the argmax (all O(B * d) or smaller).
* Distance to the machine's limit: before any model is loaded the run probes the peak GEMM rate of
  each dtype (bench/peak.py: torch.mm and, on CPUs with AVX-512 BF16, the native bf16 projection, on
  the model's prefill and decode shapes; `--no-peak-probe` skips it, `--peak-seconds` sizes it).
  `fraction_of_floor` per batch = the base condition's step FLOP/s (the FLOPs above) / that peak,
  i.e. the compute floor of the timed steps at the peak over their measured time.

Every measurement is repeated `--repeats` (4) times and the median is reported. Writes decode.json
and decode.png to `--out` (default bench/results/).

Run from the repo root: `python -m bench.decode` (full run) or, for a smoke run,
`python -m bench.decode --batches 1,8 --steps 4 --repeats 1 --context 32 --tasks 8 --dtypes float32`.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.common import (
    MATMUL_LAYOUTS,
    add_common_args,
    best_matmul_flops_per_s,
    calls_for,
    format_table,
    load,
    machine_info,
    make_adapter,
    matmul_loop,
    matmul_operands,
    median,
    parse_ints,
    pyplot,
    random_prompts,
    save_results,
    settings_of,
    setup_threads,
    synchronize,
)
from bench.peak import (
    add_probe_args,
    decode_step_flops,
    fraction_of_floor,
    linear_weight_count,
    model_config,
    or_dash,
    peak_of,
    probe_for_run,
)
from decode_service.runner import DECODE_GRAPHS, DecodeRunner
from prad import kernels
from prad.adapters import Adapter
from prad.config import ModelConfig
from prad.cpu_decode import CpuStepBackend
from prad.decode_step import ReferenceStep, StepBackend
from prad.loading import LoadedModel
from prad.model import Model
from prefill_service.runner import ChunkInput, ChunkOutput, PrefillRunner

# "forward" and "torch-ops": the base KV again, stepped through the reference step and through the
# CPU backend without native kernels, so the implementations are compared in the same run.
CONDITIONS = ("base", "tasks", "forward", "torch-ops")
REF_SAMPLE_SECONDS = 0.02  # one paired matmul-reference sample per timed step
FLOP_COUNT = ("per step: 2*B*(linear weight count: qkv, o, gate|up, down of every layer + lm_head) "
              "+ attention 4*B*layers*num_heads*head_dim*num_keys (num_keys = position+1); "
              "embedding, norms, RoPE, SiLU, softmax, KV write, argmax not counted")


@dataclass
class DecodeState:
    """One condition's decode runner, with rows [0, max_batch) already holding their prompt KV."""

    runner: DecodeRunner
    first_tokens: list[int]  # per row: the token sampled (greedily) from the prefill logits
    backend: StepBackend | None = None  # None: runner.decode; else this step on the runner's cache


@dataclass
class BatchResult:
    dtype: str
    batch: int
    steps: int
    context: int
    tokens_per_s: dict[str, float]  # condition -> median tokens/s
    tokens_per_s_runs: dict[str, list[float]] = field(default_factory=dict)
    step_seconds: dict[str, list[float]] = field(default_factory=dict)  # every timed step, rounds in order
    tasks_over_base: float = 0.0  # median over steps of paired per-step ratios
    tasks_over_base_ci95: tuple[float, float] = (0.0, 0.0)  # 95 % interval of that median
    tasks_over_base_of_medians: float = 0.0  # ratio of the two medians, for comparison
    step_over_forward: float = 0.0  # decode step speed-up over the generic forward (paired, base KV)
    native_over_torch_ops: float = 0.0  # the native kernels' speed-up of the step (paired)
    flops_per_step: float = 0.0  # mean over the timed steps
    achieved_flops_per_s: float = 0.0  # base condition
    matmul_ref_flops_per_s: float = 0.0  # [ref_rows, d] x [d, I], median of the per-step samples
    matmul_ref_rounds_flops_per_s: float = 0.0  # the same, median of the per-repeat samples
    matmul_same_rows_flops_per_s: float = 0.0  # [B, d] x [d, I]
    fraction_of_matmul_ref: float = 0.0  # median over steps of paired achieved / reference
    fraction_of_matmul_ref_ci95: tuple[float, float] = (0.0, 0.0)
    fraction_of_matmul_ref_rounds: float = 0.0  # median achieved / median per-repeat reference
    fraction_of_matmul_same_rows: float = 0.0
    peak_flops_per_s: float | None = None  # the run's peak probe, this dtype (bench/peak.py)
    fraction_of_floor: float | None = None  # base: compute floor of the steps at that peak / their time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", type=parse_ints, default=parse_ints("1,8,32,64"),
                        help="comma-separated batch sizes (default 1,8,32,64)")
    parser.add_argument("--context", type=int, default=128,
                        help="KV positions each row holds before decoding (default 128)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per measurement (default 32)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed decode steps per batch and condition (default 3)")
    parser.add_argument("--tasks", type=int, default=64,
                        help="distinct PrAd-PA tasks for the adapted prefill (default 64)")
    parser.add_argument("--ref-rows", type=int, default=64,
                        help="rows of the reference matmul [rows, d] x [d, I] (default 64)")
    parser.add_argument("--max-prefill-tokens", type=int, default=4096,
                        help="token budget per prefill call when building the KV, not timed (default 4096)")
    parser.add_argument("--decode-graphs", choices=DECODE_GRAPHS, default="auto",
                        help="the runner's decode step, as the server's decode_graphs setting (default auto: "
                        "CUDA graphs of the static step on cuda, the CPU backend on cpu)")
    # an even number of rounds: base and tasks swap runners every round (states_for_round)
    add_common_args(parser, default_dtypes="float32,bfloat16", default_repeats=4)
    add_probe_args(parser)
    return parser.parse_args(argv)


def mean_step_flops(config: ModelConfig, batch: int, context: int, steps: int) -> float:
    return sum(decode_step_flops(config, batch, context + s + 1) for s in range(steps)) / steps


def prefill_in_batches(runner: PrefillRunner, prompts: list[list[int]], adapters: list[Adapter | None],
                       budget: int, desc: str) -> list[ChunkOutput]:
    """Prefill every prompt (whole, from position 0) in consecutive batches of at most `budget` tokens."""
    rows_per_call = max(1, budget // max(len(p) for p in prompts))
    outputs: list[ChunkOutput] = []
    for start in tqdm(range(0, len(prompts), rows_per_call), desc=desc, unit="call", leave=False):
        chunk = [ChunkInput(prompts[i], 0, adapters[i], None)
                 for i in range(start, min(len(prompts), start + rows_per_call))]
        outputs.extend(runner.run(chunk))
    return outputs


@dataclass
class PromptKV:
    """One condition's prefill results: per row, the prompt KV and the greedy first token."""

    kv: list[torch.Tensor]  # per row: [layers, 2, kv_heads, context, head_dim]
    first_tokens: list[int]


def prompt_kv(outputs: list[ChunkOutput]) -> PromptKV:
    return PromptKV([out.kv for out in outputs], [int(out.logits.argmax()) for out in outputs])


def new_runner(loaded: LoadedModel, rows: int, capacity: int, decode_graphs: str = "auto") -> DecodeRunner:
    """A DecodeRunner for `rows` rows, its cache grown (in its usual steps) to `capacity` positions."""
    runner = DecodeRunner(loaded.model, max_batch_size=rows, max_seq_len=loaded.config.max_position_embeddings,
                          decode_graphs=decode_graphs)
    runner.ensure_capacity(capacity)
    return runner


def describe_step(runner: DecodeRunner) -> dict[str, Any]:
    """The runner's decode step, and its CUDA graphs' capture time and memory if it has them."""
    stats = runner.graph_stats()
    return {"backend": runner.backend.name, "description": str(runner.backend),
            "graphs": None if stats is None else asdict(stats)}


def load_state(runner: DecodeRunner, kv: PromptKV) -> DecodeState:
    """Every row's prompt KV inserted into `runner` (positions past the prompt are rewritten by the steps)."""
    for row, row_kv in enumerate(kv.kv):
        runner.insert(row, row_kv)
    return DecodeState(runner, kv.first_tokens)


def states_for_round(runners: tuple[DecodeRunner, DecodeRunner], kvs: dict[str, PromptKV],
                     round_index: int, backends: dict[str, StepBackend | None]) -> dict[str, DecodeState]:
    """The four conditions' states for one round. Base and tasks swap runners every round, so that a
    difference between the two caches themselves (their addresses; two caches of the same base KV
    once read 1-4 % apart, in a test whose step order was not yet balanced) falls on both alike.
    "forward" and "torch-ops" share base's runner and KV, each through its step in `backends`."""
    base_runner, tasks_runner = runners if round_index % 2 == 0 else runners[::-1]
    base = load_state(base_runner, kvs["base"])
    return {"base": base, "tasks": load_state(tasks_runner, kvs["tasks"]),
            "forward": replace(base, backend=backends["forward"]),
            "torch-ops": replace(base, backend=backends["torch-ops"])}


def comparison_backends(model: Model) -> dict[str, StepBackend | None]:
    """The steps of the "forward" and "torch-ops" conditions: the reference step, and the CPU backend
    without native kernels (on other devices None: the runner's own step)."""
    torch_ops = CpuStepBackend(model, native_kernels=False) if model.device.type == "cpu" else None
    return {"forward": ReferenceStep(model), "torch-ops": torch_ops}


def backend_step(runner: DecodeRunner, backend: StepBackend, token_ids: list[int],
                 positions: list[int]) -> torch.Tensor:
    """What `runner.decode` computes, through `backend` instead of the runner's own."""
    device = runner.model.device
    return backend.step(torch.tensor(token_ids, device=device), torch.tensor(positions, device=device),
                        runner.cache.rows(len(token_ids)))


def decode_step_once(state: DecodeState, tokens: list[int], position: int) -> list[int]:
    """One greedy decode step for rows [0, len(tokens)), every row at `position`; the next tokens."""
    positions = [position] * len(tokens)
    if state.backend is None:
        logits = state.runner.decode(tokens, positions)
    else:
        logits = backend_step(state.runner, state.backend, tokens, positions)
    return logits.argmax(dim=-1).tolist()


def decode_steps(state: DecodeState, batch: int, context: int, steps: int) -> None:
    """`steps` greedy decode steps for rows [0, batch), starting at position `context` (KV is overwritten)."""
    tokens = state.first_tokens[:batch]
    for s in range(steps):
        tokens = decode_step_once(state, tokens, context + s)


@functools.cache
def balanced_blocks(n: int) -> tuple[tuple[int, ...], ...]:
    """n - 1 orders of range(n) whose concatenation, read as a cycle, has every ordered pair of
    distinct items next to each other exactly once (an Euler circuit of the complete directed graph
    cut into permutations; found by depth-first search, instant for the handful of conditions here).

    Interleaved steps run one after another with nothing between them, so what runs just before a
    step includes the previous step's last condition: a slow step (the generic forward churns the
    allocator and the caches) slowed whichever condition followed it across the step boundary by ~1 %
    when the orders balanced only the pairs inside a step."""
    if n == 1:
        return ((0,),)
    length = n * (n - 1)
    seq: list[int] = []
    used: set[tuple[int, int]] = set()

    def extend() -> bool:
        if len(seq) == length:
            return seq[-1] != seq[0] and (seq[-1], seq[0]) not in used
        block = seq[len(seq) - len(seq) % n:]
        for x in range(n):
            pair = (seq[-1], x) if seq else None
            if x in block or (pair is not None and (x == seq[-1] or pair in used)):
                continue
            seq.append(x)
            if pair is not None:
                used.add(pair)
            if extend():
                return True
            seq.pop()
            if pair is not None:
                used.discard(pair)
        return False

    if not extend():
        raise ValueError(f"no balanced order for {n} conditions")
    return tuple(tuple(seq[i:i + n]) for i in range(0, length, n))


def step_order(conditions: Sequence[str], step: int) -> list[str]:
    """The order of the conditions in interleaved step `step` (`balanced_blocks`): over every
    len(conditions) - 1 consecutive steps each condition directly follows each other one exactly
    once, across step boundaries included."""
    blocks = balanced_blocks(len(conditions))
    return [conditions[i] for i in blocks[step % len(blocks)]]


@dataclass
class MatmulSampler:
    """The reference matmul in one layout, sized to a short timed loop (`sample`: its FLOP/s)."""

    a: torch.Tensor
    b: torch.Tensor
    calls: int

    @classmethod
    def fastest(cls, rates: dict[str, float], rows: int, inner: int, cols: int, dtype: torch.dtype,
                device: torch.device) -> MatmulSampler:
        """For the layout that was fastest in `rates` (a `best_matmul_flops_per_s` sample)."""
        layout = max(MATMUL_LAYOUTS, key=lambda name: rates[name])
        a, b = matmul_operands(rows, inner, cols, dtype, layout, device)
        return cls(a, b, calls_for(a, b, REF_SAMPLE_SECONDS))

    def sample(self) -> float:
        """One timed loop, after two untimed calls: the step just run has evicted the operands."""
        for _ in range(2):
            torch.matmul(self.a, self.b)
        return matmul_loop(self.a, self.b, self.calls)


def interleaved_steps(states: dict[str, DecodeState], conditions: Sequence[str], batch: int, context: int,
                      steps: int, reference: MatmulSampler | None = None) -> tuple[dict[str, list[float]], list[float]]:
    """Per condition, the seconds of each of `steps` decode steps, the conditions' steps interleaved;
    and per step, the reference matmul's FLOP/s sampled right after the base condition's step.

    Step s of every condition runs (timed one at a time) before step s + 1 of any: a shared VM's
    speed drifts by tens of per cent within seconds, and interleaving at step granularity puts every
    condition under the same drift, so their ratios measure the code, not the neighbours. The
    reference sample next to base's step does the same for the fraction of the matmul rate."""
    tokens = {c: states[c].first_tokens[:batch] for c in conditions}
    seconds: dict[str, list[float]] = {c: [] for c in conditions}
    rates: list[float] = []
    for s in range(steps):
        for cond in step_order(conditions, s):
            start = time.perf_counter()
            tokens[cond] = decode_step_once(states[cond], tokens[cond], context + s)  # .tolist() syncs
            seconds[cond].append(time.perf_counter() - start)
            if cond == "base" and reference is not None:
                rates.append(reference.sample())
    return seconds, rates


def prepare_kv(loaded: LoadedModel, args: argparse.Namespace) -> dict[str, PromptKV]:
    """Prefill the prompts twice: without adapters ("base"), then row i with task i mod tasks ("tasks")."""
    rows = max(args.batches)
    prompts = random_prompts(rows, args.context, loaded.config.vocab_size, args.seed)
    adapters = [make_adapter(loaded, "prad-pa", args.rank, args.seed + t) for t in range(args.tasks)]
    row_adapters: dict[str, list[Adapter | None]] = {
        "base": [None] * rows,
        "tasks": [adapters[i % args.tasks] for i in range(rows)],
    }
    prefill = PrefillRunner(loaded.model)
    return {cond: prompt_kv(prefill_in_batches(prefill, prompts, row_adapters[cond], args.max_prefill_tokens,
                                               desc=f"prefill KV ({cond})"))
            for cond in ("base", "tasks")}


@dataclass
class Runs:
    """Raw per-repeat measurements of one dtype."""

    tokens_per_s: dict[int, dict[str, list[float]]]  # batch -> condition -> per repeat
    step_seconds: dict[int, dict[str, list[float]]]  # batch -> condition -> every timed step, in order
    matmul_ref: list[dict[str, float]] = field(default_factory=list)  # per repeat, per layout
    matmul_same_rows: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # batch -> per repeat
    matmul_paired: dict[int, list[float]] = field(default_factory=dict)  # batch -> per timed step, in order
    decode_step: dict[str, Any] = field(default_factory=dict)  # describe_step of the base runner


def measure_references(runs: Runs, config: ModelConfig, dtype: torch.dtype, args: argparse.Namespace) -> MatmulSampler:
    """One matmul-rate sample for the reference shape and for each batch's [B, d] x [d, I]; returns
    the round's per-step sampler of the reference shape in its fastest layout."""
    d, inter, device = config.hidden_size, config.intermediate_size, torch.device(args.device)
    runs.matmul_ref.append(best_matmul_flops_per_s(args.ref_rows, d, inter, dtype, device))
    for batch in args.batches:
        runs.matmul_same_rows.setdefault(batch, []).append(best_matmul_flops_per_s(batch, d, inter, dtype, device))
    return MatmulSampler.fastest(runs.matmul_ref[-1], args.ref_rows, d, inter, dtype, device)


def time_decode(loaded: LoadedModel, kvs: dict[str, PromptKV], args: argparse.Namespace) -> Runs:
    """`repeats` rounds; each measures the matmul references, then every batch with the conditions'
    steps interleaved (`interleaved_steps`), base and tasks on swapped runners (`states_for_round`)."""
    rows, capacity = max(args.batches), args.context + max(args.steps, args.warmup)
    runners = (new_runner(loaded, rows, capacity, args.decode_graphs),
               new_runner(loaded, rows, capacity, args.decode_graphs))
    backends = comparison_backends(loaded.model)
    for states in (states_for_round(runners, kvs, 0, backends), states_for_round(runners, kvs, 1, backends)):
        for batch in args.batches:
            for cond in CONDITIONS:
                decode_steps(states[cond], batch, args.context, args.warmup)
    runs = Runs({b: {c: [] for c in CONDITIONS} for b in args.batches},
                {b: {c: [] for c in CONDITIONS} for b in args.batches})
    runs.decode_step = describe_step(runners[0])
    dtype = loaded.model.dtype
    with tqdm(total=args.repeats * len(args.batches), desc=f"decode {dtype}", unit="batch") as bar:
        for rep in range(args.repeats):
            states = states_for_round(runners, kvs, rep, backends)
            reference = measure_references(runs, loaded.config, dtype, args)
            for batch in args.batches:
                synchronize()
                seconds, rates = interleaved_steps(states, CONDITIONS, batch, args.context, args.steps, reference)
                for cond, secs in seconds.items():
                    runs.tokens_per_s[batch][cond].append(batch * args.steps / sum(secs))
                    runs.step_seconds[batch][cond].extend(secs)
                runs.matmul_paired.setdefault(batch, []).extend(rates)
                bar.update()
    return runs


def paired_ratio(step_seconds: dict[str, list[float]], num: str = "tasks", den: str = "base") -> float:
    """Speed of `num` over `den`: the median over every timed step of den's step time / num's, the two
    steps run next to each other (`interleaved_steps`). The median of per-step pairs is not moved
    by a neighbour's burst that stalls a few steps, which a ratio of sums or of round totals is."""
    return median(step_ratios(step_seconds, num, den))


def median_ci95(values: Sequence[float]) -> tuple[float, float]:
    """A distribution-free 95 % confidence interval of the median: the order statistics at ranks
    n/2 -+ 1.96 * sqrt(n)/2 (normal approximation to the binomial; fine for n >= ~20)."""
    ordered = sorted(values)
    n = len(ordered)
    half_width = 1.96 * math.sqrt(n) / 2
    low, high = math.floor(n / 2 - half_width), math.ceil(n / 2 + half_width)
    return ordered[max(0, low)], ordered[min(n - 1, high)]


def step_ratios(step_seconds: dict[str, list[float]], num: str, den: str) -> list[float]:
    return [d / n for n, d in zip(step_seconds[num], step_seconds[den], strict=True)]


def median_best(samples: list[dict[str, float]]) -> float:
    return median([s["best"] for s in samples])


def step_fractions(step_flops_per_step: Sequence[float], base_seconds: Sequence[float],
                   reference_rates: Sequence[float]) -> list[float]:
    """Per timed step: its achieved FLOP/s (FLOPs / base step seconds) over the reference rate sampled
    next to it. step_flops_per_step holds one round's steps; the timings run over every round."""
    steps = len(step_flops_per_step)
    return [step_flops_per_step[i % steps] / secs / rate
            for i, (secs, rate) in enumerate(zip(base_seconds, reference_rates, strict=True))]


def summarise(runs: Runs, config: ModelConfig, dtype: str, args: argparse.Namespace,
              peak: float | None = None) -> list[BatchResult]:
    ref_rounds = median_best(runs.matmul_ref)
    results = []
    for batch in args.batches:
        tps = {c: median(runs.tokens_per_s[batch][c]) for c in CONDITIONS}
        flops = mean_step_flops(config, batch, args.context, args.steps)
        achieved = flops * tps["base"] / batch
        same_rows = median_best(runs.matmul_same_rows[batch])
        per_step = [decode_step_flops(config, batch, args.context + s + 1) for s in range(args.steps)]
        fractions = step_fractions(per_step, runs.step_seconds[batch]["base"], runs.matmul_paired[batch])
        results.append(BatchResult(
            dtype=dtype, batch=batch, steps=args.steps, context=args.context, tokens_per_s=tps,
            tokens_per_s_runs=runs.tokens_per_s[batch], step_seconds=runs.step_seconds[batch],
            tasks_over_base=paired_ratio(runs.step_seconds[batch]),
            tasks_over_base_ci95=median_ci95(step_ratios(runs.step_seconds[batch], "tasks", "base")),
            tasks_over_base_of_medians=tps["tasks"] / tps["base"],
            step_over_forward=paired_ratio(runs.step_seconds[batch], "base", "forward"),
            native_over_torch_ops=paired_ratio(runs.step_seconds[batch], "base", "torch-ops"),
            flops_per_step=flops, achieved_flops_per_s=achieved,
            matmul_ref_flops_per_s=median(runs.matmul_paired[batch]), matmul_ref_rounds_flops_per_s=ref_rounds,
            matmul_same_rows_flops_per_s=same_rows, fraction_of_matmul_ref=median(fractions),
            fraction_of_matmul_ref_ci95=median_ci95(fractions), fraction_of_matmul_ref_rounds=achieved / ref_rounds,
            fraction_of_matmul_same_rows=achieved / same_rows, peak_flops_per_s=peak,
            fraction_of_floor=fraction_of_floor(flops, batch / tps["base"], peak)))
    return results


def measure_dtype(dtype: str, args: argparse.Namespace,
                  peak: float | None = None) -> tuple[list[BatchResult], dict[str, Any], dict[str, Any]]:
    """The dtype's results, its matmul reference samples and its decode step (`describe_step`);
    `peak`: the run's probed peak FLOP/s for this dtype (None: no fraction of the floor)."""
    loaded = load(dtype, args.device, args.model)
    config = loaded.config
    runs = time_decode(loaded, prepare_kv(loaded, args), args)
    reference = {"shape": [args.ref_rows, config.hidden_size, config.intermediate_size],
                 "samples": runs.matmul_ref,
                 "paired_samples": {str(b): v for b, v in runs.matmul_paired.items()},
                 "same_rows_samples": {str(b): v for b, v in runs.matmul_same_rows.items()},
                 "linear_weight_count": linear_weight_count(config)}
    return summarise(runs, config, dtype, args, peak), reference, runs.decode_step


def print_report(results: list[BatchResult], ref_rows: int) -> None:
    headers = ["dtype", "batch", "base tok/s", "frac of floor", "tasks tok/s", "tasks/base", "95% interval", "step ms",
               "forward ms",
               "step/forward", "torch-ops ms", "native/torch", "GFLOP/s", f"matmul{ref_rows} GFLOP/s",
               f"frac of mm{ref_rows}", "95% interval", "frac (rounds)", "frac of mmB"]
    rows = [[r.dtype, r.batch, r.tokens_per_s["base"], or_dash(r.fraction_of_floor), r.tokens_per_s["tasks"],
             r.tasks_over_base,
             "{:.3f}-{:.3f}".format(*r.tasks_over_base_ci95),
             1000.0 * r.batch / r.tokens_per_s["base"], 1000.0 * r.batch / r.tokens_per_s["forward"],
             r.step_over_forward, 1000.0 * r.batch / r.tokens_per_s["torch-ops"], r.native_over_torch_ops,
             r.achieved_flops_per_s / 1e9,
             r.matmul_ref_flops_per_s / 1e9, r.fraction_of_matmul_ref,
             "{:.3f}-{:.3f}".format(*r.fraction_of_matmul_ref_ci95), r.fraction_of_matmul_ref_rounds,
             r.fraction_of_matmul_same_rows]
            for r in results]
    print(format_table(headers, rows))
    print("targets: tasks/base >= 0.99; fraction of the matmul rate at batch 64 >= 0.5 "
          "(both: medians of per-step paired ratios, with their 95 % intervals; 'frac (rounds)': "
          "against the matmul sampled once per repeat)")
    print(f"FLOPs counted {FLOP_COUNT}; frac of floor: base step FLOP/s over the run's probed peak (bench/peak.py)")


def plot(results: list[BatchResult], path: Path, ref_rows: int, tasks: int) -> None:
    plt = pyplot()
    fig, (ax_tps, ax_frac) = plt.subplots(1, 2, figsize=(11, 4.2))
    batches = sorted({r.batch for r in results})
    for dtype in dict.fromkeys(r.dtype for r in results):
        rs = [r for r in results if r.dtype == dtype]
        xs = [r.batch for r in rs]
        ax_tps.plot(xs, [r.tokens_per_s["base"] for r in rs], "o-", label=f"{dtype} base")
        ax_tps.plot(xs, [r.tokens_per_s["tasks"] for r in rs], "x--", label=f"{dtype} {tasks}-task KV")
        ax_tps.plot(xs, [r.tokens_per_s["forward"] for r in rs], "s:", label=f"{dtype} base, generic forward")
        ax_tps.plot(xs, [r.tokens_per_s["torch-ops"] for r in rs], "d-.", label=f"{dtype} base, PyTorch ops only")
        ax_frac.plot(xs, [r.fraction_of_matmul_ref for r in rs], "o-", label=f"{dtype} vs matmul{ref_rows}")
    ax_tps.set(xlabel="batch", ylabel="decode tokens/s", title="decode throughput (median)")
    ax_frac.axhline(0.5, color="grey", linestyle=":", label="target 0.5")
    ax_frac.set(xlabel="batch", ylabel="achieved / matmul FLOP/s", title="decode FLOP efficiency (base)")
    for ax in (ax_tps, ax_frac):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_threads(args.threads)
    machine = machine_info(args.dtypes)
    machine["native_kernels"] = args.device == "cpu" and kernels.library() is not None
    peak = probe_for_run(args, args.dtypes, model_config(args.model), args.device)
    results: list[BatchResult] = []
    references: dict[str, Any] = {}
    steps: dict[str, Any] = {}  # dtype -> describe_step
    for dtype in args.dtypes:
        dtype_results, references[dtype], steps[dtype] = measure_dtype(dtype, args, peak_of(peak, dtype))
        results.extend(dtype_results)
    print_report(results, args.ref_rows)
    for dtype, step in steps.items():
        graphs = "" if step["graphs"] is None else f"; CUDA graphs {step['graphs']}"
        print(f"decode step {dtype}: {step['description']}{graphs}")
    settings = settings_of(args)
    payload = {"benchmark": "decode", "settings": settings, "machine": machine, "flop_count": FLOP_COUNT, "peak": peak,
               "decode_step": steps, "matmul_reference": references, "results": [asdict(r) for r in results]}
    save_results(args.out, "decode", payload, lambda path: plot(results, path, args.ref_rows, args.tasks))


if __name__ == "__main__":
    main()
