"""The `prad` command line: serve, generate (reference), adapters init, model prepare; train and eval
(wired in launcher/train_cli.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from launcher.train_cli import add_training_commands

# Must be set before torch loads: spinning OpenMP threads collapse when a core is busy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("prad.cli")


def _set_threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0))))


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """`prad generate`'s model flags (`prad serve` gets its own, generated from ServeSettings)."""
    p.add_argument("--model", default=None, help="local HF model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: available cores)")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """`prad serve`: one flag per ServeSettings field, generated (launcher/settings_cli.py) so the two cannot drift.

    Every flag defaults to None, so cmd_serve passes only the flags given and the rest come from PRAD_* / defaults.
    """
    from launcher.settings import SECRETS, ServeSettings
    from launcher.settings_cli import SettingsHelpFormatter, add_settings_flags

    serve = sub.add_parser("serve", help="run the server (embedded: prefill + decode in one process)",
                           usage="%(prog)s [options]", formatter_class=SettingsHelpFormatter,
                           description="Run the server. Each flag is also an environment variable (named in its "
                                       "help); a flag given wins over the environment, which wins over the default.")
    notes = {name: f"visible in ps: prefer --{name.replace('_', '-')}-file" for name in SECRETS}
    add_settings_flags(serve, ServeSettings, notes)
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from launcher.embedded import serve
    from launcher.logs import configure_logging
    from launcher.settings import ServeSettings

    overrides = {k: v for k, v in vars(args).items()
                 if k in ServeSettings.model_fields and v is not None}
    settings = ServeSettings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    _warn_secrets_on_command_line(args)
    _set_threads(settings.threads)
    serve(settings)
    return 0


def _warn_secrets_on_command_line(args: argparse.Namespace) -> None:
    """A secret given as a flag is visible to every user of the machine (`ps`, /proc/<pid>/cmdline)."""
    from launcher.settings import SECRETS

    for name in SECRETS:
        if getattr(args, name, None) is not None:
            flag = name.replace("_", "-")
            log.warning("--%s given on the command line, where other users can read it (ps); use --%s-file "
                        "or PRAD_%s instead", flag, flag, name.upper())


def cmd_generate(args: argparse.Namespace) -> int:
    from prad.adapters import load_adapter
    from prad.loading import load_model
    from prad.reference import reference_generate

    _set_threads(args.threads)
    loaded = load_model(args.model, args.device, "float32" if args.dtype == "auto" else args.dtype)
    adapter = None
    if args.adapter:
        adapter = load_adapter(Path(args.adapter), loaded.config, loaded.fingerprint).to(
            loaded.model.device, loaded.model.dtype)
    prompt = args.prompt
    if args.input is not None:
        template = adapter.config.prompt_template if adapter and adapter.config.prompt_template else "{input}"
        prompt = template.replace("{input}", args.input)
    ids = loaded.tokenizer(prompt).input_ids
    if not args.reference:
        print("only --reference generation is offered here; use `prad serve` for the engine", file=sys.stderr)
        return 2
    out = reference_generate(loaded.model, adapter, ids, args.max_new_tokens, ignore_eos=args.ignore_eos)
    print(json.dumps({"token_ids": out, "text": loaded.tokenizer.decode(out, skip_special_tokens=True)}))
    return 0


def cmd_adapters_init(args: argparse.Namespace) -> int:
    from prad.adapters import AdapterConfig, save_adapter
    from prad.adapters.io import init_tensors
    from prad.loading import load_model

    loaded = load_model(args.model, "cpu", "float32")
    config = AdapterConfig(variant=args.variant, rank=args.rank, base_model_fingerprint=loaded.fingerprint,
                           alpha=args.alpha, targets=tuple(args.targets.split(",")),
                           prompt_template=args.prompt_template,
                           metadata={"init": "random", "seed": args.seed, "scale": args.scale})
    config.check()
    version = save_adapter(Path(args.out), config, init_tensors(config, loaded.config, args.seed, args.scale))
    print(json.dumps({"path": str(args.out), "variant": args.variant, "version": version}))
    return 0


