"""What a lossy KV wire format costs in answers: dev-set outputs and scores per format, next to native.

For each example adapter in `--adapters` (default examples/adapters: sst2, e2e, multi30k) it takes
`--examples` (64) dev examples of the task (../shared/data/<task>, the seeded subset and input grouping
`prad eval` uses, inputs cut to the adapter's training cap), prefills each prompt with the adapter
through the serving PrefillRunner (first token from the adapted logits, as prefill serves it), sends
the prompt KV through each `--formats` wire format (kv_transfer.wire: encode_handoff, then the
receiver's parse_header + handoff_from_proto), and decodes greedily with the adapter-free DecodeRunner
(`--max-new-tokens`, default the task's). Prefill runs once per batch; only the KV's trip differs.

Reported per task and format, against native (which is lossless: its outputs are `prad eval`'s):
* exact: the fraction of examples whose whole output (token ids) is identical;
* prefix: the mean fraction of identical tokens before the first difference (common prefix over the
  longer output);
* answers: the fraction whose scored answer (first line of the text) is identical;
* the task metric (training.metrics.score on the first lines) and its change from native;
* the KV's relative RMS error after the trip, and its wire bytes per prompt token.
Also computed, no model run: KV bytes per token per format for fp32 and bf16 models of this layout.

Run from the repo root: `python -m bench.kv_wire_quality` (fp32, 64 examples per task), or a smoke run:
`python -m bench.kv_wire_quality --examples 2 --max-new-tokens 3`. Writes kv_wire_quality.json and .png
to `--out` (default bench/results/).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from bench.common import (
    DEFAULT_OUT,
    REPO_ROOT,
    format_table,
    load,
    machine_info,
    pyplot,
    save_results,
    settings_of,
    setup_threads,
)
from decode_service.runner import DecodeRunner
from kv_transfer.handoff import KVHandoff, KVLayout
from kv_transfer.wire import (
    KV_WIRE_FORMATS,
    encode_handoff,
    handoff_from_proto,
    kv_wire_num_bytes,
    parse_header,
    wire_encoding,
)
from prad.adapters import Adapter, load_adapter
from prad.loading import LoadedModel
from prad.model import Model
from prad.sampling import SamplingParams
from prefill_service.runner import ChunkInput, PrefillRunner
from training.batching import sorted_batches
from training.data import Example, Tokenizer, fit_input, load_eval_examples, subset
from training.evaluate import eval_examples, first_line
from training.metrics import PRIMARY_SCORE, score
from training.tasks import TaskSpec, format_prompt, resolve_task

EXAMPLE_ADAPTERS = REPO_ROOT / "examples" / "adapters"
DATA = REPO_ROOT.parent / "shared" / "data"
TASKS = ("sst2", "e2e", "multi30k")


@dataclass
class TaskRun:
    """One task's prompts and, per format, the output token ids and the KV's trip error."""

    task: str
    metric: str
    examples: list[Example]
    prompts: list[list[int]]
    outputs: dict[str, list[list[int]]]
    kv_sq_error: dict[str, float]  # sum of squared KV errors over every example
    kv_sq_norm: float  # sum of squared KV values
    wire_bytes: dict[str, int]  # KV bytes sent over every example
    wall_s: float


@dataclass
class Row:
    task: str
    metric: str
    kv_wire_format: str
    num_examples: int
    score: float  # the task's main score, 0-100
    score_change: float  # score - native's score
    scores: dict[str, float]
    exact: float  # fraction of examples whose output ids equal native's
    prefix: float  # mean fraction of identical tokens before the first difference
    answers: float  # fraction whose scored answer (first line) equals native's
    kv_rel_rms_error: float  # ||KV after the trip - KV|| / ||KV|| over the task
    wire_bytes_per_token: float


def wire_round_trip(kv: torch.Tensor, prompt: list[int], kv_wire_format: str, fingerprint: str) -> \
        tuple[torch.Tensor, int]:
    """The KV as a decode service receives it after the wire in `kv_wire_format`, and the bytes sent."""
    layers, _, heads, length, head_dim = kv.shape
    layout = KVLayout(layers, heads, head_dim, str(kv.dtype).removeprefix("torch."), length)
    handoff = KVHandoff("bench", "task", "v", fingerprint, prompt, 0, SamplingParams(1), None, layout, kv)
    header, data = encode_handoff(handoff, kv_wire_format)
    return handoff_from_proto(parse_header(header), data).kv, len(data)


@torch.inference_mode()
def greedy_decode(model: Model, kvs: list[torch.Tensor], first_tokens: list[int], max_new_tokens: int,
                  eos: set[int]) -> list[list[int]]:
    """Greedy output ids per row (the first token included, EOS kept when it ends a row), rows decoded
    together by the adapter-free DecodeRunner; a finished row's slot is refilled by the last running one."""
    lengths = [kv.shape[3] for kv in kvs]
    decoder = DecodeRunner(model, len(kvs), model.config.max_position_embeddings)
    decoder.ensure_capacity(max(lengths) + max_new_tokens)
    outputs = [[token] for token in first_tokens]
    for row, kv in enumerate(kvs):
        decoder.insert(row, kv)

    def cached(i: int) -> int:  # positions in row i's cache: its prompt and every output token but the newest
        return lengths[i] + len(outputs[i]) - 1

    running = list(range(len(kvs)))  # running[slot] = row
    while True:
        slot = 0
        while slot < len(running):
            i = running[slot]
            if outputs[i][-1] not in eos and len(outputs[i]) < max_new_tokens:
                slot += 1
                continue
            last = running.pop()
            if slot < len(running):
                decoder.move(len(running), slot, cached(last))
                running[slot] = last
        if not running:
            return outputs
        logits = decoder.decode([outputs[i][-1] for i in running], [cached(i) for i in running])
        for i, token in zip(running, logits.argmax(dim=-1).tolist(), strict=True):
            outputs[i].append(token)


