"""The machine's limit, measured inside the run that is compared with it: a GEMM peak probe and FLOP counts.

Why: a shared VM's speed drifts by tens of per cent between runs, so a peak measured once and written
down does not tell how close a given run came to what the machine could do at that moment. Every
benchmark therefore probes the peak itself (`measure_peaks`, once per run, for its dtypes) and
reports each result as a fraction of the compute floor of its workload: the workload's FLOPs
(`prefill_flops`, `decode_step_flops`, `generation_flops`) at the best measured rate
(`compute_floor_s`), over the measured time (`fraction_of_floor`). 1.0 would be every counted FLOP
at the best GEMM rate the probe saw; the fraction can pass 1 only where the probe missed the peak
(a short, noisy probe) or where the work counted was not done (a prefix-cache hit).

FLOPs counted, everywhere: 2 * (rows x weights) for every linear projection (q|k|v, o, the MLP's
input -- gate|up for llama, fc for gpt2 -- and down, every layer), the LM head for each row whose
logits are computed, and attention 4 * layers * num_heads * head_dim per (query, key) pair (Q.K^T
and P.V; causal: a query at position p attends p + 1 keys). Not counted: embedding lookup, norms,
RoPE, activation functions, softmax, KV writes, sampling and adapters (all O(tokens * d) or a few
per cent of it), so the floor is a lower bound on any implementation's time.

The probe times `torch.mm` on the model's GEMM shapes (`model_shapes`, derived from its config) in
the token-major layout `F.linear` uses, x [rows, in] @ W[out, in].t(): other layouts of emulated
bf16 (CPUs without AVX-512 BF16) run 3-30x slower and would take seconds per call. Where the CPU
has AVX-512 BF16 it also times the project's native bf16 projection (`prad.kernels.linear_bf16`,
feature-major W [out, in] @ x [in, P], P padded to a multiple of 16; FLOPs of the real rows only).
Each rate is the best of several short timed loops (`best_rate`), so a neighbour's burst lowers
fewer samples than it would lower one long loop.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from bench.common import parse_ints
from prad import kernels
from prad.config import ModelConfig, model_config_from_hf
from prad.machine import has_native_bf16

DEFAULT_SECONDS = 0.15  # timed seconds per probed (backend, dtype, shape); the default probe stays under ~20 s
DEFAULT_TOKENS = (64, 512, 2048)  # prefill: tokens per token-major pass
DEFAULT_BATCHES = (1, 8, 32, 64)  # decode: rows per step
CHUNKS = 5  # timed loops per measurement; the best one is the rate
TORCH_MM, NATIVE = "torch.mm", "prad linear_bf16"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FLOP_COUNT = ("2 * rows * weights for every linear projection (q|k|v, o, MLP in, down; every layer) and the LM head "
              "of each row whose logits are computed, + attention 4 * layers * heads * head_dim per (query, key) "
              "pair, causal; embedding, norms, RoPE, activations, softmax, KV writes, sampling, adapters not counted")


@dataclass(frozen=True)
class GemmShape:
    """One product [rows, inner] x [inner, cols] of the model: rows are tokens (prefill) or batch rows (decode)."""

    name: str
    rows: int
    inner: int
    cols: int

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.inner * self.cols


# --- FLOP counts ------------------------------------------------------------------------------------------


def projection_dims(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Each layer's projections as name -> (in features, out features); q|k|v and the MLP input fused."""
    d, inter = config.hidden_size, config.intermediate_size
    mlp_in = 2 * inter if config.family == "llama" else inter
    return {"qkv": (d, config.q_size + 2 * config.kv_size), "o": (config.q_size, d),
            "mlp_in": (d, mlp_in), "down": (inter, d)}


def layer_weight_count(config: ModelConfig) -> int:
    """Projection weights every token multiplies, over all layers (the LM head not included)."""
    return config.num_layers * sum(i * o for i, o in projection_dims(config).values())


def linear_weight_count(config: ModelConfig) -> int:
    """Weights multiplied once per generated token: every layer's projections plus the LM head."""
    return layer_weight_count(config) + config.vocab_size * config.hidden_size


def attention_flops(config: ModelConfig, pairs: int) -> float:
    """Q.K^T and P.V over `pairs` (query, key) pairs, every layer and head."""
    return 4.0 * config.num_layers * config.num_heads * config.head_dim * pairs


