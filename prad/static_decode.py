"""The static-shape decode step: batch buckets, preallocated inputs, no host synchronisation.

Why. On a GPU a small model's decode step is bound by kernel launches (30 layers x ~35 kernels
from Python), so the step must be replayable as one CUDA graph (prad/cuda_graphs.py). A graph fixes
every shape and every address, and cannot wait for the host, so this step:

* pads the batch of n rows to a bucket (1, 2, 4, ... capped at the cache's rows) and computes rows
  [0, bucket): see `bucket_for`. The padding rows (token 0 at position 0) are rows n..bucket-1 of
  the decode runner's slot cache, which are free: the runner keeps running rows dense in [0, n).
  What the padding writes there is never read: a request later admitted to such a row gets its
  prompt KV inserted over positions [0, length), and a row's query reads only positions <= its own,
  each written by the step at that position before attention reads it (write, then attend).
* reads its inputs from preallocated device buffers (token ids, positions) and writes K/V with
  `scatter_` at each row's position, not with index_put and advanced indexing;
* attends over the cache's whole capacity with a position mask (key position <= query position)
  instead of slicing the keys to max(position) + 1, which needs the positions on the host.

With graphs off, or off CUDA, the same step runs eagerly; tests hold it to `ReferenceStep`'s tokens
on CPU, so its logic is proven without a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prad.config import ModelConfig
from prad.cuda_graphs import DecodeGraphs, GraphStats
from prad.decode_step import StepBackend
from prad.kv_cache import KVCache
from prad.model import Model, apply_rope, rms_norm
from prad.weights import LayerWeights


def bucket_for(num_rows: int, limit: int) -> int:
    """The padded batch for `num_rows` rows: the next power of two, capped at `limit` (the rows
    there are), so a batch is one of `batch_buckets(limit)`."""
    if not 1 <= num_rows <= limit:
        raise ValueError(f"a decode step of {num_rows} rows needs 1 to {limit} rows")
    return min(1 << (num_rows - 1).bit_length(), limit)


def batch_buckets(limit: int) -> list[int]:
    """Every bucket a batch of up to `limit` rows pads to: 1, 2, 4, ... below `limit`, then `limit`."""
    return [1 << i for i in range((limit - 1).bit_length()) if 1 << i < limit] + [limit]


class StaticStep(StepBackend):
    """The decode step on static shapes; with `use_graphs` (CUDA only) each bucket is one CUDA graph.

    `step` takes a cache with at least `bucket_for(B, ...)` rows: the decode runner passes its whole
    slot cache (rows past B are free; see the module docstring). Given a cache of exactly B rows,
    it pads no further than B. The logits it returns are a view of the step's own output, valid
    until its next call.
    """

    def __init__(self, model: Model, max_batch_size: int, use_graphs: bool = False) -> None:
        if use_graphs and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, not on {model.device}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.token_ids = torch.zeros(max_batch_size, dtype=torch.long, device=model.device)  # [max rows]
        self.positions = torch.zeros(max_batch_size, dtype=torch.long, device=model.device)  # [max rows]
        self.graphs = DecodeGraphs(self._forward, self.token_ids, self.positions) if use_graphs else None
        self.name = "static-graphs" if use_graphs else "static"

    def __str__(self) -> str:
        return f"{self.name} (buckets {batch_buckets(self.max_batch_size)})"

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache) -> torch.Tensor:
        num_rows = token_ids.shape[0]
        bucket = bucket_for(num_rows, min(kv.num_rows, self.max_batch_size))
        if self.graphs is not None:
            self.graphs.ensure(bucket, kv)  # captures on first use with this cache (it uses the buffers)
        self.token_ids[:num_rows].copy_(token_ids)
        self.positions[:num_rows].copy_(positions)
        self.token_ids[num_rows:bucket].zero_()  # padding rows: token 0 at position 0 of free rows
        self.positions[num_rows:bucket].zero_()
        logits = self._forward(bucket, kv) if self.graphs is None else self.graphs.replay(bucket)
        return logits[:num_rows]

    @torch.inference_mode()
    def capture(self, kv: KVCache) -> GraphStats:
        """Capture every bucket's graph for `kv` now (start-up), rather than on each bucket's first step."""
        if self.graphs is None:
            raise ValueError("this static step runs without CUDA graphs")
        for bucket in reversed(batch_buckets(min(kv.num_rows, self.max_batch_size))):
            self.graphs.ensure(bucket, kv)  # largest first: smaller graphs reuse its pool memory
        return self.graphs.stats()

    def graph_stats(self) -> GraphStats | None:
        """Capture time and memory so far; None without graphs."""
        return None if self.graphs is None else self.graphs.stats()

    def _forward(self, bucket: int, kv: KVCache) -> torch.Tensor:
        return decode_forward(self.model, self.token_ids[:bucket], self.positions[:bucket], kv)


def decode_forward(model: Model, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache) -> torch.Tensor:
    """`Model.forward` for one token per row of rows [0, P) of `kv`, on static shapes and without a host
    sync: token_ids, positions [P] -> logits [P, V] fp32. Positions must lie below kv.capacity."""
    w, c = model.weights, model.config
    rows = token_ids.shape[0]
    h = F.embedding(token_ids, w.embed)  # [P, d]
    if w.pos_embed is not None:
        h = h + F.embedding(positions, w.pos_embed)
    key_positions = torch.arange(kv.capacity, device=positions.device)  # [S]
    mask = (key_positions[None, :] <= positions[:, None])[:, None, None, :]  # [P, 1, 1, S]
    # Where each row's new K/V goes: [P, Hkv, 1, D] indices into a layer's [P, Hkv, S, D] along S.
    slots = positions.view(-1, 1, 1, 1).expand(-1, c.num_kv_heads, 1, c.head_dim)
    rope = None
    if model.rope is not None:
        cos, sin = model.rope
        rope = cos[positions][:, None, :], sin[positions][:, None, :]  # [P, 1, D], broadcast over heads
    for i, lw in enumerate(w.layers):
        x = _norm(c, h, lw.attn_norm_w, lw.attn_norm_b)
        h = h + _attention(c, lw, x, kv.k[i, :rows], kv.v[i, :rows], slots, mask, rope)
        h = h + _mlp(c, lw, _norm(c, h, lw.mlp_norm_w, lw.mlp_norm_b))
    h = _norm(c, h, w.final_norm_w, w.final_norm_b)
    return F.linear(h, w.lm_head).float()


def _attention(c: ModelConfig, lw: LayerWeights, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               slots: torch.Tensor, mask: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """x: [P, d] -> [P, d]. keys, values: one layer's cache rows [P, Hkv, S, D], written in place."""
    rows = x.shape[0]
    q, k, v = F.linear(x, lw.qkv_w, lw.qkv_b).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
    q = q.view(rows, c.num_heads, c.head_dim)  # [P, H, D]
    k = k.view(rows, c.num_kv_heads, c.head_dim)  # [P, Hkv, D]
    v = v.view(rows, c.num_kv_heads, c.head_dim)
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    keys.scatter_(2, slots, k.unsqueeze(2).to(keys.dtype))
    values.scatter_(2, slots, v.unsqueeze(2).to(values.dtype))
    # One query per row: the G query heads that share a KV head become that head's G queries (head h
    # reads KV head h // G, as enable_gqa does), so K/V are read in place, never repeated.
    group = c.num_heads // c.num_kv_heads
    a = F.scaled_dot_product_attention(q.view(rows, c.num_kv_heads, group, c.head_dim), keys, values,
                                       attn_mask=mask, scale=1.0 / math.sqrt(c.head_dim))  # [P, Hkv, G, D]
    return F.linear(a.reshape(rows, c.q_size), lw.o_w, lw.o_b)


def _mlp(c: ModelConfig, lw: LayerWeights, z: torch.Tensor) -> torch.Tensor:
    """`Model._mlp` without hooks: SwiGLU (llama family) or GELU (gpt2)."""
    if c.family == "llama":
        gate, up = F.linear(z, lw.mlp_in_w).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, lw.mlp_out_w)
    return F.linear(F.gelu(F.linear(z, lw.mlp_in_w, lw.mlp_in_b), approximate="tanh"), lw.mlp_out_w, lw.mlp_out_b)


def _norm(c: ModelConfig, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if c.family == "gpt2":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, c.norm_eps)
    return rms_norm(x, weight, c.norm_eps)