def task_prompts(loaded: LoadedModel, adapter: Adapter, spec: TaskSpec, examples: list[Example]) -> list[list[int]]:
    """Prompt ids as `prad eval` builds them: the adapter's template, inputs cut to its training cap."""
    training: dict[str, Any] = adapter.config.metadata.get("training", {})
    tokenizer = cast(Tokenizer, loaded.tokenizer)
    cap, side = training.get("max_input_tokens"), training.get("truncate_side", "right")
    return [tokenizer(format_prompt(spec.template, fit_input(tokenizer, spec.template, ex.input, cap, side)))
            .input_ids for ex in examples]


def run_task(loaded: LoadedModel, adapter_dir: Path, data_dir: Path, args: argparse.Namespace, bar: tqdm) -> TaskRun:
    model = loaded.model
    adapter = load_adapter(adapter_dir, loaded.config, loaded.fingerprint).to(model.device, model.dtype)
    spec = resolve_task(adapter.config.metadata.get("task") or adapter_dir.name, adapter.config.prompt_template)
    examples = subset(eval_examples(load_eval_examples(data_dir / spec.name), spec.metric), args.examples)
    prompts = task_prompts(loaded, adapter, spec, examples)
    bar.total = (bar.total or 0) + len(examples) * len(args.formats)  # fewer than --examples when the split is small
    bar.refresh()
    max_new_tokens = args.max_new_tokens or spec.max_new_tokens
    eos = set(loaded.config.eos_token_ids)
    run = TaskRun(spec.name, spec.metric, examples, prompts, {f: [[] for _ in prompts] for f in args.formats},
                  dict.fromkeys(args.formats, 0.0), 0.0, dict.fromkeys(args.formats, 0), 0.0)
    start = time.perf_counter()
    for rows in sorted_batches([len(p) for p in prompts], args.batch_size):
        prefilled = PrefillRunner(model).run([ChunkInput(prompts[i], 0, adapter, None) for i in rows])
        first = [int(torch.argmax(out.logits)) for out in prefilled]
        run.kv_sq_norm += sum(float(out.kv.float().square().sum()) for out in prefilled)
        for fmt in args.formats:
            trips = [wire_round_trip(out.kv, prompts[i], fmt, loaded.fingerprint) for i, out in zip(rows, prefilled,
                                                                                                   strict=True)]
            run.wire_bytes[fmt] += sum(n for _, n in trips)
            run.kv_sq_error[fmt] += sum(float((kv.float() - out.kv.float()).square().sum())
                                        for (kv, _), out in zip(trips, prefilled, strict=True))
            outputs = greedy_decode(model, [kv for kv, _ in trips], first, max_new_tokens, eos)
            for i, ids in zip(rows, outputs, strict=True):
                run.outputs[fmt][i] = ids
            bar.update(len(rows))
    run.wall_s = time.perf_counter() - start
    return run