def _admin_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="prefill server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--token", default=os.environ.get("PRAD_ADMIN_TOKEN"), help="admin token (or PRAD_ADMIN_TOKEN)")


def _add_admin_commands(adapters: argparse._SubParsersAction) -> None:
    push = adapters.add_parser("push", help="upload an adapter folder as a new version (validated by the server)")
    _admin_flags(push)
    push.add_argument("--task", required=True)
    push.add_argument("--activate", action="store_true", help="make it the active version at once")
    push.add_argument("dir")
    push.set_defaults(func=lambda a: _admin(a, "push"))
    activate = adapters.add_parser("activate", help="make a stored version the active one")
    _admin_flags(activate)
    activate.add_argument("--task", required=True)
    activate.add_argument("--version", required=True)
    activate.set_defaults(func=lambda a: _admin(a, "activate"))
    rollback = adapters.add_parser("rollback", help="re-activate the previously active version")
    _admin_flags(rollback)
    rollback.add_argument("--task", required=True)
    rollback.set_defaults(func=lambda a: _admin(a, "rollback"))
    listing = adapters.add_parser("list", help="tasks and their versions (JSON)")
    _admin_flags(listing)
    listing.set_defaults(func=lambda a: _admin(a, "list"))
    show = adapters.add_parser("show", help="one task: versions, traffic split, requests per version (JSON)")
    _admin_flags(show)
    show.add_argument("task")
    show.set_defaults(func=lambda a: _admin(a, "show"))
    split = adapters.add_parser("split", help="split a task's traffic between versions (canary), e.g. "
                                              "`prad adapters split sst2 V7=90 V8=10`; --end sends all to the "
                                              "active version again")
    _admin_flags(split)
    split.add_argument("task")
    split.add_argument("weights", nargs="*", metavar="VERSION=PERCENT", help="at least two, summing to 100")
    split.add_argument("--end", action="store_true", help="end the split (or activate one version to end it)")
    split.set_defaults(func=lambda a: _admin(a, "split"))


def _admin(args: argparse.Namespace, action: str) -> int:
    from launcher.admin_client import run_admin

    return run_admin(args, action)


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from prad.loading import load_model

    loaded = load_model(args.model, "cpu", "float32")
    print(json.dumps({"model": loaded.name, "path": str(loaded.path), "fingerprint": loaded.fingerprint}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prad", description="PrAd Serve: multi-task serving with PrAd adapters")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_serve(sub)

    gen = sub.add_parser("generate", help="greedy generation by one masked forward per step (the yardstick)")
    _add_model_flags(gen)
    gen.add_argument("--adapter", default=None, help="adapter folder (omit for the base model)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--input", help="task input, formatted with the adapter's prompt template")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--reference", action="store_true", help="no KV cache: one full masked forward per token")
    gen.set_defaults(func=cmd_generate)

    adapters = sub.add_parser("adapters", help="adapter tools").add_subparsers(dest="adapters_command", required=True)
    init = adapters.add_parser("init", help="write a randomly initialised (non-identity) adapter")
    init.add_argument("out")
    init.add_argument("--model", default=None)
    init.add_argument("--variant", default="prad-pa", choices=["prad-pa", "prad-sa", "prad-lora", "pa", "sa", "lora"])
    init.add_argument("--rank", type=int, default=8)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--scale", type=float, default=0.1, help="std of the up/B weights (0 = identity adapter)")
    init.add_argument("--alpha", type=float, default=16.0, help="LoRA: scaling is alpha / rank")
    init.add_argument("--targets", default="q,v", help="LoRA targets among q,k,v,o")
    init.add_argument("--prompt-template", default=None, help="e.g. 'Review: {input}\\nSentiment:'")
    init.set_defaults(func=cmd_adapters_init)

    _add_admin_commands(adapters)

    model = sub.add_parser("model", help="model tools").add_subparsers(dest="model_command", required=True)
    prepare = model.add_parser("prepare", help="convert and cache the model once; print its fingerprint")
    prepare.add_argument("--model", default=None)
    prepare.set_defaults(func=cmd_model_prepare)

    add_training_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from launcher.logs import configure_logging

    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"prad: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
