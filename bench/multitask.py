"""Multi-task end to end: R concurrent requests spread over N tasks, PrAd Serve vs conventional adapters.

The PrAd paper's Table 4 setting (GPT-2 Large on an A100 there; the default SmolLM2 on this CPU
here): for N tasks (`--tasks`, default 1,8,16,64), `--requests` R (64) requests, request i using task
i mod N, each with a `--prompt-len` P (64) token prompt and generating exactly `--gen` G (64) tokens
(EOS ignored, greedy). Every arm runs on the same base model, dtype (`--dtypes`, default float32),
prompts and adapter weights (random, non-identity: init_tensors with up/B std `--adapter-scale`,
rank `--rank` 16 as in the paper's Table 4, LoRA on q and v with alpha 16). Arms (`--arms`):

* prad-pa, prad-lora: PrAd Serve end to end through its HTTP API, embedded mode (build_app with
  role=all, transport=inproc, served by uvicorn on a loopback port in this process). One adapter
  folder per task (prad-pa or prad-lora, written like `prad adapters init`); all R requests sent at
  once (`POST /generate`, stream=true, ignore_eos=true, max_new_tokens=G, temperature 0) by a load
  generator in its own process (bench/http_load.py: plain asyncio HTTP/1.1, light on CPU). Adapters
  act on the prompt only; one adapter-free decode batch serves every task.
* prad-pa-grpc, prad-lora-grpc: the same with role=all, transport=grpc on a free loopback port, so
  every KV handoff is serialised and crosses a real gRPC stream.
* base: the same embedded server with task "base" (no adapter at all): the floor PrAd should reach.
* prad-pa-whole, base-whole: prad-pa and base with plain (non-streamed) requests: each client gets
  one JSON answer when its request ends, so the run has no prefill/decode split.
* lora-per-task, pa-per-task: conventional LoRA / parallel adapter, the paper's baseline. Each
  task's requests form one batch, tasks run one after another, and the adapter applies to every
  token: prompt and every decode step. Our engine code without the server: Model.forward + KVCache
  + RowAdapters (mask all ones) for one prefill of the task's batch, then G - 1 steps of the decode
  service's own decode step (the runner's step backend, prad/decode_step.py) with the same hooks.
* lora-mixed: conventional LoRA with all R requests in one batch and per-row adapters at every
  decode step (the Punica / S-LoRA approach), same engine code. Each batch's adapter bank is gathered
  once per layer and reused by every step (as Punica's resident weights are), see `freeze_banks`.
* peft-lora-mixed: Hugging Face PEFT's mixed-adapter batch inference, the library most users reach
  for: the converted default model loaded by transformers (AutoModelForCausalLM), max(N) LoRA
  adapters with the same weights added to one PeftModel, `generate(..., adapter_names=[...])`,
  greedy, max_new_tokens = min_new_tokens = G (min_new_tokens masks EOS rather than ignoring it).
* base-loop: the base model in the same engine loop as the conventional arms, all R rows in one
  batch, no hooks: the cost of the maths alone, without server, HTTP or continuous batching.

What is timed, per run (wall clock; the median of `--repeats` runs, arms interleaved, is reported):

* server arms: from just before the R requests are sent (connections already open) until the last
  stream ends. prefill = until the last request's first SSE token (every prompt prefilled and its
  first token sampled, i.e. the largest TTFT); decode = the rest. With all prompts in one prefill
  pass (`--max-prefill-tokens` defaults to R x P) the two phases barely overlap. The server's own
  Prometheus metrics (/metrics, scraped before and after each run) are recorded as a cross-check:
  mean per-request prad:request_prefill_time_seconds, prad:time_to_first_token_seconds and
  prad:e2e_request_latency_seconds (histogram sum / count deltas). They cannot give the wall-clock
  split themselves: per-request histograms of a batched run overlap (summing them overcounts), and
  today the prefill histogram runs from arrival (it includes queueing; the queue-time histogram is
  never observed), so the split comes from the client's SSE timestamps.
* loop arms: prefill = the prompt forward passes, decode = the decode steps (summed over tasks for
  the per-task arms; total = everything including building tensors and hooks).
* peft-lora-mixed: prefill = until generate's first logits-processor call (prompt forward done),
  decode = the rest of `generate`.

Reported per arm and N: total, prefill and decode seconds, generated tokens/s (R x G / total), the
speed-up over lora-per-task (its time / this arm's time) and the time ratio to base and base-loop.
Token agreement between arms that compute the same thing (base vs base-loop, inproc vs grpc, the
three LoRA baselines, compared up to the first EOS) is checked on the first repeat. Targets (issue
10), evaluated at the largest N: PrAd-PA >= x14 faster than lora-per-task, >= x1.5 faster than
lora-mixed and peft-lora-mixed, PrAd (PA and LoRA) within 10% of base.

Distance to the machine's limit: before any model is loaded the run probes the peak GEMM rate of each
dtype (bench/peak.py; `--no-peak-probe` skips it). Every arm is held to the same compute floor, the
base model's FLOPs for the workload at that peak (`bench.peak.generation_flops`: R prompts of P tokens
prefilled, LM head on each prompt's last token, then G - 1 decode steps per request with the LM head;
2 * tokens * weights for every projection, causal attention 4 * layers * heads * head_dim per (query,
key) pair; not counted: embedding, norms, RoPE, SiLU, softmax, KV writes, sampling, and the adapters'
own FLOPs, so an arm that applies adapters to every token shows its extra work as a lower fraction).
`fraction_of_floor` = that floor / the arm's total time; prefill and decode phases get the same with
their part of the FLOPs and their seconds (where the arm times the phases).

Caveats: server and engines share one process (and the GIL), the client is a second process on the
same cores; the loop arms pay no HTTP, tokenizer or scheduling cost, so speed-ups of the server arms
over them are conservative.
Before the timed runs a short base-model calibration (prefill and decode step times per batch size)
feeds a cost model, scaled per arm by this run's measurements, that estimates how long the paper
preset and the `make bench-multitask` preset take on this machine (`--no-estimate` skips it).

Presets (`--preset`; explicit flags win): paper (the defaults) = the paper's Table 4 setting, R 64,
P 64, G 64, N 1,8,16,64, every arm, 3 repeats. On a 2-core CPU that is hours: every run of every
arm prefills 64 x 64 prompt tokens (~0.9 TFLOP, 10-40 s here) and the per-task arms decode at batch
1. make (what `make bench-multitask` runs, sized for ~20-30 min on an idle 2-core machine) keeps 64
requests, up to 64 tasks and 3 repeats but differs from the paper in: 16-token prompts and 16
generated tokens (paper: 64 and 64), N = 8,16,64 (no N = 1) and 7 arms (prad-pa, prad-lora,
prad-pa-grpc, base, lora-per-task, lora-mixed, peft-lora-mixed; no pa-per-task, prad-lora-grpc,
base-loop). The run prints which settings differ from the paper's and its estimate of both presets.
Writes multitask.json and multitask.png to `--out` (default bench/results/).

Run from the repo root: `python -m bench.multitask` (paper preset) or, for a smoke run,
`python -m bench.multitask --tasks 1,8 --requests 8 --prompt-len 16 --gen 8 --repeats 1`.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, cast

import httpx
import torch
from tqdm import tqdm

from bench.common import (
    add_common_args,
    format_table,
    load,
    machine_info,
    median,
    parse_ints,
    pyplot,
    run_http_load,
    save_results,
    serve_app,
    settings_of,
    setup_threads,
    synchronize,
    time_call,
)
from bench.peak import (
    FLOP_COUNT,
    add_probe_args,
    fraction_of_floor,
    generation_flops,
    model_config,
    peak_of,
    prefill_flops,
    probe_for_run,
)
from decode_service.runner import choose_step_backend
from launcher.local import free_port
from launcher.roles import build_app
from launcher.settings import ServeSettings
from prad.adapters import Adapter, AdapterConfig, RowAdapters, save_adapter
from prad.adapters.io import init_tensors
from prad.config import ModelConfig
from prad.cpu_decode import CpuStepBackend, step_with_hooks
from prad.kv_cache import KVCache
from prad.loading import LoadedModel
from prad.model import Model


class ServerArm(NamedTuple):
    variant: str | None  # adapter variant, None for task "base"
    transport: str
    stream: bool = True  # streamed (SSE) requests, else one JSON answer each


SERVER_ARMS = {
    "prad-pa": ServerArm("prad-pa", "inproc"), "prad-lora": ServerArm("prad-lora", "inproc"),
    "prad-pa-grpc": ServerArm("prad-pa", "grpc"), "prad-lora-grpc": ServerArm("prad-lora", "grpc"),
    "base": ServerArm(None, "inproc"),
    "prad-pa-whole": ServerArm("prad-pa", "inproc", stream=False),
    "base-whole": ServerArm(None, "inproc", stream=False),
}
LOOP_ARMS = {  # arm -> (conventional variant or None, per task?)
    "lora-per-task": ("lora", True), "pa-per-task": ("pa", True), "lora-mixed": ("lora", False),
    "base-loop": (None, False),
}
PEFT_ARM = "peft-lora-mixed"
ARMS = (*SERVER_ARMS, *LOOP_ARMS, PEFT_ARM)
PER_TASK_REF, BASE_REF, BASE_LOOP_REF = "lora-per-task", "base", "base-loop"
PAPER = {"requests": 64, "prompt_len": 64, "gen": 64, "tasks": [1, 8, 16, 64], "repeats": 3, "arms": list(ARMS)}
PRESETS: dict[str, dict[str, Any]] = {
    "paper": PAPER,
    # `make bench-multitask`, sized for a 2-core CPU (see the module docstring): 64 requests over up to
    # 64 tasks and 3 repeats as in the paper, but 16-token prompts and 16 generated tokens (paper: 64
    # and 64), N = 8, 16, 64 (no N = 1), and 7 arms (no pa-per-task, prad-lora-grpc, base-loop).
    "make": {"requests": 64, "prompt_len": 16, "gen": 16, "tasks": [8, 16, 64], "repeats": 3,
             "arms": ["prad-pa", "prad-lora", "prad-pa-grpc", "base", "lora-per-task", "lora-mixed", PEFT_ARM]},
}
PAPER_TABLE4_MS = {  # GPT-2 Large, A100, 64-token prompts and outputs: total ms per task count
    "LoRA": {8: 1775, 16: 2820, 64: 8729}, "PA": {8: 953, 16: 1352, 64: 3499},
    "PrAd-LoRA": {8: 510, 16: 542, 64: 654}, "PrAd-PA": {8: 498, 16: 519, 64: 583},
}
PAPER_SPEEDUP_PRAD_PA = {8: 2.57, 16: 4.43, 64: 13.96}  # Table 4, PrAd-PA total vs LoRA total
WORD_RE = re.compile(r" [a-z]{3,10}")
LORA_ALPHA = 16.0
LORA_TARGETS = ("q", "v")
GRPC_HOST = "127.0.0.1"
LOAD_TIMEOUT_S = 3600.0  # one run of the load generator
SERVER_METRICS = {"prefill_s": "prad:request_prefill_time_seconds", "ttft_s": "prad:time_to_first_token_seconds",
                  "e2e_s": "prad:e2e_request_latency_seconds"}


# --- workload and adapters -------------------------------------------------------------------------


@dataclass
class Workload:
    """The R requests: prompt text (what the server gets) and its token ids (what the loops get)."""

    texts: list[str]
    prompt_ids: list[list[int]]  # [R][P], exactly what the server's tokenizer makes of `texts`
    gen: int  # tokens generated per request, the first one from prefill included

    def task_of(self, num_tasks: int) -> list[int]:
        return [i % num_tasks for i in range(len(self.texts))]


@dataclass
class TaskAdapters:
    """max(N) tasks per family: served folders for PrAd, in-memory conventional twins with equal weights."""

    served: dict[str, list[str]]  # "prad-pa" | "prad-lora" -> task ids, written under `root`
    conventional: dict[str, list[Adapter]]  # "pa" | "lora" -> one per task, model device and dtype
    root: Path


def single_token_words(tokenizer: Any, vocab_size: int) -> list[int]:
    """Ids of tokens that are ' word' and tokenize back to themselves alone."""
    ids = []
    for i in range(100, min(vocab_size, 20000)):
        text = tokenizer.decode([i])
        if WORD_RE.fullmatch(text) and tokenizer(text).input_ids == [i]:
            ids.append(i)
    return ids


def build_workload(loaded: LoadedModel, requests: int, prompt_len: int, gen: int, seed: int) -> Workload:
    """Random word prompts whose text tokenizes to exactly `prompt_len` tokens (checked)."""
    words = single_token_words(loaded.tokenizer, loaded.config.vocab_size)
    gen_ = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(words), (requests, prompt_len), generator=gen_).tolist()
    prompt_ids = [[words[j] for j in row] for row in picks]
    texts = [str(loaded.tokenizer.decode(ids)) for ids in prompt_ids]
    for text, ids in zip(texts, prompt_ids, strict=True):
        if loaded.tokenizer(text).input_ids != ids:
            raise RuntimeError(f"prompt {text[:40]!r}... does not round-trip through the tokenizer")
    return Workload(texts, prompt_ids, gen)


def build_adapters(loaded: LoadedModel, num_tasks: int, rank: int, scale: float, seed: int,
                   root: Path) -> TaskAdapters:
    """Write prad-pa and prad-lora task folders; keep pa / lora twins (same tensors) in memory."""
    served: dict[str, list[str]] = {"prad-pa": [], "prad-lora": []}
    conventional: dict[str, list[Adapter]] = {"pa": [], "lora": []}
    model = loaded.model
    for variant, offset in (("prad-pa", 0), ("prad-lora", 1000)):
        for t in range(num_tasks):
            config = AdapterConfig(variant=variant, rank=rank, base_model_fingerprint=loaded.fingerprint,
                                   alpha=LORA_ALPHA, targets=LORA_TARGETS,
                                   metadata={"init": "random", "seed": seed + offset + t, "scale": scale})
            tensors = init_tensors(config, loaded.config, seed + offset + t, scale)
            name = f"{variant.removeprefix('prad-')}-{t:03d}"
            version = save_adapter(root / name, config, tensors)
            served[variant].append(name)
            twin = replace(config, variant=variant.removeprefix("prad-"))
            conventional[twin.variant].append(Adapter(twin, tensors, version).to(model.device, model.dtype))
    return TaskAdapters(served, conventional, root)


# --- results ---------------------------------------------------------------------------------------


@dataclass
class RunTiming:
    """One timed run of one arm at one task count."""

    total_s: float
    prefill_s: float | None
    decode_s: float | None
    tokens: list[list[int]] = field(repr=False)  # generated ids per request, request order
    server: dict[str, float] = field(default_factory=dict)  # mean per-request seconds from /metrics


@dataclass
class ArmResult:
    dtype: str
    arm: str
    num_tasks: int
    total_s: float  # median over repeats
    prefill_s: float | None
    decode_s: float | None
    tokens_per_s: float
    total_s_runs: list[float]
    speedup_vs_lora_per_task: float | None = None  # lora-per-task time / this time
    vs_base: float | None = None  # this time / base (server) time
    vs_base_loop: float | None = None  # this time / base-loop time
    server_metrics: dict[str, float] = field(default_factory=dict)  # medians of RunTiming.server
    flops: float = 0.0  # the workload's base-model FLOPs (bench/peak.py)
    peak_flops_per_s: float | None = None  # the run's peak probe, this dtype
    fraction_of_floor: float | None = None  # compute floor at that peak / total_s
    prefill_fraction_of_floor: float | None = None  # the prefill FLOPs' floor / prefill_s
    decode_fraction_of_floor: float | None = None  # the decode steps' floor / decode_s


# --- PrAd Serve over HTTP ----------------------------------------------------------------------------


@contextmanager
def serving(loaded: LoadedModel, adapters_root: Path, transport: str, args: argparse.Namespace, dtype: str,
            timeout_s: float = 120.0) -> Iterator[str]:
    """Build the app (role=all) and serve it with uvicorn on a loopback port; yields the base URL."""
    grpc_port = free_port()
    settings = ServeSettings.model_validate(dict(  # validated: transport and dtype come in as strings
        role="all", transport=transport, grpc_host=GRPC_HOST, grpc_port=grpc_port,
        decode_addr=f"{GRPC_HOST}:{grpc_port}", adapters=adapters_root, device=args.device, dtype=dtype,
        max_batch_size=args.requests, max_prefill_tokens=args.max_prefill_tokens, max_waiting=max(256, args.requests),
        max_loaded_adapters=max(64, 2 * max(args.tasks)), request_timeout_s=3600.0, log_level="warning",
        # Every run sends the same prompts: with the prefix cache on, repeats after the first would
        # prefill from it, unlike the workload's fresh prompts and unlike the loop arms.
        prefix_cache_mb=0))
    with serve_app(build_app(settings, loaded), timeout_s) as url:
        yield url


def parse_metrics(text: str) -> dict[str, tuple[float, float]]:
    """Histogram (sum, count) per SERVER_METRICS key, summed over task labels."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {key: [0.0, 0.0] for key in SERVER_METRICS}
    by_name = {name: key for key, name in SERVER_METRICS.items()}
    for family in text_string_to_metric_families(text):
        key = by_name.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                totals[key][0] += sample.value
            elif sample.name.endswith("_count"):
                totals[key][1] += sample.value
    return {k: (v[0], v[1]) for k, v in totals.items()}


