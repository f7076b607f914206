"""The CPU backend's decode step: `Model.forward` for one token per row, with feature-major activations.

`Model.forward` keeps activations token-major (`[B, T, d]`) and multiplies `x @ W.T`, the layout
prefill, training and the adapter hooks want. A decode step has one token per row, so here every
activation is feature-major (`[d, P]`) and each projection is one `W @ X` GEMM whose output is
already the next one's input layout; CPU BLAS runs that orientation faster at decode shapes
(docs/design.md). The maths is `Model.forward`'s term by term (tests compare the two); only the
order of floating-point sums inside matmuls and kernels differs.

The batch of B rows is padded to P columns, a multiple of CPU_COLUMN_MULTIPLE, because BLAS GEMMs
with a few or an odd number of columns run far below their speed at the next multiple of 16; a step
of a few rows runs unpadded where a kernel takes it at full speed (`StepOps.unpadded_rows`). The
padding columns start at zero, never reach attention or the KV cache, and are dropped at the LM head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from prad.config import ModelConfig
from prad.cpu_decode.ops import Attend, Linear, StepOps
from prad.kv_cache import KVCache
from prad.model import AdapterHooks, Model
from prad.weights import LayerWeights

CPU_COLUMN_MULTIPLE = 16


def padded_columns(batch: int, unpadded_rows: int = 1) -> int:
    """How many activation columns a step of `batch` rows computes: `batch` itself up to
    `unpadded_rows` (`StepOps.unpadded_rows`), else the next multiple of CPU_COLUMN_MULTIPLE."""
    if batch <= unpadded_rows:
        return batch
    return -(-batch // CPU_COLUMN_MULTIPLE) * CPU_COLUMN_MULTIPLE


def feature_major_step(model: Model, ops: StepOps, token_ids: torch.Tensor, positions: torch.Tensor,
                       kv: KVCache, hooks: AdapterHooks | None = None) -> torch.Tensor:
    """token_ids, positions: [B] -> logits [B, V] fp32; see `StepBackend.step`. `hooks` (adapters
    at every token) only for the benchmarks' conventional baselines: they see token-major
    [B, 1, features] views, as in `Model.forward`."""
    w, c = model.weights, model.config
    bsz = token_ids.shape[0]
    h = pad_columns(w.embed[token_ids].t(), padded_columns(bsz, ops.unpadded_rows))  # [d, P]
    if w.pos_embed is not None:
        h[:, :bsz] += w.pos_embed[positions].t()
    attend = ops.attention(positions)
    # Each layer's input norm is computed with the residual add before it (the previous layer's
    # MLP output), so a fused add + norm covers both; the last layer's feeds the final norm.
    h, x = ops.add_norm(h, None, w.layers[0].attn_norm_w, w.layers[0].attn_norm_b)
    for i, lw in enumerate(w.layers):
        a = _attention(c, i, lw, x, bsz, kv, attend, ops.linear, hooks)
        h, z = ops.add_norm(h, a, lw.mlp_norm_w, lw.mlp_norm_b)
        y = mlp(c, lw, z, ops)
        if hooks is not None:
            y = _token_major(hooks.adapt_mlp, i, z, y, bsz)
        following = w.layers[i + 1] if i + 1 < len(w.layers) else None
        norm_w, norm_b = ((following.attn_norm_w, following.attn_norm_b) if following
                          else (w.final_norm_w, w.final_norm_b))
        h, x = ops.add_norm(h, y, norm_w, norm_b)
    return ops.lm_head(w.lm_head, x, bsz)


def _attention(c: ModelConfig, layer: int, lw: LayerWeights, x: torch.Tensor, bsz: int, kv: KVCache,
               attend: Attend, linear: Linear, hooks: AdapterHooks | None) -> torch.Tensor:
    """x: [d, P] -> [d, P]; attention over the B real columns."""
    qkv = linear(lw.qkv_w, x, lw.qkv_b)  # [q_size + 2 kv_size, P]
    if hooks is not None:
        qkv = _token_major(hooks.adapt_qkv, layer, x, qkv, bsz)
    q, k, v = qkv[:, :bsz].split([c.q_size, c.kv_size, c.kv_size], dim=0)
    a = attend(layer, q.view(c.num_heads, c.head_dim, bsz), k.view(c.num_kv_heads, c.head_dim, bsz),
               v.view(c.num_kv_heads, c.head_dim, bsz), kv)  # [q_size, B]
    a = pad_columns(a, x.shape[1])  # [q_size, P]
    o = linear(lw.o_w, a, lw.o_b)
    return o if hooks is None else _token_major(hooks.adapt_o, layer, a, o, bsz)


def mlp(c: ModelConfig, lw: LayerWeights, z: torch.Tensor, ops: StepOps) -> torch.Tensor:
    if c.family == "llama":
        return ops.linear(lw.mlp_out_w, ops.silu_mul(ops.linear(lw.mlp_in_w, z, None)), None)
    hidden = F.gelu(ops.linear(lw.mlp_in_w, z, lw.mlp_in_b), approximate="tanh")
    return ops.linear(lw.mlp_out_w, hidden, lw.mlp_out_b)


def pad_columns(x: torch.Tensor, num_columns: int) -> torch.Tensor:
    """x [features, B] as a contiguous [features, num_columns] tensor, zero past column B."""
    if x.shape[1] == num_columns:
        return x.contiguous()
    padded = x.new_zeros(x.shape[0], num_columns)
    padded[:, :x.shape[1]] = x
    return padded


def _token_major(hook: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], layer: int,
                 x: torch.Tensor, y: torch.Tensor, bsz: int) -> torch.Tensor:
    """Call an adapter hook on the B real columns of x [in, P], y [out, P] through [B, 1, features]
    views; returns a copy of y with those columns adapted."""
    adapted = hook(layer, x[:, :bsz].t().unsqueeze(1), y[:, :bsz].t().unsqueeze(1))  # [B, 1, out]
    y = y.clone()
    y[:, :bsz] = adapted.squeeze(1).t()
    return y