def prefill_flops(config: ModelConfig, prompt_len: int, rows: int = 1, logits_rows: int | None = None) -> float:
    """FLOPs of prefilling `rows` prompts of `prompt_len` tokens from position 0, causal attention, with
    the LM head on `logits_rows` rows (default: one per prompt, its last token, as the prefill runner does)."""
    logits = rows if logits_rows is None else logits_rows
    projections = 2.0 * rows * prompt_len * layer_weight_count(config)
    attention = rows * attention_flops(config, prompt_len * (prompt_len + 1) // 2)
    return projections + attention + 2.0 * logits * config.vocab_size * config.hidden_size


def decode_step_flops(config: ModelConfig, batch: int, num_keys: int) -> float:
    """FLOPs of one decode step of `batch` rows that each attend `num_keys` keys (their position + 1)."""
    return 2.0 * batch * linear_weight_count(config) + batch * attention_flops(config, num_keys)


def generation_flops(config: ModelConfig, prompt_lens: Iterable[int], gen: int) -> float:
    """FLOPs of a workload: each prompt prefilled (its first token from the prefill logits), then
    `gen` - 1 decode steps, step s of a prompt of length P at position P + s (P + s + 1 keys)."""
    total = 0.0
    for length in prompt_lens:
        total += prefill_flops(config, length)
        total += sum(decode_step_flops(config, 1, length + s + 1) for s in range(gen - 1))
    return total


def compute_floor_s(workload_flops: float, peak_flops_per_s: float) -> float:
    """Seconds the workload would take with every counted FLOP at the peak rate."""
    return workload_flops / peak_flops_per_s


def fraction_of_floor(workload_flops: float, seconds: float, peak_flops_per_s: float | None) -> float | None:
    """compute floor / measured seconds (= achieved FLOP/s / peak FLOP/s); None without a peak."""
    if peak_flops_per_s is None or seconds <= 0:
        return None
    return compute_floor_s(workload_flops, peak_flops_per_s) / seconds


# --- the shapes that matter --------------------------------------------------------------------------------


def model_config(model: str | None = None) -> ModelConfig:
    """The model's config (default: the embedded model) without loading its weights."""
    from prad.loading import resolve_model_dir

    return model_config_from_hf(json.loads((resolve_model_dir(model) / "config.json").read_text()))


def model_shapes(config: ModelConfig, tokens: Sequence[int] = DEFAULT_TOKENS,
                 batches: Sequence[int] = DEFAULT_BATCHES) -> list[GemmShape]:
    """The model's projections at each prefill token count and each decode batch, plus the LM head at
    each batch (prefill computes logits for one row per prompt, decode for every row); one entry per
    distinct (rows, inner, cols), named by its first use."""
    shapes: dict[tuple[int, int, int], GemmShape] = {}

    def add(name: str, rows: int, inner: int, cols: int) -> None:
        shapes.setdefault((rows, inner, cols), GemmShape(name, rows, inner, cols))

    for phase, counts in (("prefill T", tokens), ("decode B", batches)):
        for rows in counts:
            for name, (inner, cols) in projection_dims(config).items():
                add(f"{phase}={rows} {name}", rows, inner, cols)
    for rows in batches:
        add(f"decode B={rows} lm_head", rows, config.hidden_size, config.vocab_size)
    return list(shapes.values())


# --- the probe --------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_rate(fn: Callable[[], object], flops: float, seconds: float, device: torch.device) -> float:
    """FLOP/s of `fn` (`flops` per call): one untimed call, then timed loops of about seconds / CHUNKS
    each (at least one call) until `seconds` have passed; the best loop's rate."""
    fn()
    synchronize(device)
    best, calls, spent = 0.0, 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        best, spent = max(best, calls * flops / max(elapsed, 1e-9)), spent + elapsed
        if spent >= seconds:
            return best
        calls = max(1, int(seconds / CHUNKS / max(elapsed / calls, 1e-9)))


def torch_mm_call(shape: GemmShape, dtype: torch.dtype, device: torch.device) -> Callable[[], object]:
    """torch.mm of x [rows, inner] and the transposed view of a contiguous weight [cols, inner] (F.linear's layout)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.rows, shape.inner, generator=gen).to(device, dtype)
    weight = torch.randn(shape.cols, shape.inner, generator=gen).to(device, dtype)
    return lambda: torch.mm(x, weight.t())


def native_call(shape: GemmShape, threads: int) -> Callable[[], object]:
    """The native bf16 projection weight [cols, inner] @ x [inner, P], P = rows padded to a multiple of 16."""
    columns = -(-shape.rows // kernels.LINEAR_COLUMN_MULTIPLE) * kernels.LINEAR_COLUMN_MULTIPLE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.inner, columns, generator=gen).to(torch.bfloat16)
    weight = torch.randn(shape.cols, shape.inner, generator=gen).to(torch.bfloat16)
    return lambda: kernels.linear_bf16(weight, x, None, threads)


def native_bf16_status(device: torch.device) -> tuple[bool, str]:
    """Whether the native bf16 projection can be probed here, and why not where it cannot. The CPU
    flags are checked first, so a machine without AVX-512 BF16 never compiles the kernels for this."""
    if device.type != "cpu":
        return False, f"native kernels run on the CPU only (device {device.type})"
    if not has_native_bf16():
        return False, "the CPU has no AVX-512 BF16 / AMX (bf16 is emulated; no native bf16 kernel)"
    if not kernels.supports_linear(torch.bfloat16, device):
        return False, "the native kernels are unavailable (disabled, no compiler or no AVX-512 BF16 build)"
    return True, "available"


def backends_for(dtype: str, native: bool) -> list[str]:
    return [TORCH_MM, NATIVE] if dtype == "bfloat16" and native else [TORCH_MM]


def measure_peaks(dtypes: Sequence[str], shapes: Sequence[GemmShape], seconds: float = DEFAULT_SECONDS,
                  device: str | torch.device = "cpu", threads: int | None = None) -> dict[str, Any]:
    """The best achieved FLOP/s per (backend, dtype, shape), and per dtype the best of them (`peak_of`).

    dtypes: "float32" and/or "bfloat16"; threads: the native kernel's pool (default torch's threads).
    Returns {"seconds_per_shape", "device", "threads", "native_bf16": {"available", "reason"},
    "shapes": [GemmShape...], "rates": [{"backend", "dtype", "shape", "rows", "inner", "cols",
    "flops_per_s"}...], "best": {dtype: {"flops_per_s", "backend", "shape"}}, "flop_count", "seconds"}.
    """
    dev = torch.device(device)
    threads = threads or torch.get_num_threads()
    native, reason = native_bf16_status(dev) if "bfloat16" in dtypes else (False, "bfloat16 not probed")
    jobs = [(dtype, backend, shape) for dtype in dtypes for backend in backends_for(dtype, native) for shape in shapes]
    rates: list[dict[str, Any]] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for dtype, backend, shape in tqdm(jobs, desc="peak probe", unit="gemm", leave=False):
            fn = native_call(shape, threads) if backend == NATIVE else torch_mm_call(shape, DTYPES[dtype], dev)
            rates.append({"backend": backend, "dtype": dtype, "shape": shape.name, "rows": shape.rows,
                          "inner": shape.inner, "cols": shape.cols,
                          "flops_per_s": best_rate(fn, shape.flops, seconds, dev)})
    best = {dtype: max((r for r in rates if r["dtype"] == dtype), key=lambda r: r["flops_per_s"]) for dtype in dtypes}
    return {"seconds_per_shape": seconds, "device": str(dev), "threads": threads,
            "native_bf16": {"available": native, "reason": reason}, "shapes": [asdict(s) for s in shapes],
            "rates": rates,
            "best": {d: {k: r[k] for k in ("flops_per_s", "backend", "shape")} for d, r in best.items()},
            "flop_count": FLOP_COUNT, "seconds": time.perf_counter() - start}


def peak_of(peak: dict[str, Any] | None, dtype: str) -> float | None:
    """The best FLOP/s the probe measured for `dtype`; None without a probe or for a dtype it skipped."""
    if peak is None or dtype not in peak["best"]:
        return None
    return float(peak["best"][dtype]["flops_per_s"])


def or_dash(value: float | None) -> object:
    """A table cell: "-" where there is no value (e.g. no fraction of the floor without a probe)."""
    return "-" if value is None else value


def describe(peak: dict[str, Any] | None) -> str:
    """One line per dtype: its peak, where it was reached, and the native kernel's status."""
    if peak is None:
        return "peak probe skipped (--no-peak-probe): no fraction of the compute floor"
    lines = [f"peak {dtype}: {b['flops_per_s'] / 1e9:.1f} GFLOP/s ({b['backend']}, {b['shape']})"
             for dtype, b in peak["best"].items()]
    lines.append(f"peak probe: {len(peak['rates'])} GEMMs in {peak['seconds']:.1f} s, {peak['threads']} threads; "
                 f"native bf16: {peak['native_bf16']['reason']}")
    return "\n".join(lines)