def metrics_delta(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean seconds per request observed between two scrapes."""
    out = {}
    for key in SERVER_METRICS:
        count = after[key][1] - before[key][1]
        if count > 0:
            out[f"mean_{key}"] = (after[key][0] - before[key][0]) / count
    return out


def http_run(url: str, tasks: list[str], work: Workload, stream: bool = True) -> RunTiming:
    """One run of the load generator (bench/http_load.py, in its own process, as clients are) against
    the server at `url`; the server's /metrics scraped before and after. Without streaming, no phase
    split (prefill_s and decode_s None)."""
    job = {"url": url, "gen": work.gen, "stream": stream,
           "requests": [{"task": task, "prompt": work.texts[i], "prompt_tokens": len(work.prompt_ids[i])}
                        for i, task in enumerate(tasks)]}
    before = parse_metrics(httpx.get(url + "/metrics", timeout=30).text)
    out = run_http_load(job, LOAD_TIMEOUT_S)
    after = parse_metrics(httpx.get(url + "/metrics", timeout=30).text)
    prefill_s = out["prefill_s"]
    decode_s = None if prefill_s is None else out["total_s"] - prefill_s
    return RunTiming(out["total_s"], prefill_s, decode_s, out["tokens"], metrics_delta(before, after))


# --- conventional adapters in our engine -------------------------------------------------------------


def freeze_banks(hooks: RowAdapters) -> RowAdapters:
    """Gather each family's per-layer (per-row) weights once and reuse them for every step of the batch.

    RowAdapters re-stacks and re-gathers the bank on every call, fine for one prefill pass but a cost
    a decode loop with adapters (Punica, S-LoRA: resident banks) would not pay at every step.
    """
    for family in hooks.families.values():
        cache: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        gather = family.weights

        def weights(layer: int, dtype: torch.dtype, _gather: Any = gather,
                    _cache: dict[Any, Any] = cache) -> tuple[torch.Tensor, torch.Tensor]:
            if (layer, dtype) not in _cache:
                _cache[(layer, dtype)] = _gather(layer, dtype)
            return _cache[(layer, dtype)]

        family.weights = weights  # type: ignore[method-assign]
    return hooks


def hooks_for(model: Model, adapters: list[Adapter] | None, num_tokens: int) -> RowAdapters | None:
    """Conventional adapters: mask all ones, so they apply to every token they see."""
    if adapters is None:
        return None
    mask = torch.ones(len(adapters), num_tokens, device=model.device)
    return freeze_banks(RowAdapters(model.config, list(adapters), mask))


def service_step(model: Model, hooks: RowAdapters | None) -> Callable[[torch.Tensor, torch.Tensor, KVCache],
                                                                     torch.Tensor]:
    """The decode service's own step for `model` (the backend its runner picks): (token_ids [B],
    positions [B], kv) -> logits [B, V], with `hooks` (if any) applied at every step."""
    backend = choose_step_backend(model)
    if hooks is None:
        return backend.step
    if isinstance(backend, CpuStepBackend):
        return lambda ids, positions, kv: step_with_hooks(backend, ids, positions, kv, hooks)

    @torch.inference_mode()
    def reference_with_hooks(ids: torch.Tensor, positions: torch.Tensor, kv: KVCache) -> torch.Tensor:
        return model.forward(ids[:, None], positions[:, None], kv, hooks, logit_index=torch.zeros_like(ids))

    return reference_with_hooks


def engine_generate(model: Model, prompt_ids: list[list[int]], adapters: list[Adapter] | None,
                    gen: int) -> tuple[float, float, list[list[int]]]:
    """Greedy: one prefill forward, then gen - 1 decode steps, adapters (if any) on every token.

    Returns (prefill seconds, decode seconds, generated ids per row). Prompts share one length.
    """
    rows, length = len(prompt_ids), len(prompt_ids[0])
    start = time.perf_counter()
    kv = model.new_kv_cache(rows, length + gen)
    device = model.device
    ids = torch.tensor(prompt_ids, device=device)  # [B, P]
    positions = torch.arange(length, device=device).expand(rows, length)  # [B, P]
    logits = model.forward(ids, positions, kv, hooks_for(model, adapters, length),
                           logit_index=torch.full((rows,), length - 1, device=device))
    tokens = logits.argmax(dim=-1)  # [B]
    out = [tokens]
    synchronize()
    prefilled = time.perf_counter()
    decode_step = service_step(model, hooks_for(model, adapters, 1))  # adapters (if any) hooked in
    for step in range(gen - 1):
        logits = decode_step(tokens, torch.full((rows,), length + step, device=device), kv)
        tokens = logits.argmax(dim=-1)
        out.append(tokens)
    generated = torch.stack(out, dim=1).tolist()  # waits for the GPU, if any
    done = time.perf_counter()
    return prefilled - start, done - prefilled, generated


def loop_run(model: Model, work: Workload, adapters: list[Adapter] | None, num_tasks: int,
             per_task: bool) -> RunTiming:
    """per_task: one batch per task, tasks in turn; else every request in one batch (per-row adapters)."""
    task_of = work.task_of(num_tasks)
    groups = [[i for i, t in enumerate(task_of) if t == task] for task in range(num_tasks)] if per_task \
        else [list(range(len(task_of)))]
    tokens: list[list[int]] = [[] for _ in task_of]
    prefill = decode = 0.0
    start = time.perf_counter()
    for rows in groups:
        if not rows:
            continue
        row_adapters = None if adapters is None else [adapters[task_of[i]] for i in rows]
        p, d, out = engine_generate(model, [work.prompt_ids[i] for i in rows], row_adapters, work.gen)
        prefill, decode = prefill + p, decode + d
        for i, ids in zip(rows, out, strict=True):
            tokens[i] = ids
    return RunTiming(time.perf_counter() - start, prefill, decode, tokens)


# --- PEFT ------------------------------------------------------------------------------------------


class _FirstCallClock:
    """A logits processor that notes when generate first asks for a token (the prompt forward is done)."""

    def __init__(self) -> None:
        self.first_s: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first_s is None:
            self.first_s = time.perf_counter()
        return scores


class PeftArm:
    """The default model in transformers with every task's LoRA loaded into one PeftModel."""

    def __init__(self, loaded: LoadedModel, adapters: list[Adapter]) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        config = adapters[0].config
        hf: Any = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=loaded.model.dtype)  # transformers' types
        hf = hf.to(loaded.model.device).eval()
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha,  # type: ignore[arg-type]  # PEFT takes floats lora_dropout=0.0, bias="none",
                          target_modules=[f"{t}_proj" for t in config.targets])
        self.names = [f"t{t:03d}" for t in range(len(adapters))]
        self.model = get_peft_model(hf, lora, adapter_name=self.names[0])
        for name in self.names[1:]:
            self.model.add_adapter(name, lora)
        self._copy_weights(adapters)
        self.model.eval()
        self.eos_token_ids = loaded.config.eos_token_ids

    @torch.no_grad()
    def _copy_weights(self, adapters: list[Adapter]) -> None:
        """Ours: proj + (alpha/r) (x @ a) @ b with a [in, r], b [r, out]; PEFT: lora_A [r, in], lora_B [out, r]."""
        from peft.tuners.lora import LoraLayer

        pattern = re.compile(r"layers\.(\d+)\.self_attn\.([qkvo])_proj$")
        num_layers = 0
        for module_name, module in self.model.named_modules():
            match = pattern.search(module_name)
            if not isinstance(module, LoraLayer) or match is None:
                continue
            lora_a, lora_b = cast(Any, module.lora_A), cast(Any, module.lora_B)  # ModuleDicts
            layer, target = int(match[1]), match[2]
            for name, adapter in zip(self.names, adapters, strict=True):
                lora_a[name].weight.copy_(adapter.tensor(layer, f"lora_{target}.a").T)
                lora_b[name].weight.copy_(adapter.tensor(layer, f"lora_{target}.b").T)
            num_layers += 1
        if num_layers == 0:
            raise RuntimeError("no PEFT LoRA layers matched the model's attention projections")

    @torch.inference_mode()
    def last_logits(self, prompt_ids: list[int], task: int) -> torch.Tensor:
        ids = torch.tensor([prompt_ids], device=self.model.device)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[self.names[task]])
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def run(self, work: Workload, num_tasks: int) -> RunTiming:
        from transformers import LogitsProcessorList

        ids = torch.tensor(work.prompt_ids, device=self.model.device)
        clock = _FirstCallClock()
        names = [self.names[t] for t in work.task_of(num_tasks)]
        start = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                                  max_new_tokens=work.gen, min_new_tokens=work.gen, do_sample=False,
                                  logits_processor=LogitsProcessorList([clock]),
                                  pad_token_id=self.eos_token_ids[0] if self.eos_token_ids else None)
        synchronize()
        total = time.perf_counter() - start
        prefill = (clock.first_s or start) - start
        return RunTiming(total, prefill, total - prefill, out[:, ids.shape[1]:].tolist())