def common_prefix(a: list[int], b: list[int]) -> float:
    """Identical leading tokens over the longer output's length (1.0 when equal)."""
    n = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return n / max(len(a), len(b), 1)


def summarise(run: TaskRun, tokenizer: Tokenizer) -> list[Row]:
    answers = {fmt: [first_line(tokenizer.decode(ids, skip_special_tokens=True)) for ids in outs]
               for fmt, outs in run.outputs.items()}
    reference = "native" if "native" in run.outputs else next(iter(run.outputs))
    num_tokens = sum(len(p) for p in run.prompts)
    rows = []
    for fmt, outs in run.outputs.items():
        scores = score(run.metric, answers[fmt], [ex.target for ex in run.examples],
                       [ex.references for ex in run.examples])
        n = len(outs)
        rows.append(Row(run.task, run.metric, fmt, n, scores[PRIMARY_SCORE[run.metric]], 0.0, scores,
                        sum(a == b for a, b in zip(outs, run.outputs[reference], strict=True)) / n,
                        sum(common_prefix(a, b) for a, b in zip(outs, run.outputs[reference], strict=True)) / n,
                        sum(a == b for a, b in zip(answers[fmt], answers[reference], strict=True)) / n,
                        (run.kv_sq_error[fmt] / max(run.kv_sq_norm, 1e-30)) ** 0.5, run.wire_bytes[fmt] / num_tokens))
    base = next(r for r in rows if r.kv_wire_format == reference)
    for r in rows:
        r.score_change = r.score - base.score
    return rows


def bytes_per_token(loaded: LoadedModel) -> dict[str, dict[str, int]]:
    """KV bytes per prompt token on the wire, per model dtype and format (computed from the layout)."""
    c = loaded.config
    table: dict[str, dict[str, int]] = {}
    for dtype in ("float32", "bfloat16"):
        layout = KVLayout(c.num_layers, c.num_kv_heads, c.head_dim, dtype, 1)
        table[dtype] = {fmt: kv_wire_num_bytes(layout, wire_encoding(getattr(torch, dtype), fmt))
                        for fmt in KV_WIRE_FORMATS}
    return table


def differing_examples(run: TaskRun, tokenizer: Tokenizer, limit: int = 5) -> list[dict[str, str]]:
    """The first `limit` examples whose outputs differ between formats: input and each format's text."""
    shown: list[dict[str, str]] = []
    for i, ex in enumerate(run.examples):
        if len({tuple(outs[i]) for outs in run.outputs.values()}) > 1 and len(shown) < limit:
            shown.append({"input": ex.input, **{fmt: tokenizer.decode(outs[i], skip_special_tokens=True)
                                                for fmt, outs in run.outputs.items()}})
    return shown


