"""One batched decode step (one new token per row, no adapters) with feature-major activations.

`Model.forward` keeps activations token-major (`[B, T, d]`) and multiplies `x @ W.T`, which is
what prefill, training and the adapter hooks want. A decode step has T = 1 (and in the decode
service no hooks), so here every activation is feature-major (`[d, B]`) and each projection is one
`W @ X` GEMM whose output is already the next one's input layout. On the 2-core AVX2 CPU of the
first sessions, MKL ran `W @ X` 15-50 % faster than `X @ W.T` at decode shapes (64 rows,
576..49,152 features) and 1.6x faster for the LM head (bench/decode.py measures this step against
`Model.forward` side by side; docs/benchmarks.md has the numbers). The maths is `Model.forward`'s,
term by term (tests compare the two); only the order of floating-point sums inside matmuls differs.

Attention (with RoPE and the KV write) runs, per layer, through the native CPU kernel in
prad/kernels where it is available (fp32 / bf16, common head shapes), else through PyTorch: SDPA
over the slot cache `[B, Hkv, S, D]` with GQA folded into the query length. For RMSNorm models the
residual add + norm and SiLU(gate) * up are native kernels too. docs/design.md gives the reasons
for these and for the step's other CPU choices (the bf16 LM head, element-wise work on one thread).

The decode service never passes `hooks`. They exist for the benchmarks' conventional-adapter arms
(LoRA applied at every decode step), so those decode through this same step and a comparison with
PrAd measures the method, not two different decode loops; hooks see token-major `[B, 1, features]`
views, as in `Model.forward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from prad import kernels
from prad.config import ModelConfig
from prad.kv_cache import KVCache
from prad.model import AdapterHooks, Model, apply_rope, rms_norm
from prad.weights import LayerWeights

LM_HEAD_CHUNK_ROWS = 2048  # CPU fp32: vocab rows per LM-head GEMM, so each [2048, d] slice stays in cache
# On CPU the batch is padded to a multiple of this many columns: MKL's sgemm runs `W @ X` with 2-11
# or odd column counts up to 2x slower than with the next multiple of 16 (e.g. a whole SmolLM2 step's
# projections at 31 columns: 166 ms, padded to 32: 103 ms); one column (a GEMV) is left alone.
CPU_COLUMN_MULTIPLE = 16


def padded_columns(batch: int, device: torch.device, native_linear: bool = False) -> int:
    """How many activation columns a step of `batch` rows computes (the extra ones are zeros). One
    row stays one column (a GEMV) unless the native bf16 projections run (`native_linear`): torch's
    bf16 GEMV took a batch-1 step 47 ms, 16 padded columns through the kernel 25 ms (session 8)."""
    if device.type != "cpu" or (batch == 1 and not native_linear):
        return batch
    return -(-batch // CPU_COLUMN_MULTIPLE) * CPU_COLUMN_MULTIPLE


@torch.inference_mode()
def decode_step(model: Model, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache,
                hooks: AdapterHooks | None = None, native_kernels: bool = True) -> torch.Tensor:
    """token_ids, positions: [B]; row b's token goes to position positions[b] of kv row b.

    Returns logits [B, V] in fp32, the same as `model.forward(ids[:, None], positions[:, None], kv,
    logit_index=0)` up to matmul rounding. Attention and (for RMSNorm models) the residual add +
    norm and SiLU * up run through the native kernels (prad/kernels) where they support the device,
    dtype and head shape, unless `native_kernels` is False (bench/decode.py compares the two).
    """
    device = model.weights.embed.device
    # On CPU the step's element-wise work runs inline on the calling thread and only the GEMMs,
    # attention and the LM head fan out to `threads`: each op on a [576, 64] tensor is just over
    # torch's parallel grain, and waking a sleeping OpenMP thread for it (OMP_WAIT_POLICY=PASSIVE)
    # costs ~50 us against ~5 us of work. Paired A/B at batch 64: x1.37 per step in bf16, x1.12 in
    # fp32; neutral at batch 1-8. The thread count is process-wide: in embedded mode the step runs
    # under the engines' compute lock, so prefill never computes while it is lowered.
    threads = torch.get_num_threads()
    with _num_threads(1 if device.type == "cpu" else threads):
        return _step(model, token_ids, positions, kv, hooks, threads, native_kernels)


def _step(model: Model, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache,
          hooks: AdapterHooks | None, threads: int, native_kernels: bool) -> torch.Tensor:
    w, c = model.weights, model.config
    bsz = token_ids.shape[0]
    native_linear = native_kernels and kernels.supports_linear(w.embed.dtype, w.embed.device)
    # h: [d, P], P >= B columns; padding columns start at zero and never reach attention or the KV.
    h = _columns(w.embed[token_ids].t(), padded_columns(bsz, w.embed.device, native_linear))
    if w.pos_embed is not None:
        h[:, :bsz] += w.pos_embed[positions].t()
    native = native_kernels and kernels.supports(w.embed.dtype, w.embed.device, c.head_dim,
                                                 c.num_heads // c.num_kv_heads)
    attend = _native_attend(model) if native else _torch_attend(model, positions)
    fused = native_kernels and c.family == "llama" and kernels.supports_elementwise(w.embed.dtype, w.embed.device)
    add_norm = _fused_add_norm(c) if fused else _torch_add_norm(c)
    native_linear = native_linear and kernels.linear_columns_ok(h)
    linear = _native_linear(threads) if native_linear else _torch_linear(threads)
    # Each layer's input norm is computed with the residual add that precedes it (the previous
    # layer's MLP output; the last one's feeds the final norm).
    h, x = add_norm(h, None, w.layers[0].attn_norm_w, w.layers[0].attn_norm_b)
    for i, lw in enumerate(w.layers):
        h, z = add_norm(h, _attention(c, i, lw, x, positions, kv, attend, linear, hooks, threads), lw.mlp_norm_w,
                        lw.mlp_norm_b)
        y = _mlp(c, lw, z, linear, fused)
        if hooks is not None:
            y = _token_major(hooks.adapt_mlp, i, z, y, bsz)
        following = w.layers[i + 1] if i + 1 < len(w.layers) else None
        h, x = add_norm(h, y, following.attn_norm_w if following else w.final_norm_w,
                        following.attn_norm_b if following else w.final_norm_b)
    if native_linear:
        return kernels.lm_head_bf16(w.lm_head, x, bsz, threads)
    with _num_threads(threads):
        return _lm_head(w.lm_head, x, bsz)


# add_norm(h, y, weight, bias) -> (h + y, norm(h + y)); y None: no add. h [d, P], y [d, P].
AddNorm = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
                   tuple[torch.Tensor, torch.Tensor]]


def _torch_add_norm(c: ModelConfig) -> AddNorm:
    def add_norm(h: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = h if y is None else h + y
        return h, _norm(c, h, weight, bias)

    return add_norm


def _fused_add_norm(c: ModelConfig) -> AddNorm:
    """RMSNorm models on CPU: one native pass (prad/kernels/elementwise.cpp) adds y into h in place
    and normalises, instead of an add and seven small ops."""
    def add_norm(h: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return h, kernels.add_rms_norm(h, y, weight, c.norm_eps)

    return add_norm


@contextmanager
def _num_threads(num: int) -> Iterator[None]:
    """torch's intra-op thread count is `num` inside the block (setting it costs ~0.1 us)."""
    before = torch.get_num_threads()
    if num == before:
        yield
        return
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _columns(x: torch.Tensor, num_columns: int) -> torch.Tensor:
    """x [features, B] as a contiguous [features, num_columns] tensor, zero past column B."""
    if x.shape[1] == num_columns:
        return x.contiguous()
    padded = x.new_zeros(x.shape[0], num_columns)
    padded[:, :x.shape[1]] = x
    return padded


