"""The parts of the CPU decode step that have two implementations, chosen once per model.

Each part runs on a native kernel (prad/kernels) where the kernels support the model's dtype and
head shape on this CPU, else on PyTorch ops that compute the same values up to the order of
floating-point sums (unit tests run both). Activations are feature-major: x [features, P], P the
step's columns (the batch, padded; prad/cpu_decode/step.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prad import kernels
from prad.config import ModelConfig
from prad.kv_cache import KVCache
from prad.model import Model, apply_rope, rms_norm

LM_HEAD_CHUNK_ROWS = 2048  # fp32 LM head: vocab rows per GEMM, so each [rows, P] product stays in cache

# (weight [out, in], x [in, P], bias [out] or None) -> weight @ x (+ bias) [out, P]
Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# (h [d, P], y [d, P] or None, weight [d], bias [d] or None) -> (h + y, norm(h + y)); y None: no add
AddNorm = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
                   tuple[torch.Tensor, torch.Tensor]]
# (layer, q [H, D, B], k [Hkv, D, B], v [Hkv, D, B], kv) -> attention output [H * D, B]: RoPE on q
# and k, the new K/V written at each row's position, attention over keys [0, position].
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, KVCache], torch.Tensor]
# (lm_head [V, d], x [d, P], B) -> logits [B, V] of the first B columns, fp32 and contiguous
LmHead = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class StepOps:
    """One model's choice of implementation for each part of the step."""

    linear: Linear
    add_norm: AddNorm
    silu_mul: Callable[[torch.Tensor], torch.Tensor]  # gate_up [2I, P] -> SiLU(gate) * up [I, P]
    attention: Callable[[torch.Tensor], Attend]  # positions [B] -> this step's Attend
    lm_head: LmHead
    native: tuple[str, ...]  # the parts that run on native kernels (for logs)
    # A step of up to this many rows computes exactly that many columns, a wider one pads to a multiple
    # of 16: the native bf16 projections take multiples of 16 only (0), the narrow fp32 kernel up to
    # NARROW_COLUMNS, torch.mm one column (a matrix-vector product) at its speed, 2-15 far below it.
    unpadded_rows: int


def choose_ops(model: Model, threads: int, native_kernels: bool = True) -> StepOps:
    """The native kernel for each part where it applies (and `native_kernels`), else PyTorch's.
    `threads`: how many threads the native kernels' pool uses."""
    c, dtype, device = model.config, model.dtype, model.device
    group = c.num_heads // c.num_kv_heads
    native_attention = native_kernels and kernels.supports(dtype, device, c.head_dim, group)
    native_norm = native_kernels and c.family == "llama" and kernels.supports_elementwise(dtype, device)
    native_linear = native_kernels and kernels.supports_linear(dtype, device)
    native_narrow = native_kernels and kernels.supports_narrow_linear(dtype, device)
    native = tuple(name for name, used in (("attention", native_attention), ("add_rms_norm", native_norm),
                                           ("silu_mul", native_norm), ("linear_bf16", native_linear),
                                           ("linear_narrow_f32", native_narrow)) if used)
    linear: Linear = _torch_linear
    lm_head: LmHead = _torch_lm_head
    if native_linear:
        linear, lm_head = _native_linear(threads), _native_lm_head(threads)
    elif native_narrow:
        linear, lm_head = _narrow_linear(threads), _narrow_lm_head(threads)
    return StepOps(
        linear=linear,
        add_norm=_native_add_norm(c) if native_norm else _torch_add_norm(c),
        silu_mul=kernels.silu_mul if native_norm else _torch_silu_mul,
        attention=_native_attention(model, threads) if native_attention else _torch_attention(model),
        lm_head=lm_head,
        native=native,
        unpadded_rows=0 if native_linear else kernels.NARROW_COLUMNS if native_narrow else 1,
    )