def peft_check(peft: PeftArm, model: Model, work: Workload, adapter: Adapter) -> float:
    """Max |logit difference| at the last prompt position, PEFT vs our engine, task 0, first prompt."""
    prompt = work.prompt_ids[0]
    length = len(prompt)
    device = model.device
    hooks = RowAdapters(model.config, [adapter], torch.ones(1, length, device=device))
    ours = model.forward(torch.tensor([prompt], device=device), torch.arange(length, device=device)[None], None,
                         hooks, logit_index=torch.tensor([length - 1], device=device))[0]
    return float((ours - peft.last_logits(prompt, 0)).abs().max())


# --- the arms ------------------------------------------------------------------------------------------


class ArmRunners:
    """Each arm's run function, num_tasks -> RunTiming; servers and the PEFT model start on first use."""

    def __init__(self, loaded: LoadedModel, work: Workload, adapters: TaskAdapters, args: argparse.Namespace,
                 dtype: str, stack: ExitStack) -> None:
        self.loaded, self.work, self.adapters, self.args, self.dtype, self.stack = \
            loaded, work, adapters, args, dtype, stack
        self.urls: dict[str, str] = {}
        self.peft: PeftArm | None = None
        self.checks: dict[str, float] = {}

    def url(self, transport: str) -> str:
        if transport not in self.urls:
            self.urls[transport] = self.stack.enter_context(
                serving(self.loaded, self.adapters.root, transport, self.args, self.dtype))
        return self.urls[transport]

    def peft_arm(self) -> PeftArm:
        if self.peft is None:
            self.peft = PeftArm(self.loaded, self.adapters.conventional["lora"])
            self.checks["peft_vs_engine_lora_max_abs_logit_diff"] = peft_check(
                self.peft, self.loaded.model, self.work, self.adapters.conventional["lora"][0])
        return self.peft

    def runner(self, arm: str, work: Workload | None = None) -> Callable[[int], RunTiming]:
        work = work or self.work
        if arm in SERVER_ARMS:
            variant, transport, stream = SERVER_ARMS[arm]
            url = self.url(transport)
            names = self.adapters.served[variant] if variant else None

            def run_server(n: int) -> RunTiming:
                tasks = [names[t] if names else "base" for t in work.task_of(n)]
                return http_run(url, tasks, work, stream)

            return run_server
        if arm in LOOP_ARMS:
            variant, per_task = LOOP_ARMS[arm]
            adapters = self.adapters.conventional[variant] if variant else None
            return lambda n: loop_run(self.loaded.model, work, adapters, n, per_task)
        peft = self.peft_arm()
        return lambda n: peft.run(work, n)

    def warm_up(self, arms: list[str], num_tasks: int) -> None:
        """One short untimed run per arm: every code path (and every task's adapter) touched once."""
        rows = min(len(self.work.texts), 8)
        small = Workload(self.work.texts[:rows], self.work.prompt_ids[:rows], 2)
        for arm in tqdm(arms, desc=f"warm-up {self.dtype}", unit="arm", leave=False):
            self.runner(arm, small)(min(num_tasks, rows))


