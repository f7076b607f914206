"""The decode runner: a slot KV cache and one batched, adapter-free decode step.

KV memory is one contiguous cache `[layers, max_batch_size, kv_heads, capacity, head_dim]` (see
docs/design.md for why slots and not paged blocks on this CPU-first design). Its capacity grows in
steps of CAPACITY_STEP positions as longer requests arrive, up to max_seq_len, so memory follows the
longest running request rather than the model's whole context.
"""

from __future__ import annotations

import logging

import torch

from prad.cpu_decode import CpuStepBackend
from prad.decode_step import ReferenceStep, StepBackend
from prad.model import Model

log = logging.getLogger(__name__)

CAPACITY_STEP = 256


def choose_step_backend(model: Model) -> StepBackend:
    """The CPU backend for a model on the CPU (it builds the native kernels now, once per machine,
    rather than in the first request), the reference step on any other device."""
    return CpuStepBackend(model) if model.device.type == "cpu" else ReferenceStep(model)


class DecodeRunner:
    def __init__(self, model: Model, max_batch_size: int, max_seq_len: int) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.cache = model.new_kv_cache(max_batch_size, 0)
        self.backend = choose_step_backend(model)
        log.info("decode step: %s", self.backend)

    @property
    def num_kv_bytes(self) -> int:
        return self.cache.k.numel() * self.cache.k.element_size() * 2

    def ensure_capacity(self, num_positions: int) -> None:
        if num_positions <= self.cache.capacity:
            return
        if num_positions > self.max_seq_len:
            raise ValueError(f"{num_positions} positions exceed max_seq_len {self.max_seq_len}")
        capacity = min(self.max_seq_len, -(-num_positions // CAPACITY_STEP) * CAPACITY_STEP)
        bigger = self.model.new_kv_cache(self.max_batch_size, capacity)
        old = self.cache.capacity
        bigger.k[:, :, :, :old] = self.cache.k
        bigger.v[:, :, :, :old] = self.cache.v
        self.cache = bigger

    def insert(self, row: int, kv: torch.Tensor) -> None:
        """kv: [layers, 2, kv_heads, length, head_dim] from the handoff."""
        self.cache.insert(row, kv.to(device=self.model.device, dtype=self.model.dtype))

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move_row(src, dst, length)

    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One step for rows [0, B): feed each row's newest token at its position; logits [B, V]."""
        device = self.model.device
        ids = torch.tensor(token_ids, device=device)  # [B]
        pos = torch.tensor(positions, device=device)  # [B]
        return self.backend.step(ids, pos, self.cache.rows(len(token_ids)))
