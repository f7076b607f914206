"""Per-row adapter maths for one batch: rows may use different adapters, variants and ranks, or none.

Two strategies, same result (bench/prefill.py --strategies measures both side by side):

* "gather" (default): for each adapter family present in the batch, the distinct adapters' weights
  are stacked into a bank `[U, d_in, r_max]` per layer (ranks zero-padded, which adds exact zeros),
  gathered per row and applied with one batched matmul — no Python loop over rows.
* "segment": rows are grouped by adapter; one pair of matmuls per distinct adapter on its rows
  (index_select), results written back with index_copy — a Python loop over adapters, not rows.

Each row's contribution is multiplied by its per-token mask (the PrAd prompt mask, times the row's
scaling, zero for rows without that family).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prad.adapters.io import Adapter
from prad.config import ModelConfig

STRATEGIES = ("gather", "segment")


@dataclass
class _Family:
    """One weight pair (down/up or a/b) across the batch: U distinct adapters, rows mapped onto them."""

    adapters: list[Adapter]  # the distinct adapters of this family in the batch
    row_index: torch.Tensor  # [B] index into `adapters` (0 for rows without one; masked out)
    mask: torch.Tensor  # [B, T, 1] prompt mask x scaling, 0 where the row has no such adapter
    rank: int  # r_max over `adapters`
    names: tuple[str, str]  # tensor names within a layer, e.g. ("pa.down", "pa.up")
    rows: list[torch.Tensor]  # per distinct adapter: the batch rows that use it ("segment" only)
    strategy: str = "gather"

    def weights(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """down [d_in, r] or [B, d_in, r]; up [r, d_out] or [B, r, d_out] (shared when U == 1)."""
        down = [_pad(a.tensor(layer, self.names[0]), 1, self.rank) for a in self.adapters]
        up = [_pad(a.tensor(layer, self.names[1]), 0, self.rank) for a in self.adapters]
        if len(self.adapters) == 1:
            return down[0].to(dtype), up[0].to(dtype)
        return torch.stack(down).to(dtype)[self.row_index], torch.stack(up).to(dtype)[self.row_index]

    def apply(self, layer: int, x: torch.Tensor, relu: bool) -> torch.Tensor:
        if self.strategy == "segment" and len(self.adapters) > 1:
            return self._apply_segments(layer, x, relu)
        down, up = self.weights(layer, x.dtype)
        hidden = torch.matmul(x, down)  # [B, T, r]
        if relu:
            hidden = F.relu(hidden)
        return torch.matmul(hidden, up) * self.mask.to(x.dtype)  # [B, T, d_out]


    def _apply_segments(self, layer: int, x: torch.Tensor, relu: bool) -> torch.Tensor:
        """One down/up matmul pair per distinct adapter over the rows that use it."""
        out: torch.Tensor | None = None
        for adapter, rows in zip(self.adapters, self.rows, strict=True):
            down = adapter.tensor(layer, self.names[0]).to(x.dtype)
            up = adapter.tensor(layer, self.names[1]).to(x.dtype)
            hidden = torch.matmul(x.index_select(0, rows), down)
            if relu:
                hidden = F.relu(hidden)
            delta = torch.matmul(hidden, up) * self.mask.index_select(0, rows).to(x.dtype)
            if out is None:
                out = x.new_zeros(*x.shape[:-1], delta.shape[-1])
            out = out.index_copy(0, rows, delta)
        assert out is not None
        return out


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0, 0, 0]
    pad[3 - 2 * dim] = missing  # F.pad lists the last dim first
    return F.pad(t, pad)


class RowAdapters:
    """Implements prad.model.AdapterHooks for one batch.

    adapters: one entry per row (None = base model for that row).
    prompt_mask: [B, T], 1.0 where the adapter applies (prompt tokens), 0.0 elsewhere. For the
    conventional (non-PrAd) variants pass ones: they apply to every token.
    """

    def __init__(self, model: ModelConfig, adapters: list[Adapter | None], prompt_mask: torch.Tensor,
                 strategy: str = "gather") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown adapter strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
        self.model = model
        self.families: dict[str, _Family] = {}
        for kind, names, scale_of in self._family_specs(adapters):
            family = _build_family(adapters, prompt_mask, kind, names, scale_of, strategy)
            if family is not None:
                self.families[names[0]] = family

    @staticmethod
    def _family_specs(adapters: list[Adapter | None]):
        yield "pa", ("pa.down", "pa.up"), lambda a: a.config.scale
        yield "sa", ("sa.down", "sa.up"), lambda a: a.config.scale
        targets = sorted({t for a in adapters if a is not None and a.config.kind == "lora" for t in a.config.targets})
        for t in targets:
            yield f"lora:{t}", (f"lora_{t}.a", f"lora_{t}.b"), lambda a: a.config.lora_scaling

    def adapt_qkv(self, layer: int, x: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        c = self.model
        offsets = {"q": (0, c.q_size), "k": (c.q_size, c.kv_size), "v": (c.q_size + c.kv_size, c.kv_size)}
        deltas: list[tuple[int, int, torch.Tensor] | None] = []
        for t, (start, width) in offsets.items():
            family = self.families.get(f"lora_{t}.a")
            if family is None:
                deltas.append(None)
                continue
            deltas.append((start, width, family.apply(layer, x, relu=False)))
        if all(d is None for d in deltas):
            return qkv
        parts = list(qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1))
        for i, d in enumerate(deltas):
            if d is not None:
                parts[i] = parts[i] + d[2]
        return torch.cat(parts, dim=-1)

    def adapt_o(self, layer: int, a: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        family = self.families.get("lora_o.a")
        return o if family is None else o + family.apply(layer, a, relu=False)

    def adapt_mlp(self, layer: int, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = y
        pa = self.families.get("pa.down")
        if pa is not None:
            out = out + pa.apply(layer, z, relu=True)
        sa = self.families.get("sa.down")
        if sa is not None:
            out = out + sa.apply(layer, y, relu=True)
        return out


def _build_family(adapters: list[Adapter | None], prompt_mask: torch.Tensor, kind: str,
                  names: tuple[str, str], scale_of, strategy: str) -> _Family | None:
    kind_base = kind.split(":")[0]
    target = kind.split(":")[1] if ":" in kind else None
    distinct: dict[int, int] = {}
    members: list[Adapter] = []
    row_index: list[int] = []  # -1: the row has no adapter of this family
    row_scale: list[float] = []
    for a in adapters:
        uses = a is not None and a.config.kind == kind_base and (target is None or target in a.config.targets)
        if not uses:
            row_index.append(-1)
            row_scale.append(0.0)
            continue
        assert a is not None
        if id(a) not in distinct:
            distinct[id(a)] = len(members)
            members.append(a)
        row_index.append(distinct[id(a)])
        row_scale.append(float(scale_of(a)))
    if not members:
        return None
    device = prompt_mask.device
    scale = torch.tensor(row_scale, dtype=torch.float32, device=device)
    mask = (prompt_mask.float() * scale[:, None]).unsqueeze(-1)
    rank = max(a.config.rank for a in members)
    index = torch.tensor(row_index, device=device)
    rows = [torch.nonzero(index == u).flatten() for u in range(len(members))] if strategy == "segment" else []
    return _Family(members, index.clamp(min=0), mask, rank, names, rows, strategy)