def time_arms(runners: ArmRunners, arms: list[str], args: argparse.Namespace,
              ) -> tuple[dict[tuple[str, int], list[RunTiming]], dict[tuple[str, int], list[list[int]]]]:
    """`repeats` rounds over every task count and arm (arm order alternating); tokens kept from round one."""
    runs: dict[tuple[str, int], list[RunTiming]] = {(a, n): [] for a in arms for n in args.tasks}
    tokens: dict[tuple[str, int], list[list[int]]] = {}
    fns = {arm: runners.runner(arm) for arm in arms}
    with tqdm(total=args.repeats * len(args.tasks) * len(arms), desc=f"multitask {runners.dtype}",
              unit="run") as bar:
        for rep in range(args.repeats):
            for n in args.tasks:
                for arm in arms if rep % 2 == 0 else arms[::-1]:
                    bar.set_postfix_str(f"{arm} N={n}")
                    timing = fns[arm](n)
                    runs[(arm, n)].append(timing)
                    tokens.setdefault((arm, n), timing.tokens)
                    bar.write(f"  rep {rep + 1} N={n:>3} {arm:<16} total {timing.total_s:8.3f} s  prefill "
                              f"{_fmt(timing.prefill_s)} s  decode {_fmt(timing.decode_s)} s")
                    bar.update()
    return runs, tokens


