"""`prad train` and `prad eval`: argparse wiring only; the work lives in training.

Heavy imports (torch, transformers) happen inside the commands, so `prad --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, cast

BASE_ADAPTER = "base"


def add_training_commands(sub: argparse._SubParsersAction) -> None:
    """Register `train` and `eval` on the `prad` subcommand parser."""
    _add_train(sub.add_parser("train", help="train a task adapter; writes the best dev checkpoint"))
    _add_eval(sub.add_parser("eval", help="greedy-decode a dev/test file through the serving runners and score it "
                                          "(or, with --server, compare adapter versions on a live server)"))


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="base-model dtype; bfloat16 also trains under autocast (adapter master weights stay fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: available cores)")


def _add_task_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=None, help="task name for the built-in template/metric (default: data folder)")
    p.add_argument("--template", default=None, help="prompt template with {input}, e.g. 'Review: {input}\\nSentiment:'")
    p.add_argument("--metric", default=None, choices=["accuracy", "bleu", "rouge"])


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="task folder with train.jsonl (+ dev.jsonl)")
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    p.add_argument("--variant", required=True, choices=["prad-pa", "prad-sa", "prad-lora", "pa", "sa", "lora"])
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=float)
    length.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--max-input-tokens", type=int, required=True, help="cap on the templated prompt's tokens")
    p.add_argument("--max-target-tokens", type=int, required=True, help="cap on target + EOS tokens")
    p.add_argument("--truncate-side", default="right", choices=["right", "left"],
                   help="cut over-long inputs at the end (right: keep the start) or at the start")
    _add_task_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0 = off)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=0, help="dev evaluation every N steps (0 = at the end only)")
    p.add_argument("--eval-samples", type=int, default=100, help="dev examples per evaluation (0 = none)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--train-samples", type=int, default=None, help="train on a seeded random subset")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA: scaling is alpha / rank")
    p.add_argument("--targets", default="q,v", help="LoRA targets among q,k,v,o")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_train)


def _add_eval(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="adapter folder, or 'base' for the untuned model (local decoding)")
    source.add_argument("--server", help="live server URL: score --versions of --task through its /generate")
    p.add_argument("--data", type=Path, required=True, help="JSONL file, or a task folder (its dev split)")
    p.add_argument("--max-samples", type=int, default=None, help="a seeded random subset (same as --eval-samples)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    p.add_argument("--max-input-tokens", type=int, default=None, help="default: the adapter's training cap")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-shown", type=int, default=5, help="examples printed with their predictions")
    _add_task_flags(p)
    _add_runtime_flags(p)
    remote = p.add_argument_group("server mode (--server)")
    remote.add_argument("--versions", type=_versions_arg, default=None,
                        help="comma-separated 16-hex adapter versions of --task to compare (needed with --server)")
    remote.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 8)")
    remote.add_argument("--timeout", type=float, default=None, help="seconds per request (default 120)")
    remote.add_argument("--api-key-file", type=Path, default=None, help="file with the API key (or PRAD_API_KEY)")
    remote.add_argument("--admin-token-file", type=Path, default=None,
                        help="file with the admin token, needed to pin versions unless the server has "
                             "--allow-version-pinning (or PRAD_ADMIN_TOKEN)")
    remote.add_argument("--out", type=Path, default=None, help="also write every example's predictions here (JSON)")
    remote.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.set_defaults(func=cmd_eval)


def _versions_arg(text: str) -> list[str]:
    from training.remote_eval import parse_versions

    try:
        return parse_versions(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _set_threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0))))


def cmd_train(args: argparse.Namespace) -> int:
    from training.run import TrainArgs, run_training

    _set_threads(args.threads)
    train_args = TrainArgs(
        data=args.data, out=args.out, variant=args.variant, rank=args.rank, lr=args.lr, batch_size=args.batch_size,
        max_input_tokens=args.max_input_tokens, max_target_tokens=args.max_target_tokens, steps=args.steps,
        epochs=args.epochs, task=args.task, template=args.template, metric=args.metric, seed=args.seed,
        warmup_ratio=args.warmup_ratio, grad_clip=args.grad_clip, weight_decay=args.weight_decay,
        eval_every=args.eval_every, eval_samples=args.eval_samples, eval_batch_size=args.eval_batch_size,
        train_samples=args.train_samples, device=args.device, dtype=args.dtype, model=args.model,
        alpha=args.alpha, targets=tuple(args.targets.split(",")), truncate_side=args.truncate_side,
        show_progress=not args.no_progress)
    print(json.dumps(run_training(train_args)))
    return 0


_SERVER_ONLY = ("versions", "concurrency", "timeout", "api_key_file", "admin_token_file", "out")
_LOCAL_ONLY = ("max_input_tokens", "template", "model")


def _check_eval_mode(args: argparse.Namespace) -> None:
    """--adapter and --server take different flags; say which instead of ignoring one."""
    mode, other = ("--server", _LOCAL_ONLY) if args.server else ("--adapter", _SERVER_ONLY)
    given = [f"--{name.replace('_', '-')}" for name in other if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: not used with {mode}"
                         + (" (the server formats each version's input with that version's own template)"
                            if args.server and args.template is not None else ""))
    if args.server and not args.versions:
        raise ValueError("--server needs --versions V1[,V2,...] (16-hex adapter versions of --task)")
    if args.server and not args.task:
        raise ValueError("--server needs --task (the server's task id)")
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError(f"--concurrency {args.concurrency}: expected >= 1")
    if args.timeout is not None and args.timeout <= 0:
        raise ValueError(f"--timeout {args.timeout}: expected > 0")


def cmd_eval(args: argparse.Namespace) -> int:
    _check_eval_mode(args)
    if args.server:
        return _cmd_eval_server(args)
    from prad.adapters import load_adapter
    from prad.loading import load_model
    from training.data import Tokenizer, load_eval_examples, subset
    from training.evaluate import eval_examples, evaluate
    from training.tasks import resolve_task

    _set_threads(args.threads)
    loaded = load_model(args.model, args.device, args.dtype)
    adapter = None
    if args.adapter != BASE_ADAPTER:
        adapter = load_adapter(Path(args.adapter), loaded.config, loaded.fingerprint).to(
            loaded.model.device, loaded.model.dtype)
    meta: dict[str, Any] = adapter.config.metadata if adapter else {}
    training: dict[str, Any] = meta.get("training", {})
    template = args.template or (adapter.config.prompt_template if adapter else None)
    spec = resolve_task(args.task or meta.get("task") or _task_from_path(args.data), template, args.metric)
    examples = subset(eval_examples(load_eval_examples(args.data), spec.metric), args.max_samples)
    result = evaluate(loaded.model, cast(Tokenizer, loaded.tokenizer), adapter, examples, spec,
                      args.max_new_tokens or spec.max_new_tokens, args.batch_size,
                      args.max_input_tokens or training.get("max_input_tokens"),
                      training.get("truncate_side", "right"))
    print(json.dumps({"adapter": args.adapter, "adapter_version": adapter.version if adapter else BASE_ADAPTER,
                      "data": str(args.data), "template": spec.template, **result.to_json(args.num_shown)}))
    return 0


def _cmd_eval_server(args: argparse.Namespace) -> int:
    from training import remote_eval as rv
    from training.data import load_eval_examples, subset
    from training.evaluate import eval_examples

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request
    spec = rv.remote_task_spec(args.task, args.metric)
    examples = subset(eval_examples(load_eval_examples(args.data), spec.metric), args.max_samples)
    headers = rv.auth_headers(rv.read_secret(args.api_key_file, rv.API_KEY_ENV),
                              rv.read_secret(args.admin_token_file, rv.ADMIN_TOKEN_ENV))
    concurrency = rv.DEFAULT_CONCURRENCY if args.concurrency is None else args.concurrency
    timeout_s = rv.DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
    with rv.make_client(timeout_s, concurrency) as client:
        try:
            results = rv.compare_versions(client, args.server, spec.name, args.versions, examples, spec.metric,
                                          args.max_new_tokens or spec.max_new_tokens, headers, concurrency,
                                          show_progress=not args.no_progress)
        except rv.RemoteEvalError as e:
            print(f"prad: error: {e}", file=sys.stderr)
            return 1
    print(rv.format_table(spec.metric, results), file=sys.stderr)
    summary = {**rv.comparison_json(spec.name, spec.metric, str(args.data), results), "server": args.server}
    if args.out:
        args.out.write_text(json.dumps({**summary, "examples": rv.example_rows(examples, results)}, indent=1) + "\n")
    print(json.dumps({**summary, "examples": rv.example_rows(examples, results, args.num_shown)}))
    return 0


def _task_from_path(data: Path) -> str:
    return data.name if data.is_dir() else data.parent.name
