"""The KV cache layout shared by prefill, decode and the handoff between them.

Layout: one tensor per K and V, `[num_layers, num_rows, num_kv_heads, capacity, head_dim]`.
Row r holds its token at position p in `[:, r, :, p]`. A single request's KV travels as
`[num_layers, 2, num_kv_heads, length, head_dim]` (K then V), the handoff layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: torch.Tensor  # [L, B, Hkv, S, D]
    v: torch.Tensor  # [L, B, Hkv, S, D]

    @classmethod
    def empty(cls, num_layers: int, num_rows: int, num_kv_heads: int, capacity: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str = "cpu") -> KVCache:
        shape = (num_layers, num_rows, num_kv_heads, capacity, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def num_rows(self) -> int:
        return self.k.shape[1]

    def rows(self, num_rows: int) -> KVCache:
        """A view of the first `num_rows` rows (no copy)."""
        return KVCache(self.k[:, :num_rows], self.v[:, :num_rows])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] at `positions` [B, T]; return keys/values [B, Hkv, num_keys, D]."""
        bsz = k.shape[0]
        if num_keys > self.capacity:  # num_keys = max position + 1, known without a device sync
            raise ValueError(f"position {num_keys - 1} exceeds KV capacity {self.capacity}")
        row_idx = torch.arange(bsz, device=k.device)[:, None]  # [B, 1] broadcast against [B, T]
        # [B, S, Hkv, D] views index (row, position) pairs and write through to the cache.
        self.k[layer, :bsz].transpose(1, 2)[row_idx, positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[layer, :bsz].transpose(1, 2)[row_idx, positions] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[layer, :bsz, :, :num_keys], self.v[layer, :bsz, :, :num_keys]

    def extract(self, row: int, length: int) -> torch.Tensor:
        """Row `row`'s first `length` positions in the handoff layout [L, 2, Hkv, length, D]."""
        return torch.stack([self.k[:, row, :, :length], self.v[:, row, :, :length]], dim=1)

    def insert(self, row: int, kv: torch.Tensor) -> None:
        """Copy a handoff-layout tensor [L, 2, Hkv, length, D] into row `row` at positions [0, length)."""
        length = kv.shape[3]
        if length > self.capacity:
            raise ValueError(f"KV length {length} exceeds capacity {self.capacity}")
        self.k[:, row, :, :length] = kv[:, 0]
        self.v[:, row, :, :length] = kv[:, 1]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` positions to row dst (used to keep active rows contiguous)."""
        length = min(length, self.capacity)
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