# linear(weight [out, in], x [in, P], bias [out] or None) -> weight @ x (+ bias) [out, P]
Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _torch_linear(threads: int) -> Linear:
    """torch.mm / addmm on `threads` threads (MKL in fp32, oneDNN in bf16 on CPU)."""
    def linear(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        with _num_threads(threads):
            if bias is None:
                return torch.mm(weight, x)
            return torch.addmm(bias[:, None], weight, x)

    return linear


def _native_linear(threads: int) -> Linear:
    """bf16 on a CPU with AVX512-BF16: prad/kernels/linear_bf16.cpp, x1.4 faster than oneDNN's
    torch.mm over a SmolLM2 step's projections at 64 columns, x2.2 at 16 (docs/design.md)."""
    def linear(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return kernels.linear_bf16(weight, x, bias, threads)

    return linear


def _token_major(hook: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], layer: int,
                 x: torch.Tensor, y: torch.Tensor, bsz: int) -> torch.Tensor:
    """Call an adapter hook on the B real columns of feature-major x [in, P], y [out, P] through
    [B, 1, features] views; returns y with those columns adapted."""
    adapted = hook(layer, x[:, :bsz].t().unsqueeze(1), y[:, :bsz].t().unsqueeze(1))  # [B, 1, out]
    y = y.clone()
    y[:, :bsz] = adapted.squeeze(1).t()
    return y


def _norm(c: ModelConfig, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`Model._norm` over the feature axis (dim 0) of x [d, B]."""
    if c.family == "gpt2":
        assert bias is not None
        mean = x.mean(0, keepdim=True)
        var = (x - mean).pow(2).mean(0, keepdim=True)
        return (x - mean) * torch.rsqrt(var + c.norm_eps) * weight[:, None] + bias[:, None]
    return rms_norm(x, weight[:, None], c.norm_eps, dim=0)


# attend(layer, q [H, D, B], k [Hkv, D, B], v [Hkv, D, B], positions, kv, threads) -> [q_size, B]:
# RoPE on q and k, the KV write at each row's position, attention over keys [0, position].
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, KVCache, int], torch.Tensor]


def _attention(c: ModelConfig, layer: int, lw: LayerWeights, x: torch.Tensor, positions: torch.Tensor,
               kv: KVCache, attend: Attend, linear: Linear, hooks: AdapterHooks | None, threads: int) -> torch.Tensor:
    """x: [d, P]; attention over the B = len(positions) real columns; returns [d, P]."""
    bsz, num_columns = positions.shape[0], x.shape[1]
    qkv = linear(lw.qkv_w, x, lw.qkv_b)
    if hooks is not None:
        qkv = _token_major(hooks.adapt_qkv, layer, x, qkv, bsz)
    q, k, v = qkv[:, :bsz].split([c.q_size, c.kv_size, c.kv_size], dim=0)
    a = attend(layer, q.view(c.num_heads, c.head_dim, bsz), k.view(c.num_kv_heads, c.head_dim, bsz),
               v.view(c.num_kv_heads, c.head_dim, bsz), positions, kv, threads)
    a_columns = _columns(a, num_columns)  # [q_size, P]
    o = linear(lw.o_w, a_columns, lw.o_b)
    return o if hooks is None else _token_major(hooks.adapt_o, layer, a_columns, o, bsz)


def _native_attend(model: Model) -> Attend:
    """Attention through prad/kernels (CPU, fp32 / bf16): RoPE, KV write and attention in one call
    per layer, each row's K/V streamed once for all the query heads that share it. On the 2-core
    Xeon (AMX) VM of session 6, batch 64, 129 keys: 0.43 ms per layer in bf16 against 1.11 ms for
    SDPA alone (docs/design.md)."""
    c = model.config
    scale = 1.0 / math.sqrt(c.head_dim)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               kv: KVCache, threads: int) -> torch.Tensor:
        bsz = positions.shape[0]
        out = q.new_empty(c.q_size, bsz)
        kernels.decode_attention(q.permute(2, 0, 1), k.permute(2, 0, 1), v.permute(2, 0, 1), kv.k[layer],
                                 kv.v[layer], positions, model.rope, scale,
                                 out.view(c.num_heads, c.head_dim, bsz).permute(2, 0, 1), threads)
        return out

    return attend


def _torch_attend(model: Model, positions: torch.Tensor) -> Attend:
    """Attention through PyTorch ops (GPU, or a CPU without the native kernel): RoPE in fp32,
    `KVCache.update`, then SDPA with GQA folded into the query length."""
    c = model.config
    num_keys = int(positions.max()) + 1
    key_pos = torch.arange(num_keys, device=positions.device)
    mask = (key_pos[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, S]
    rope = None
    if model.rope is not None:
        cos, sin = model.rope
        rope = cos[positions].t()[None], sin[positions].t()[None]  # [1, D, B] against [heads, D, B]

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               kv: KVCache, threads: int) -> torch.Tensor:
        bsz = positions.shape[0]
        if rope is not None:
            q, k = apply_rope(q, rope, dim=1), apply_rope(k, rope, dim=1)  # head_dim is axis 1 of [heads, D, B]
        # [B, Hkv, 1, D] at each row's one position
        keys, values = kv.update(layer, k.permute(2, 0, 1).unsqueeze(2), v.permute(2, 0, 1).unsqueeze(2),
                                 positions[:, None], num_keys)  # [B, Hkv, S, D]
        # GQA folded into the query length: the G = H / Hkv query heads that share a KV head are one
        # query block of G rows over the same keys (one token, so no causal order among them). SDPA's
        # CPU kernel with enable_gqa walks K/V once per query head, and in bf16 converts every K/V
        # block each time: folded it is 3.5-8x faster in bf16 and equal (+-6 %) in fp32 at batch 1-64
        # and 129-4,096 keys (docs/design.md). It needs a contiguous query, else SDPA copies K/V per head.
        q = q.permute(2, 0, 1).contiguous().view(bsz, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim)
        with _num_threads(threads):
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0 / math.sqrt(c.head_dim))
        return a.reshape(bsz, c.q_size).t()

    return attend


def _mlp(c: ModelConfig, lw: LayerWeights, z: torch.Tensor, linear: Linear, fused: bool) -> torch.Tensor:
    if c.family == "llama":
        gate_up = linear(lw.mlp_in_w, z, None)
        if fused:
            return linear(lw.mlp_out_w, kernels.silu_mul(gate_up), None)
        gate, up = gate_up.chunk(2, dim=0)  # row halves: contiguous
        return linear(lw.mlp_out_w, F.silu(gate) * up, None)
    hidden = F.gelu(linear(lw.mlp_in_w, z, lw.mlp_in_b), approximate="tanh")
    return linear(lw.mlp_out_w, hidden, lw.mlp_out_b)


def _lm_head(lm_head: torch.Tensor, h: torch.Tensor, bsz: int) -> torch.Tensor:
    """lm_head [V, d] with h [d, P] -> logits [B, V] of the first B columns (contiguous, fp32).

    fp32 on CPU (MKL's sgemm): `lm_head @ h` one vocab slice at a time, each slice's [rows, P]
    product transposed into the output while it is still in cache (a transpose of the whole [V, B]
    at the end costs ~13 ms at B = 64, V = 49,152). Otherwise (bf16 on CPU runs through oneDNN, or a
    GPU) one token-major GEMM `h.T @ lm_head.T`: in bf16 on a CPU with native bf16 it takes 1.9 /
    2.2 / 6.0 ms at B = 1 / 8 / 64 against 3.6 / 6.4 / 9.8 ms sliced (measured in isolation, session 5;
    docs/design.md)."""
    if h.device.type != "cpu" or h.dtype != torch.float32:
        return torch.mm(h[:, :bsz].t(), lm_head.t()).float()
    vocab = lm_head.shape[0]
    logits = torch.empty(bsz, vocab, dtype=torch.float32, device=h.device)
    part = torch.empty(min(LM_HEAD_CHUNK_ROWS, vocab), h.shape[1], dtype=h.dtype, device=h.device)
    for start in range(0, vocab, LM_HEAD_CHUNK_ROWS):
        rows = lm_head[start:start + LM_HEAD_CHUNK_ROWS]
        torch.mm(rows, h, out=part[:rows.shape[0]])
        logits[:, start:start + rows.shape[0]].copy_(part[:rows.shape[0], :bsz].t())
    return logits