def print_report(rows: list[Row], per_token: dict[str, dict[str, int]]) -> None:
    headers = ["task", "metric", "format", "n", "score", "vs native", "exact", "prefix", "answers", "KV rel err",
               "wire B/token"]
    print(format_table(headers, [[r.task, r.metric, r.kv_wire_format, r.num_examples, round(r.score, 2),
                                  f"{r.score_change:+.2f}", f"{r.exact:.3f}", f"{r.prefix:.3f}", f"{r.answers:.3f}",
                                  f"{r.kv_rel_rms_error:.2e}", f"{r.wire_bytes_per_token:,.0f}"] for r in rows]))
    for dtype, by_format in per_token.items():
        print(f"KV bytes per token, {dtype} model: " + ", ".join(f"{f} {n:,}" for f, n in by_format.items()))


def plot(rows: list[Row], path: Path) -> None:
    plt = pyplot()
    tasks = list(dict.fromkeys(r.task for r in rows))
    formats = list(dict.fromkeys(r.kv_wire_format for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    width = 0.8 / len(formats)
    for k, fmt in enumerate(formats):
        got = {r.task: r for r in rows if r.kv_wire_format == fmt}
        xs = [t + (k - (len(formats) - 1) / 2) * width for t in range(len(tasks))]
        left.bar(xs, [got[t].score for t in tasks], width, label=fmt)
        right.bar(xs, [got[t].exact for t in tasks], width, label=f"{fmt}: whole output")
        right.scatter(xs, [got[t].prefix for t in tasks], marker="_", s=200, color="black")
    left.set(ylabel="dev score (accuracy / BLEU)", title="task metric per KV wire format")
    right.set(ylabel="fraction", ylim=(0, 1.05), title="agreement with native (bars: identical outputs; "
              "ticks: mean prefix)")
    for ax in (left, right):
        ax.set_xticks(range(len(tasks)), [f"{t}\n({next(r.metric for r in rows if r.task == t)})" for t in tasks])
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", type=lambda t: t.split(","), default=list(TASKS),
                        help=f"adapter folders under --adapters (default {','.join(TASKS)})")
    parser.add_argument("--adapters", type=Path, default=EXAMPLE_ADAPTERS, help="folder of task adapters")
    parser.add_argument("--data", type=Path, default=DATA, help="folder of task data (<task>/train.jsonl, dev.jsonl)")
    parser.add_argument("--examples", type=int, default=64, help="dev examples per task (the seeded subset)")
    parser.add_argument("--formats", type=lambda t: t.split(","), default=list(KV_WIRE_FORMATS),
                        help=f"KV wire formats (default {','.join(KV_WIRE_FORMATS)}; native is the reference)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (8 or 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per prefill and decode batch")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default=None, help="a local HF model dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    unknown = [f for f in args.formats if f not in KV_WIRE_FORMATS]
    if unknown or not args.formats:
        parser.error(f"--formats: unknown {unknown}; choose from {', '.join(KV_WIRE_FORMATS)}")
    args.formats = sorted(set(args.formats), key=KV_WIRE_FORMATS.index)
    if args.examples < 1:
        parser.error("--examples must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_threads(args.threads)
    machine = machine_info([args.dtype])
    loaded = load(args.dtype, args.device, args.model)
    tokenizer = cast(Tokenizer, loaded.tokenizer)
    rows: list[Row] = []
    runs = []
    with tqdm(total=0, desc="examples x formats") as bar:
        for task in args.tasks:
            run = run_task(loaded, args.adapters / task, args.data, args, bar)
            runs.append(run)
            rows.extend(summarise(run, tokenizer))
    per_token = bytes_per_token(loaded)
    print_report(rows, per_token)
    payload = {"benchmark": "kv_wire_quality", "settings": settings_of(args), "machine": machine,
               "bytes_per_token": per_token, "results": [asdict(r) for r in rows],
               "tasks": {run.task: {"wall_s": round(run.wall_s, 1), "differing": differing_examples(run, tokenizer)}
                         for run in runs}}
    save_results(args.out, "kv_wire_quality", payload, lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