# --- the benchmarks' command line -------------------------------------------------------------------------


def add_probe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-peak-probe", dest="peak_probe", action="store_false",
                        help="skip the GEMM peak probe (no fraction of the compute floor is reported)")
    parser.add_argument("--peak-seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"timed seconds per probed GEMM (default {DEFAULT_SECONDS})")
    tokens, batches = (",".join(map(str, counts)) for counts in (DEFAULT_TOKENS, DEFAULT_BATCHES))
    parser.add_argument("--peak-tokens", type=parse_ints, default=list(DEFAULT_TOKENS),
                        help=f"prefill token counts of the probed shapes (default {tokens})")
    parser.add_argument("--peak-batches", type=parse_ints, default=list(DEFAULT_BATCHES),
                        help=f"decode batches of the probed shapes (default {batches})")


def probe_for_run(args: argparse.Namespace, dtypes: Sequence[str], config: ModelConfig,
                  device: str = "cpu") -> dict[str, Any] | None:
    """The run's peak probe (`add_probe_args` flags) on `config`'s shapes; None with --no-peak-probe."""
    if not args.peak_probe:
        return None
    peak = measure_peaks(dtypes, model_shapes(config, args.peak_tokens, args.peak_batches), args.peak_seconds,
                         device)
    print(describe(peak))
    return peak
