"""Our forward pass for the llama family (Llama, SmolLM, Qwen2) and GPT-2, gpt-fast style.

One function serves every phase: prefill (many rows, any lengths, optional earlier chunks),
decode (one token per row over a slot cache) and the no-cache reference forward. Rows carry their
own positions; a key is visible to a query iff `key_position <= query_position`, which is the causal
mask for every one of those phases because the cache holds each row's tokens at their positions.

Adapters enter through `AdapterHooks`, a protocol this module defines but never implements: the
decode service uses this file with `hooks=None` and so never imports adapter code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from prad.config import ModelConfig
from prad.kv_cache import KVCache
from prad.weights import LayerWeights, ModelWeights


class AdapterHooks(Protocol):
    """Per-row adapter maths for one batch; each method returns its (possibly) adapted output."""

    def adapt_qkv(self, layer: int, x: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """x: normed attention input [B, T, d]; qkv: fused projection output [B, T, q + 2kv]."""
        ...

    def adapt_o(self, layer: int, a: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """a: attention output before o_proj [B, T, q]; o: o_proj output [B, T, d]."""
        ...

    def adapt_mlp(self, layer: int, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z: normed FFN input [B, T, d]; y: FFN output [B, T, d]."""
        ...


def rope_tables(config: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_positions, head_dim] in fp32 (HF's rotate-half convention)."""
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64)
                                            / config.head_dim))
    t = torch.arange(config.max_position_embeddings, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


class Model:
    """A base model ready to run: config + weights in our layout + RoPE tables."""

    def __init__(self, config: ModelConfig, weights: ModelWeights) -> None:
        self.config = config
        self.weights = weights
        device = weights.embed.device
        self.rope = rope_tables(config, device) if config.family == "llama" else None

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def new_kv_cache(self, batch_size: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache.empty(c.num_layers, batch_size, c.num_kv_heads, capacity, c.head_dim,
                             self.dtype, self.device)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T], each row's absolute positions
        kv: KVCache | None,  # rows [0, B) receive this step's K/V at `positions`; None: no cache
        hooks: AdapterHooks | None = None,
        logit_index: torch.Tensor | None = None,  # [B]: the one t per row whose logits we need
        on_layer: Callable[[int], None] | None = None,  # called with i once layer i's K/V are in `kv`
    ) -> torch.Tensor:
        """Logits [B, V] when logit_index is given, else [B, T, V]."""
        return self.forward_train(token_ids, positions, kv, hooks, logit_index, on_layer)

    def forward_train(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache | None,
        hooks: AdapterHooks | None = None,
        logit_index: torch.Tensor | None = None,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """`forward` without inference mode, so gradients flow into adapter weights (training).

        With `kv=None` the keys are this call's tokens only, so `positions` must be 0..T-1 per row.
        """
        w = self.weights
        h = F.embedding(token_ids, w.embed)
        if w.pos_embed is not None:
            h = h + F.embedding(positions, w.pos_embed)
        mask = self.causal_mask(positions)
        rope = self.rope_at(positions)
        for i, lw in enumerate(w.layers):
            h = h + self._attention(i, lw, self._norm(h, lw.attn_norm_w, lw.attn_norm_b), positions,
                                    kv, mask, rope, hooks)
            if on_layer is not None:  # e.g. prefill streaming layer i's KV while the rest computes
                on_layer(i)
            h = h + self._mlp(i, lw, self._norm(h, lw.mlp_norm_w, lw.mlp_norm_b), hooks)
        if logit_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logit_index]  # [B, d]
        h = self._norm(h, w.final_norm_w, w.final_norm_b)
        return F.linear(h, w.lm_head).float()

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.config.family == "gpt2":
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.config.norm_eps)
        return rms_norm(x, weight, self.config.norm_eps)

    def _attention(
        self,
        layer: int,
        lw: LayerWeights,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache | None,
        mask: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        hooks: AdapterHooks | None,
    ) -> torch.Tensor:
        qkv = F.linear(x, lw.qkv_w, lw.qkv_b)
        if hooks is not None:
            qkv = hooks.adapt_qkv(layer, x, qkv)
        a = self.attend(layer, qkv, positions, kv, mask, rope)
        o = F.linear(a, lw.o_w, lw.o_b)
        if hooks is not None:
            o = hooks.adapt_o(layer, a, o)
        return o

    def attend(self, layer: int, qkv: torch.Tensor, positions: torch.Tensor, kv: KVCache | None, mask: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """qkv [B, T, q + 2 kv features] -> attention output [B, T, q_size]: RoPE on q and k, this call's
        K/V written into `kv` at `positions`, then each query over the keys the mask lets it see."""
        c = self.config
        bsz, seq_len, _ = qkv.shape
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(bsz, seq_len, c.num_heads, c.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(bsz, seq_len, c.num_kv_heads, c.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(bsz, seq_len, c.num_kv_heads, c.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv is None:
            keys, values = k, v
        else:
            keys, values = kv.update(layer, k, v, positions, mask.shape[-1])  # [B, Hkv, S, D]
        a = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=1.0 / math.sqrt(c.head_dim),
            enable_gqa=c.num_kv_heads != c.num_heads,
        )
        return a.transpose(1, 2).reshape(bsz, seq_len, c.q_size)

    def causal_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, S] for rows of `positions` [B, T]: a query sees the keys at positions <= its own (so
        padding and earlier chunks need nothing more); S = max position + 1."""
        key_pos = torch.arange(int(positions.max()) + 1, device=positions.device)
        return key_pos[None, None, None, :] <= positions[:, None, :, None]

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin at `positions` [B, T] as [B, 1, T, D] (broadcast over heads); None without RoPE."""
        if self.rope is None:
            return None
        cos, sin = self.rope
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

    def _mlp(self, layer: int, lw: LayerWeights, z: torch.Tensor, hooks: AdapterHooks | None) -> torch.Tensor:
        if self.config.family == "llama":
            gate, up = F.linear(z, lw.mlp_in_w).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, lw.mlp_out_w)
        else:
            y = F.linear(F.gelu(F.linear(z, lw.mlp_in_w, lw.mlp_in_b), approximate="tanh"),
                         lw.mlp_out_w, lw.mlp_out_b)
        if hooks is not None:
            y = hooks.adapt_mlp(layer, z, y)
        return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dim: int = -1) -> torch.Tensor:
    """RMSNorm over `dim` in fp32; `weight` must broadcast against x along that axis."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], dim: int = -1) -> torch.Tensor:
    """Rotate-half RoPE (HF's convention) with head_dim on axis `dim`, in fp32; cos/sin broadcast."""
    cos, sin = rope
    half = x.shape[dim] // 2
    rotated = torch.cat([-x.narrow(dim, half, x.shape[dim] - half), x.narrow(dim, 0, half)], dim=dim)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
