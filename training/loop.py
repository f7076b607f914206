"""The training loop: AdamW on the adapter tensors only, linear warm-up then linear decay, clipping.

The base weights never require grad, so backward computes activation gradients only. With
`autocast_dtype=bfloat16` the forward runs under autocast (the base model is loaded in bf16 then)
while the adapter's master weights, gradients and optimizer state stay fp32.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from prad.adapters import Adapter
from training.batching import batch_stream, sorted_batches
from training.data import EncodedExample
from training.objective import Objective, make_batch


@dataclass(frozen=True)
class TrainConfig:
    num_steps: int  # optimizer steps
    batch_size: int  # examples per step
    lr: float  # peak learning rate
    warmup_ratio: float = 0.06  # fraction of num_steps spent warming up linearly from 0
    grad_clip: float = 1.0  # max global grad norm (0 = no clipping)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    eval_every: int = 0  # evaluate every N steps (0 = only after the last step)
    seed: int = 0  # batch order (adapter init uses it too, see run.py)
    autocast_dtype: torch.dtype | None = None  # torch.bfloat16 for bf16 autocast
    show_progress: bool = True  # tqdm bar on stderr

    def check(self) -> None:
        bad = {name: value for name, value in (("num_steps", self.num_steps), ("batch_size", self.batch_size))
               if value < 1}
        if bad or self.lr <= 0 or not 0 <= self.warmup_ratio < 1 or self.grad_clip < 0 or self.eval_every < 0:
            raise ValueError(f"invalid training config {self} (bad: {bad or 'lr/warmup_ratio/grad_clip/eval_every'})")


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)  # training loss per step
    wall_s: float = 0.0  # time in the loop, evaluations included
    num_tokens: int = 0  # prompt + target tokens seen (padding excluded)


def linear_schedule(num_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier: 0 -> 1 over the warm-up steps, then linearly down to 0 at num_steps."""
    num_warmup = math.ceil(num_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < num_warmup:
            return (step + 1) / (num_warmup + 1)
        return max(0.0, (num_steps - step) / max(1, num_steps - num_warmup))

    return factor


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def train_loop(objective: Objective, adapter: Adapter, examples: list[EncodedExample], config: TrainConfig,
               on_eval: Callable[[int], str] | None = None) -> TrainLog:
    """Run config.num_steps steps; on_eval(step) is called every eval_every steps and after the last.

    on_eval returns a short text for the progress bar.
    """
    config.check()
    params = list(adapter.tensors.values())
    assert all(p.requires_grad for p in params), "adapter tensors must require grad"
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(config.num_steps, config.warmup_ratio))
    batches = batch_stream([ex.num_tokens for ex in examples], config.batch_size, config.seed)
    log = TrainLog()
    start_s = time.perf_counter()
    bar = tqdm(range(1, config.num_steps + 1), disable=not config.show_progress, desc="train", unit="step")
    for step in bar:
        rows = [examples[i] for i in next(batches)]
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        loss = _step(objective, adapter, rows, config, optimizer, params)
        scheduler.step()
        log.losses.append(loss)
        log.num_tokens += sum(ex.num_tokens for ex in rows)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if on_eval is not None and (step == config.num_steps or (config.eval_every and step % config.eval_every == 0)):
            tqdm.write(f"step {step}: {on_eval(step)}", file=sys.stderr)
    log.wall_s = time.perf_counter() - start_s
    return log


def _step(objective: Objective, adapter: Adapter, rows: list[EncodedExample], config: TrainConfig,
          optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> float:
    batch = make_batch(rows, adapter.config.is_prompt_only, objective.model.device)
    with autocast(objective.model.device, config.autocast_dtype):
        loss = objective.loss(batch, adapter)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


@torch.no_grad()
def mean_loss(objective: Objective, adapter: Adapter | None, examples: list[EncodedExample], batch_size: int,
              autocast_dtype: torch.dtype | None = None) -> float:
    """Mean cross-entropy per target token over `examples` (dev loss)."""
    total, num_tokens = 0.0, 0
    is_prompt_only = adapter is None or adapter.config.is_prompt_only
    for rows in _eval_batches(examples, batch_size):
        batch = make_batch(rows, is_prompt_only, objective.model.device)
        with autocast(objective.model.device, autocast_dtype):
            total += float(objective.loss(batch, adapter, reduction="sum"))
        num_tokens += batch.num_target_tokens
    return total / max(1, num_tokens)


def _eval_batches(examples: list[EncodedExample], batch_size: int) -> Iterator[list[EncodedExample]]:
    for rows in sorted_batches([ex.num_tokens for ex in examples], batch_size):
        yield [examples[i] for i in rows]
