"""The training objective: one masked forward over prompt + target, cross-entropy on target tokens.

Row layout (right-padded to the batch maximum, positions 0..T-1, no KV cache):

    tokens   p0 p1 .. p(P-1) t0 t1 .. t(n-1) pad ..
    adapter   1  1 ..   1     0  0 ..  0      0      (PrAd; conventional variants: 1 on t too)
    loss at          p(P-1)  t0 .. t(n-2)            (logits at t predict token t+1)

The logits at the last prompt position predict t0: that row is adapted, as at serving time, where
the first output token comes from the adapted prefill. Only the loss positions go through the LM
head (a few dozen rows instead of B*T x 49k logits): the forward runs on a view of the base model
whose LM head is the identity, so it returns the final-normed hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from prad.adapters import Adapter, AdapterConfig, RowAdapters
from prad.adapters.io import init_tensors
from prad.config import ModelConfig
from prad.model import Model
from training.data import EncodedExample

TRAINING_VERSION = "training"


@dataclass
class Batch:
    token_ids: torch.Tensor  # [B, T] prompt + target, right-padded (pad id 0)
    positions: torch.Tensor  # [B, T] 0..T-1 per row; padded cells lie past their row's end
    adapter_mask: torch.Tensor  # [B, T] float: multiplies every adapter output
    loss_mask: torch.Tensor  # [B, T] bool: positions whose logits predict a target token
    labels: torch.Tensor  # [N] the predicted tokens, N = loss_mask.sum(), in row-major order

    @property
    def num_target_tokens(self) -> int:
        return int(self.labels.numel())


def make_batch(examples: list[EncodedExample], is_prompt_only: bool, device: torch.device) -> Batch:
    """Pad to the longest row; the adapter mask covers the prompt (PrAd) or every real token."""
    width = max(ex.num_tokens for ex in examples)
    token_ids = torch.zeros(len(examples), width, dtype=torch.long)
    adapter_mask = torch.zeros(len(examples), width)
    loss_mask = torch.zeros(len(examples), width, dtype=torch.bool)
    labels: list[int] = []
    for row, ex in enumerate(examples):
        num_prompt = len(ex.prompt_ids)
        token_ids[row, : ex.num_tokens] = torch.tensor(ex.prompt_ids + ex.target_ids)
        adapter_mask[row, : num_prompt if is_prompt_only else ex.num_tokens] = 1.0
        loss_mask[row, num_prompt - 1 : ex.num_tokens - 1] = True
        labels += ex.target_ids
    positions = torch.arange(width).expand(len(examples), width)
    return Batch(token_ids.to(device), positions.to(device), adapter_mask.to(device), loss_mask.to(device),
                 torch.tensor(labels, device=device))


def trainable_adapter(config: AdapterConfig, model: ModelConfig, seed: int, device: torch.device) -> Adapter:
    """Fresh fp32 adapter weights (the identity: up/b are zero) that require grad."""
    tensors = {name: t.to(device).requires_grad_() for name, t in init_tensors(config, model, seed).items()}
    return Adapter(config, tensors, TRAINING_VERSION)


def frozen_copy(adapter: Adapter, device: torch.device, dtype: torch.dtype) -> Adapter:
    """Detached weights in the serving dtype, for evaluation and saving."""
    tensors = {name: t.detach().to(device=device, dtype=dtype) for name, t in adapter.tensors.items()}
    return Adapter(adapter.config, tensors, adapter.version)


class Objective:
    """Mean cross-entropy over a batch's target tokens, with gradients into the adapter only."""

    def __init__(self, model: Model) -> None:
        self.model = model
        eye = torch.eye(model.config.hidden_size, device=model.device, dtype=model.dtype)
        # Same weights (no copy) but an identity LM head: forward_train returns normed hidden states.
        self._hidden = Model(model.config, replace(model.weights, lm_head=eye))

    def target_logits(self, batch: Batch, adapter: Adapter | None) -> torch.Tensor:
        """Logits [N, V] (fp32) at the loss positions only."""
        hooks = None if adapter is None else RowAdapters(self.model.config, [adapter] * len(batch.token_ids),
                                                         batch.adapter_mask)
        hidden = self._hidden.forward_train(batch.token_ids, batch.positions, None, hooks)  # [B, T, d]
        picked = hidden[batch.loss_mask].to(self.model.dtype)  # [N, d]
        return F.linear(picked, self.model.weights.lm_head).float()

    def loss(self, batch: Batch, adapter: Adapter | None, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(self.target_logits(batch, adapter), batch.labels, reduction=reduction)