def _torch_linear(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(weight, x) if bias is None else torch.addmm(bias[:, None], weight, x)


def _native_linear(threads: int) -> Linear:
    """bf16 on CPUs with AVX512-BF16 (prad/kernels/linear_bf16.cpp)."""
    def linear(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return kernels.linear_bf16(weight, x, bias, threads)

    return linear


def _narrow_linear(threads: int) -> Linear:
    """fp32: steps of up to NARROW_COLUMNS columns on the kernels' pool (prad/kernels/linear_narrow_f32.cpp),
    wider ones on torch.mm."""
    def linear(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[1] <= kernels.NARROW_COLUMNS:
            return kernels.linear_narrow_f32(weight, x, bias, threads)
        return _torch_linear(weight, x, bias)

    return linear


def _narrow_lm_head(threads: int) -> LmHead:
    """fp32: the logits of a step of up to NARROW_COLUMNS rows, written token-major by the narrow kernel."""
    def lm_head(weight: torch.Tensor, x: torch.Tensor, bsz: int) -> torch.Tensor:
        if x.shape[1] <= kernels.NARROW_COLUMNS:
            return kernels.linear_narrow_f32(weight, x[:, :bsz].contiguous(), None, threads, transposed=True)
        return _torch_lm_head(weight, x, bsz)

    return lm_head


def _torch_add_norm(c: ModelConfig) -> AddNorm:
    def add_norm(h: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = h if y is None else h + y
        if c.family == "gpt2":  # LayerNorm over the feature axis
            assert bias is not None
            mean = h.mean(0, keepdim=True)
            var = (h - mean).pow(2).mean(0, keepdim=True)
            return h, (h - mean) * torch.rsqrt(var + c.norm_eps) * weight[:, None] + bias[:, None]
        return h, rms_norm(h, weight[:, None], c.norm_eps, dim=0)

    return add_norm


def _native_add_norm(c: ModelConfig) -> AddNorm:
    """RMSNorm models: one pass (prad/kernels/elementwise.cpp) adds y into h in place and normalises."""
    def add_norm(h: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return h, kernels.add_rms_norm(h, y, weight, c.norm_eps)

    return add_norm


def _torch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=0)  # row halves: contiguous
    return F.silu(gate) * up


def _native_attention(model: Model, threads: int) -> Callable[[torch.Tensor], Attend]:
    """prad/kernels/decode_attention.cpp: RoPE, the KV write and attention in one call per layer,
    each row's keys and values read once for all the query heads that share them."""
    c = model.config
    scale = 1.0 / math.sqrt(c.head_dim)

    def for_step(positions: torch.Tensor) -> Attend:
        bsz = positions.shape[0]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVCache) -> torch.Tensor:
            out = q.new_empty(c.q_size, bsz)
            # the kernel takes [B, heads, D] views, any strides
            kernels.decode_attention(q.permute(2, 0, 1), k.permute(2, 0, 1), v.permute(2, 0, 1), kv.k[layer],
                                     kv.v[layer], positions, model.rope, scale,
                                     out.view(c.num_heads, c.head_dim, bsz).permute(2, 0, 1), threads)
            return out

        return attend

    return for_step


def _torch_attention(model: Model) -> Callable[[torch.Tensor], Attend]:
    """RoPE in fp32, `KVCache.update`, then SDPA with GQA folded into the query length."""
    c = model.config
    group = c.num_heads // c.num_kv_heads

    def for_step(positions: torch.Tensor) -> Attend:
        bsz, num_keys = positions.shape[0], int(positions.max()) + 1
        key_pos = torch.arange(num_keys, device=positions.device)
        mask = (key_pos[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, S]
        rope = None
        if model.rope is not None:
            cos, sin = model.rope
            rope = cos[positions].t()[None], sin[positions].t()[None]  # [1, D, B] against [heads, D, B]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVCache) -> torch.Tensor:
            if rope is not None:
                q, k = apply_rope(q, rope, dim=1), apply_rope(k, rope, dim=1)  # head_dim is axis 1
            keys, values = kv.update(layer, k.permute(2, 0, 1).unsqueeze(2), v.permute(2, 0, 1).unsqueeze(2),
                                     positions[:, None], num_keys)  # [B, Hkv, S, D]
            # GQA folded into the query length: the G query heads that share a KV head form one
            # block of G queries over the same keys (one token per row, so no causal order among
            # them). SDPA's CPU kernel with enable_gqa instead walks the keys once per query head
            # (and in bf16 converts them each time). A contiguous query keeps SDPA from copying K/V.
            q = q.permute(2, 0, 1).contiguous().view(bsz, c.num_kv_heads, group, c.head_dim)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0 / math.sqrt(c.head_dim))
            return a.reshape(bsz, c.q_size).t()

        return attend

    return for_step


def _torch_lm_head(lm_head: torch.Tensor, x: torch.Tensor, bsz: int) -> torch.Tensor:
    """fp32: `lm_head @ x` one vocab slice at a time, each slice's [rows, P] product transposed into
    the token-major output while it is still in cache (cheaper than transposing all of [V, B] at the
    end). bf16 (oneDNN): one token-major GEMM, faster there than the slices."""
    if x.dtype != torch.float32:
        return torch.mm(x[:, :bsz].t(), lm_head.t()).float()
    vocab = lm_head.shape[0]
    logits = torch.empty(bsz, vocab, dtype=torch.float32)
    part = torch.empty(min(LM_HEAD_CHUNK_ROWS, vocab), x.shape[1], dtype=x.dtype)
    for start in range(0, vocab, LM_HEAD_CHUNK_ROWS):
        rows = lm_head[start:start + LM_HEAD_CHUNK_ROWS]
        torch.mm(rows, x, out=part[:rows.shape[0]])
        logits[:, start:start + rows.shape[0]].copy_(part[:rows.shape[0], :bsz].t())
    return logits


def _native_lm_head(threads: int) -> LmHead:
    """bf16 on CPUs with AVX512-BF16: the projection kernel writes each tile transposed into the
    fp32 logits, rounded through bf16 as a bf16 GEMM then `.float()` is, and only the real rows."""
    def lm_head(weight: torch.Tensor, x: torch.Tensor, bsz: int) -> torch.Tensor:
        return kernels.lm_head_bf16(weight, x, bsz, threads)

    return lm_head
