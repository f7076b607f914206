"""`prad train` end to end: data + template -> encoded examples -> training loop with periodic dev
evaluation -> the best checkpoint in the server's adapter format.

The best checkpoint (highest primary dev score, then lowest dev loss) is written whenever it improves,
and rewritten at the end with the run's full history; the run's record (every step's loss, each dev
evaluation) is also written next to it as training_log.json and training.png (training/plots.py).
The checkpoint's metadata holds the training arguments, the step it comes from, wall times and dev
scores.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

from prad.adapters import Adapter, AdapterConfig, save_adapter
from prad.loading import LoadedModel, load_model
from training.batching import num_batches_per_epoch
from training.data import TRUNCATION_SIDES, EncodedExample, Example, Tokenizer, encode, load_splits, subset
from training.evaluate import eval_examples, evaluate
from training.loop import TrainConfig, TrainLog, mean_loss, train_loop
from training.metrics import PRIMARY_SCORE
from training.objective import Objective, frozen_copy, trainable_adapter
from training.plots import write_training_record
from training.tasks import TaskSpec, resolve_task

TRAINABLE_VARIANTS = ("prad-pa", "prad-sa", "prad-lora", "pa", "sa", "lora")


@dataclass(frozen=True)
class TrainArgs:
    data: Path  # task folder with train.jsonl (+ dev.jsonl)
    out: Path  # adapter folder to write
    variant: str  # one of TRAINABLE_VARIANTS
    rank: int
    lr: float
    batch_size: int
    max_input_tokens: int  # cap on the templated prompt
    max_target_tokens: int  # cap on target + EOS
    steps: int | None = None  # exactly one of steps / epochs
    epochs: float | None = None
    task: str | None = None  # default: the data folder's name
    template: str | None = None  # default: the task's built-in template
    metric: str | None = None  # default: the task's metric
    seed: int = 0
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    eval_every: int = 0  # 0: evaluate once, after the last step
    eval_samples: int = 100  # dev examples per evaluation (0: no evaluation, keep the last step)
    eval_batch_size: int = 16
    train_samples: int | None = None  # a seeded random subset of train
    device: str = "cpu"
    dtype: str = "float32"
    model: str | None = None  # base model dir (default SmolLM2-135M-Instruct)
    alpha: float = 16.0  # LoRA scaling alpha / rank
    targets: tuple[str, ...] = ("q", "v")  # LoRA targets
    truncate_side: str = "right"  # cut over-long inputs on this side
    show_progress: bool = True

    def check(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of --steps or --epochs")
        if self.variant not in TRAINABLE_VARIANTS:
            raise ValueError(f"--variant {self.variant!r}: expected one of {list(TRAINABLE_VARIANTS)}")
        if self.truncate_side not in TRUNCATION_SIDES:
            raise ValueError(f"--truncate-side {self.truncate_side!r}: expected one of {list(TRUNCATION_SIDES)}")
        positive = {"rank": self.rank, "lr": self.lr, "batch_size": self.batch_size, "steps": self.steps,
                    "epochs": self.epochs, "max_input_tokens": self.max_input_tokens,
                    "max_target_tokens": self.max_target_tokens, "eval_batch_size": self.eval_batch_size,
                    "train_samples": self.train_samples}
        bad = {name: value for name, value in positive.items() if value is not None and value <= 0}
        if bad:
            raise ValueError(f"these must be > 0: {bad}")
        if self.eval_samples < 0 or self.eval_every < 0:
            raise ValueError(f"eval_samples {self.eval_samples} and eval_every {self.eval_every} must be >= 0")

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in asdict(self).items() if k != "show_progress"}


def run_training(args: TrainArgs, loaded: LoadedModel | None = None) -> dict[str, Any]:
    """Train, write the best checkpoint to args.out, and return a JSON-able summary."""
    args.check()
    spec = resolve_task(args.task or Path(args.data).name, args.template, args.metric)
    train_raw, dev_raw = load_splits(args.data)
    train_raw = subset(train_raw, args.train_samples, seed=args.seed)
    dev = subset(eval_examples(dev_raw, spec.metric), args.eval_samples) if args.eval_samples else []
    torch.manual_seed(args.seed)
    loaded = loaded or load_model(args.model, args.device, args.dtype)
    encoded = _encode_all(loaded, spec, train_raw, args)
    config = AdapterConfig(variant=args.variant, rank=args.rank, base_model_fingerprint=loaded.fingerprint,
                           alpha=args.alpha, targets=tuple(args.targets), prompt_template=spec.template)
    config.check()
    adapter = trainable_adapter(config, loaded.config, args.seed, loaded.model.device)
    num_steps = args.steps if args.steps is not None else math.ceil(
        (args.epochs or 0) * num_batches_per_epoch(len(encoded), args.batch_size))
    autocast_dtype = torch.bfloat16 if loaded.model.dtype == torch.bfloat16 else None
    train_config = TrainConfig(num_steps, args.batch_size, args.lr, args.warmup_ratio, args.grad_clip,
                               args.weight_decay, args.eval_every, args.seed, autocast_dtype, args.show_progress)
    best = BestCheckpoint(args, spec, loaded, adapter, dev, _encode_all(loaded, spec, dev, args), autocast_dtype)
    log = train_loop(Objective(loaded.model), adapter, encoded, train_config, best.evaluate if dev else None)
    if not dev:
        best.keep_current(num_steps)
    return best.finish(log, num_steps, len(encoded))


def _encode_all(loaded: LoadedModel, spec: TaskSpec, examples: list[Example], args: TrainArgs) -> list[EncodedExample]:
    eos_id, tokenizer = loaded.config.eos_token_ids[0], cast(Tokenizer, loaded.tokenizer)
    return [encode(tokenizer, spec.template, ex, eos_id, args.max_input_tokens, args.max_target_tokens,
                   args.truncate_side) for ex in examples]


class BestCheckpoint:
    """Evaluates on dev, keeps the best adapter seen so far and writes it to args.out."""

    def __init__(self, args: TrainArgs, spec: TaskSpec, loaded: LoadedModel, adapter: Adapter, dev: list[Example],
                 dev_encoded: list[EncodedExample], autocast_dtype: torch.dtype | None) -> None:
        self.args, self.spec, self.loaded, self.adapter = args, spec, loaded, adapter
        self.dev, self.dev_encoded, self.autocast_dtype = dev, dev_encoded, autocast_dtype
        self.objective = Objective(loaded.model)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_tensors: dict[str, torch.Tensor] = {}
        self.start_s = time.perf_counter()

    def evaluate(self, step: int) -> str:
        model = self.loaded.model
        served = frozen_copy(self.adapter, model.device, model.dtype)
        loss = mean_loss(self.objective, self.adapter, self.dev_encoded, self.args.eval_batch_size,
                         self.autocast_dtype)
        result = evaluate(model, cast(Tokenizer, self.loaded.tokenizer), served, self.dev, self.spec,
                          self.args.max_target_tokens, self.args.eval_batch_size, self.args.max_input_tokens,
                          self.args.truncate_side)
        record = {"step": step, "loss": round(loss, 5), "scores": result.scores, "num_examples": len(self.dev),
                  "wall_s": round(time.perf_counter() - self.start_s, 1)}
        self.history.append(record)
        primary = PRIMARY_SCORE[self.spec.metric]
        if self.best is None or (result.scores[primary], -loss) > (self.best["scores"][primary], -self.best["loss"]):
            self.best = record
            self._save(step)
        return f"dev loss {loss:.4f} {primary} {result.scores[primary]:.2f} (best at step {self.best['step']})"

    def keep_current(self, step: int) -> None:
        self.best = {"step": step, "wall_s": round(time.perf_counter() - self.start_s, 1)}
        self._save(step)

    def finish(self, log: TrainLog, num_steps: int, num_train: int) -> dict[str, Any]:
        """Rewrite the best checkpoint with the whole run's record; return the summary."""
        run = {"num_steps": num_steps, "num_train_examples": num_train, "train_wall_s": round(log.wall_s, 1),
               "num_train_tokens": log.num_tokens, "first_losses": [round(x, 4) for x in log.losses[:5]],
               "last_losses": [round(x, 4) for x in log.losses[-5:]], "history": self.history}
        version = self._save(None, run)
        written = write_training_record(Path(self.args.out), self.spec.name, PRIMARY_SCORE[self.spec.metric],
                                        log.losses, self.history)
        return {"out": str(self.args.out), "version": version, "task": self.spec.name, "best": self.best,
                "record": [str(p) for p in written], **run}

    def _save(self, step: int | None, run: dict[str, Any] | None = None) -> str:
        if step is not None:
            self.best_tensors = {k: v.detach().clone() for k, v in self.adapter.tensors.items()}
        metadata = {"task": self.spec.name, "base_model": self.loaded.name, "training": self.args.to_json(),
                    "best": self.best, **(run or {})}
        config = replace(self.adapter.config, metadata=metadata)
        return save_adapter(self.args.out, config, self.best_tensors)