def _fmt(value: float | None) -> str:
    return "     -" if value is None else f"{value:8.3f}"


def _median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def floor_fractions(result: ArmResult, config: ModelConfig, work: Workload, peak: float | None) -> None:
    """Set `result`'s FLOPs and fractions of the compute floor (bench/peak.py) for the whole workload and,
    where timed, its prefill and decode phases."""
    prompt_lens = [len(ids) for ids in work.prompt_ids]
    prefill = sum(prefill_flops(config, p) for p in prompt_lens)
    result.flops = generation_flops(config, prompt_lens, work.gen)
    result.peak_flops_per_s = peak
    result.fraction_of_floor = fraction_of_floor(result.flops, result.total_s, peak)
    if result.prefill_s is not None:
        result.prefill_fraction_of_floor = fraction_of_floor(prefill, result.prefill_s, peak)
    if result.decode_s is not None:
        result.decode_fraction_of_floor = fraction_of_floor(result.flops - prefill, result.decode_s, peak)


def summarise(runs: dict[tuple[str, int], list[RunTiming]], dtype: str, work: Workload, config: ModelConfig,
              peak: float | None = None) -> list[ArmResult]:
    results = []
    for (arm, n), timings in runs.items():
        total = median([t.total_s for t in timings])
        keys = {k for t in timings for k in t.server}
        results.append(ArmResult(
            dtype=dtype, arm=arm, num_tasks=n, total_s=total,
            prefill_s=_median_or_none([t.prefill_s for t in timings]),
            decode_s=_median_or_none([t.decode_s for t in timings]),
            tokens_per_s=len(work.texts) * work.gen / total, total_s_runs=[t.total_s for t in timings],
            server_metrics={k: median([t.server[k] for t in timings if k in t.server]) for k in sorted(keys)}))
    by_key = {(r.arm, r.num_tasks): r for r in results}
    for r in results:
        ref = by_key.get((PER_TASK_REF, r.num_tasks))
        base = by_key.get((BASE_REF, r.num_tasks))
        base_loop = by_key.get((BASE_LOOP_REF, r.num_tasks))
        r.speedup_vs_lora_per_task = None if ref is None else ref.total_s / r.total_s
        r.vs_base = None if base is None else r.total_s / base.total_s
        r.vs_base_loop = None if base_loop is None else r.total_s / base_loop.total_s
        floor_fractions(r, config, work, peak)
    return results


