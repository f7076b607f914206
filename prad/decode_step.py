"""One batched decode step: the interface the decode runner calls, and the reference implementation.

A decode step feeds each row of the batch its newest token at that row's position, writes the new
K/V into the row's slot of the cache and returns the next-token logits. The runner picks one
`StepBackend` when it starts (decode_service/runner.py): `ReferenceStep` below, the device-agnostic
default used on GPUs, or the CPU backend (prad/cpu_decode), which computes the same maths in a
layout and with kernels chosen for CPUs. Tests hold the two to the same logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from prad.kv_cache import KVCache
from prad.model import Model


class StepBackend(ABC):
    """How one decode step is computed for a model. Built once; `step` is called for every step."""

    name: str  # what the runner logs and the benchmarks record, e.g. "reference"

    @abstractmethod
    def step(self, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache) -> torch.Tensor:
        """token_ids, positions: [B]; row b's token goes to position positions[b] of kv row b, which
        holds that row's K/V for positions [0, positions[b]). Returns logits [B, V] in fp32."""


class ReferenceStep(StepBackend):
    """`Model.forward` on one token per row: the same code path as prefill, with T = 1."""

    name = "reference"

    def __init__(self, model: Model) -> None:
        self.model = model

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache) -> torch.Tensor:
        logit_index = torch.zeros_like(token_ids)  # each row's only token
        return self.model.forward(token_ids[:, None], positions[:, None], kv, logit_index=logit_index)  # [B, V]