# --- checks, targets ------------------------------------------------------------------------------------

AGREEMENT_PAIRS = (("base", "base-loop"), ("prad-pa", "prad-pa-grpc"), ("prad-lora", "prad-lora-grpc"),
                   ("prad-pa", "prad-pa-whole"), ("base", "base-whole"),
                   ("lora-per-task", "lora-mixed"), ("lora-per-task", PEFT_ARM))


def _agree(a: list[int], b: list[int], eos: tuple[int, ...]) -> bool:
    """Equal up to the first EOS in either (PEFT's min_new_tokens masks EOS; ours emits it and goes on)."""
    cut = min([i for i, t in enumerate(a) if t in eos] + [i for i, t in enumerate(b) if t in eos] + [len(a)])
    return a[:cut] == b[:cut]


def token_agreement(tokens: dict[tuple[str, int], list[list[int]]], tasks: list[int],
                    eos: tuple[int, ...]) -> dict[str, float]:
    """Share of requests whose greedy tokens agree between arms computing the same maths."""
    out = {}
    for a, b in AGREEMENT_PAIRS:
        for n in tasks:
            if (a, n) in tokens and (b, n) in tokens:
                pairs = list(zip(tokens[(a, n)], tokens[(b, n)], strict=True))
                out[f"{a} == {b} (N={n})"] = sum(_agree(x, y, eos) for x, y in pairs) / len(pairs)
    return out


@dataclass
class Target:
    name: str
    value: float | None  # None: an arm it needs was not run
    threshold: float
    is_upper_bound: bool  # value must be <= threshold (else >=)

    @property
    def is_met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.threshold if self.is_upper_bound else self.value >= self.threshold


def targets(results: list[ArmResult], dtype: str) -> list[Target]:
    """Issue 10's targets (and issue 22's HTTP-at-engine-speed one), at the largest task count measured."""
    rs = [r for r in results if r.dtype == dtype]
    n = max(r.num_tasks for r in rs)
    by_arm = {r.arm: r.total_s for r in rs if r.num_tasks == n}

    def ratio(num: str, den: str) -> float | None:
        return by_arm[num] / by_arm[den] if num in by_arm and den in by_arm else None

    return [
        Target(f"{dtype} N={n}: PrAd-PA speed-up over lora-per-task", ratio(PER_TASK_REF, "prad-pa"), 14.0, False),
        Target(f"{dtype} N={n}: PrAd-PA speed-up over lora-mixed", ratio("lora-mixed", "prad-pa"), 1.5, False),
        Target(f"{dtype} N={n}: PrAd-PA speed-up over {PEFT_ARM}", ratio(PEFT_ARM, "prad-pa"), 1.5, False),
        Target(f"{dtype} N={n}: PrAd-PA time / base time", ratio("prad-pa", BASE_REF), 1.10, True),
        Target(f"{dtype} N={n}: PrAd-LoRA time / base time", ratio("prad-lora", BASE_REF), 1.10, True),
        *(Target(f"{dtype} N={n}: {arm} time / {BASE_LOOP_REF} time", ratio(arm, BASE_LOOP_REF), 1.05, True)
          for arm in ("prad-pa", "prad-pa-whole") if arm in by_arm),  # issue 22: HTTP at engine speed
    ]


# --- estimate of longer runs ------------------------------------------------------------------------------


@dataclass
class Calibration:
    """Base-model costs in our engine: one prefill of `rows` prompts, one decode step at a context."""

    prefill_s: dict[tuple[int, int], float] = field(default_factory=dict)  # (rows, prompt_len) -> s
    step_s: dict[tuple[int, int], float] = field(default_factory=dict)  # (rows, context) -> s


def batch_sizes(arm: str, num_tasks: int, requests: int) -> list[int]:
    """The batches an arm runs: one per task for the per-task arms, else one of every request."""
    if arm in LOOP_ARMS and LOOP_ARMS[arm][1]:
        return list(Counter(i % num_tasks for i in range(requests)).values())
    return [requests]


def shapes(config: dict[str, Any]) -> set[tuple[int, int, int]]:
    return {(b, config["prompt_len"], config["gen"]) for arm in config["arms"] for n in config["tasks"]
            for b in batch_sizes(arm, n, config["requests"])}


def _prefill_s(model: Model, ids: torch.Tensor, kv: KVCache) -> float:
    """Seconds of one base prefill of ids [rows, P] into kv (after one untimed single-row pass)."""
    rows, length = ids.shape
    positions = torch.arange(length, device=ids.device)
    last = torch.full((rows,), length - 1, device=ids.device)
    model.forward(ids[:1], positions[None], None, logit_index=last[:1])  # warm
    return time_call(lambda: model.forward(ids, positions.expand(rows, length), kv, logit_index=last))


def _step_s(model: Model, token_ids: torch.Tensor, context: int, kv: KVCache) -> float:
    """Median seconds of 3 decode steps of token_ids [rows] at position `context`."""
    positions = torch.full_like(token_ids, context)
    decode_step = service_step(model, None)
    return median([time_call(lambda: decode_step(token_ids, positions, kv)) for _ in range(3)])


@torch.inference_mode()
def calibrate(model: Model, needed: set[tuple[int, int, int]], cal: Calibration) -> None:
    """Time one base prefill per (rows, P) and the median of 3 decode steps per (rows, P + G/2)."""
    for rows, length, gen in tqdm(sorted(needed), desc="calibrate", unit="shape", leave=False):
        context = length + gen // 2
        kv = model.new_kv_cache(rows, length + gen)
        ids = torch.randint(100, 1000, (rows, length), device=model.device)
        if (rows, length) not in cal.prefill_s:
            cal.prefill_s[(rows, length)] = _prefill_s(model, ids, kv)
        if (rows, context) not in cal.step_s:
            cal.step_s[(rows, context)] = _step_s(model, ids[:, 0], context, kv)


def predicted_s(arm: str, num_tasks: int, config: dict[str, Any], cal: Calibration) -> float:
    p, g = config["prompt_len"], config["gen"]
    return sum(cal.prefill_s[(b, p)] + (g - 1) * cal.step_s[(b, p + g // 2)]
               for b in batch_sizes(arm, num_tasks, config["requests"]))


def estimate(results: list[ArmResult], current: dict[str, Any], cal: Calibration, setup_s: float,
             configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Seconds each config would take: per arm, the base-model cost model x this run's measured/model ratio.

    An arm this run did not measure gets the median ratio of the arms it did.
    """
    factors = {}
    for arm in current["arms"]:
        ratios = [r.total_s / predicted_s(arm, r.num_tasks, current, cal) for r in results if r.arm == arm]
        factors[arm] = median(ratios)
    fallback = median(list(factors.values()))
    out: dict[str, Any] = {"arm_factors": factors, "setup_s": setup_s, "load_average": list(os.getloadavg())}
    for name, config in configs.items():
        per_arm = {arm: factors.get(arm, fallback) * config["repeats"]
                   * sum(predicted_s(arm, n, config, cal) for n in config["tasks"]) for arm in config["arms"]}
        out[name] = {"config": config, "per_arm_s": per_arm, "total_s": setup_s + sum(per_arm.values())}
    return out


# --- one dtype --------------------------------------------------------------------------------------------


def current_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in PAPER}


def measure_dtype(dtype: str, args: argparse.Namespace, peak: float | None = None) -> dict[str, Any]:
    """The dtype's results, checks and targets; `peak`: the run's probed peak FLOP/s for it (None: no
    fraction of the floor)."""
    setup_start = time.perf_counter()
    loaded = load(dtype, args.device, args.model)
    work = build_workload(loaded, args.requests, args.prompt_len, args.gen, args.seed)
    cal = Calibration()
    configs = {"paper": PRESETS["paper"], "make": PRESETS["make"]}
    with tempfile.TemporaryDirectory(prefix="prad-bench-adapters-") as tmp, ExitStack() as stack:
        adapters = build_adapters(loaded, max(args.tasks), args.rank, args.adapter_scale, args.seed, Path(tmp))
        runners = ArmRunners(loaded, work, adapters, args, dtype, stack)
        runners.warm_up(args.arms, max(args.tasks))
        setup_s = time.perf_counter() - setup_start
        if args.estimate:
            needed = shapes(current_config(args)).union(*(shapes(c) for c in configs.values()))
            calibrate(loaded.model, needed, cal)
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        runs, tokens = time_arms(runners, args.arms, args)
        # The share of the cores this process got while timing: well under 1 when other work competes.
        cpu_share = (time.process_time() - cpu_start) / ((time.perf_counter() - wall_start) * torch.get_num_threads())
        checks = dict(runners.checks)
    results = summarise(runs, dtype, work, loaded.config, peak)
    checks.update(token_agreement(tokens, args.tasks, loaded.config.eos_token_ids))
    out: dict[str, Any] = {"results": results, "checks": checks, "targets": targets(results, dtype),
                           "cpu_share": cpu_share}
    if args.estimate:
        out["estimate"] = estimate(results, current_config(args), cal, setup_s, configs) | {"cpu_share": cpu_share}
        out["calibration"] = {"prefill_s": {f"{k[0]}x{k[1]}": v for k, v in cal.prefill_s.items()},
                              "step_s": {f"{k[0]}@{k[1]}": v for k, v in cal.step_s.items()}}
    return out


# --- output -----------------------------------------------------------------------------------------------


def print_report(results: list[ArmResult], arms: list[str]) -> None:
    headers = ["dtype", "N", "arm", "total s", "prefill s", "decode s", "tok/s", "frac of floor", "prefill frac",
               "decode frac", "x vs lora-task", "t/base", "t/base-loop"]

    def opt(v: float | None) -> object:
        return "-" if v is None else v

    order = {arm: i for i, arm in enumerate(arms)}
    rows = [[r.dtype, r.num_tasks, r.arm, r.total_s, opt(r.prefill_s), opt(r.decode_s), r.tokens_per_s,
             opt(r.fraction_of_floor), opt(r.prefill_fraction_of_floor), opt(r.decode_fraction_of_floor),
             opt(r.speedup_vs_lora_per_task), opt(r.vs_base), opt(r.vs_base_loop)]
            for r in sorted(results, key=lambda r: (r.dtype, r.num_tasks, order[r.arm]))]
    print(format_table(headers, rows))
    print("x vs lora-task = lora-per-task time / this time (the paper's speed-up); t/base = this time / base "
          "(server, task 'base') time; t/base-loop = this time / base-loop time; frac of floor = the base model's "
          "FLOPs for the workload at the run's probed peak / this time (prefill, decode: per phase). "
          "Medians over repeats.")


def print_targets(all_targets: list[Target]) -> None:
    print("targets (issue 10, at the largest N measured; they are stated for N=64):")
    for t in all_targets:
        op = "<=" if t.is_upper_bound else ">="
        state = {None: "not measured", True: "MET", False: "NOT MET"}[t.is_met]
        value = "-" if t.value is None else f"{t.value:.2f}"
        print(f"  {t.name}: {value} (target {op} {t.threshold:g}): {state}")


def print_estimates(estimates: dict[str, dict[str, Any]]) -> None:
    for dtype, est in estimates.items():
        load_avg = ", ".join(f"{x:.1f}" for x in est["load_average"])
        share = est["cpu_share"]
        print(f"estimated {dtype} run times on this machine as it is now (load average {load_avg}; this process "
              f"got {share:.0%} of its {torch.get_num_threads()} threads' cores while timing, so an idle machine "
              f"may need as little as ~{share:.0%} of these times):")
        for name in ("paper", "make"):
            cfg, per_arm = est[name]["config"], est[name]["per_arm_s"]
            print(f"  preset {name} (R={cfg['requests']} P={cfg['prompt_len']} G={cfg['gen']} "
                  f"N={','.join(map(str, cfg['tasks']))} repeats={cfg['repeats']}, {len(cfg['arms'])} arms): "
                  f"{est[name]['total_s'] / 60:.0f} min, idle bound ~{share * est[name]['total_s'] / 60:.0f} min "
                  f"(setup {est['setup_s']:.0f} s; longest arm {max(per_arm, key=per_arm.get)} "
                  f"{max(per_arm.values()) / 60:.0f} min)")


def plot(results: list[ArmResult], path: Path, args: argparse.Namespace) -> None:
    """Left: median end-to-end time vs N, one line per arm; right: speed-up over lora-per-task."""
    from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, ScalarFormatter

    plt = pyplot()
    dtypes = list(dict.fromkeys(r.dtype for r in results))
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(14, 4.8 * len(dtypes)), squeeze=False)
    for (ax_time, ax_speed), dtype in zip(axes, dtypes, strict=True):
        for arm in args.arms:
            rs = sorted((r for r in results if r.dtype == dtype and r.arm == arm), key=lambda r: r.num_tasks)
            style = "o-" if arm in SERVER_ARMS else ("x--" if arm != PEFT_ARM else "s:")
            xs = [r.num_tasks for r in rs]
            ax_time.plot(xs, [r.total_s for r in rs], style, label=arm)
            if rs and rs[0].speedup_vs_lora_per_task is not None:
                ax_speed.plot(xs, [r.speedup_vs_lora_per_task for r in rs], style, label=arm)
        paper = [(n, v) for n, v in PAPER_SPEEDUP_PRAD_PA.items() if n in args.tasks]
        if paper:
            ax_speed.plot(*zip(*paper, strict=True), "k*", markersize=10, label="paper PrAd-PA (A100)")
        ax_time.set_yscale("log")
        ax_time.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax_time.yaxis.set_major_formatter(ScalarFormatter())
        ax_time.yaxis.set_minor_formatter(NullFormatter())
        ax_time.set(ylabel="end-to-end seconds (median)",
                    title=f"{dtype}: {args.requests} requests, {args.prompt_len}-token prompts, {args.gen} tokens")
        ax_speed.set(ylabel="speed-up over lora-per-task (x)", title=f"{dtype}: lora-per-task time / arm time")
        for ax in (ax_time, ax_speed):
            ax.set_xscale("log", base=2)
            ax.set_xticks(args.tasks, [str(n) for n in args.tasks])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("number of tasks N")
            ax.legend(fontsize=7, ncol=2)
            ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line -----------------------------------------------------------------------------------------


def parse_arms(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    return arms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                        help="defaults for requests, prompt-len, gen, tasks, repeats, arms (default paper)")
    parser.add_argument("--tasks", type=parse_ints, default=None, help="comma-separated task counts N (paper: "
                        "1,8,16,64)")
    parser.add_argument("--requests", type=int, default=None, help="concurrent requests R (paper: 64)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens P (paper: 64)")
    parser.add_argument("--gen", type=int, default=None, help="generated tokens per request G (paper: 64)")
    parser.add_argument("--arms", type=parse_arms, default=None, help=f"comma-separated arms (paper: all of "
                        f"{', '.join(ARMS)})")
    parser.add_argument("--adapter-scale", type=float, default=0.1,
                        help="std of the adapters' up/B weights, as `prad adapters init --scale` (default 0.1)")
    parser.add_argument("--max-prefill-tokens", type=int, default=None,
                        help="server prefill token budget per pass (default R x P, at least 2048: one pass)")
    parser.add_argument("--no-estimate", dest="estimate", action="store_false",
                        help="skip the calibration and the run-time estimate of the paper and make presets")
    add_common_args(parser, default_dtypes="float32")
    add_probe_args(parser)
    parser.set_defaults(rank=16, repeats=None)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.max_prefill_tokens is None:
        args.max_prefill_tokens = max(2048, args.requests * args.prompt_len)
    if min(args.tasks) < 1 or args.requests < 1 or args.prompt_len < 1 or args.gen < 2 or args.repeats < 1:
        parser.error("tasks, requests, prompt-len and repeats must be >= 1, gen >= 2")
    return args


def _describe(differs: dict[str, dict[str, Any]]) -> str:
    if not differs:
        return "nothing (model and hardware aside)"
    parts = []
    for key, v in differs.items():
        if key == "arms":
            parts.append(f"arms without {','.join(a for a in v['paper'] if a not in v['this run']) or '-'}")
        else:
            parts.append(f"{key} {v['this run']} (paper {v['paper']})")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_threads(args.threads)
    machine = machine_info(args.dtypes)
    settings = settings_of(args)
    differs = {k: {"paper": PAPER[k], "this run": settings[k]} for k in PAPER if settings[k] != PAPER[k]}
    print(f"multitask: R={args.requests} P={args.prompt_len} G={args.gen} N={args.tasks} repeats={args.repeats} "
          f"dtypes={args.dtypes} arms={','.join(args.arms)}")
    print(f"differs from the paper's Table 4 setting: {_describe(differs)}")
    if os.getloadavg()[0] > machine["cores"]:
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {machine['cores']} cores: other work is running, "
              "timings will be slow and noisy")
    peak = probe_for_run(args, args.dtypes, model_config(args.model), args.device)
    results: list[ArmResult] = []
    all_targets: list[Target] = []
    per_dtype: dict[str, dict[str, Any]] = {}
    for dtype in args.dtypes:
        out = measure_dtype(dtype, args, peak_of(peak, dtype))
        results += out["results"]
        all_targets += out["targets"]
        per_dtype[dtype] = {k: v for k, v in out.items() if k not in ("results", "targets")}
    print_report(results, args.arms)
    for dtype, out in per_dtype.items():
        print(f"checks {dtype}: " + ", ".join(f"{k}: {v:.3g}" for k, v in out["checks"].items()))
    print_targets(all_targets)
    estimates = {d: out["estimate"] for d, out in per_dtype.items() if "estimate" in out}
    print_estimates(estimates)
    print(f"differs from the paper's Table 4 setting: {_describe(differs)}")
    payload = {"benchmark": "multitask", "settings": settings, "differs_from_paper": differs, "machine": machine,
               "paper_table4_ms": PAPER_TABLE4_MS, "peak": peak, "flop_count": FLOP_COUNT,
               "results": [asdict(r) for r in results], "targets": [asdict(t) | {"is_met": t.is_met}
                                                                    for t in all_targets],
               "per_dtype": per_dtype}
    save_results(args.out, "multitask", payload, lambda path: plot(results, path, args))


if __name__ == "__main__":
    main()
