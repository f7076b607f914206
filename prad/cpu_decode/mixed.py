"""A decode step that also computes prompt chunks (role all): one pass, every weight read once for both.

When prefill and decode share the cores, a separate prefill pass stalls every stream being decoded for
its whole duration, and on a CPU each pass costs about a decode step before its first token (all the
weights are read again). Here the chunks' tokens ride in the decode step's own pass as extra
activation columns: every projection is one `W @ X` over the decode rows and the prompt tokens
together; only attention runs apart (decode rows over the slot cache, on the step's kernel; each prompt
chunk causally over its own earlier KV, as `Model.forward` does) and the chunks' adapters apply to their
columns alone, through token-major views (the decode rows never see an adapter).

Columns: [0, B) the decode rows, [B, B + N) the N prompt tokens, row after row, then zero padding to a
multiple of CPU_COLUMN_MULTIPLE (prad/cpu_decode/step.py). The maths is `feature_major_step`'s for the
decode rows and `Model.forward`'s for the chunks, term by term; only the order of floating-point sums
inside matmuls differs (tests compare both with their own paths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prad.cpu_decode.ops import StepOps
from prad.cpu_decode.step import CPU_COLUMN_MULTIPLE, mlp, pad_columns
from prad.kv_cache import KVCache
from prad.model import AdapterHooks, Model


@dataclass
class PromptChunks:
    """Prompt chunks to compute in a decode step's pass."""

    token_ids: list[list[int]]  # each row's chunk
    starts: list[int]  # position of each chunk's first token
    kv: KVCache  # one row per chunk holding its earlier chunks' KV; capacity >= max(start + len)
    hooks: AdapterHooks | None = None  # per-row adapters over the padded [R, T] layout (None: base model)


@dataclass
class _Layout:
    """Where the chunks' tokens sit: columns [first, first + N) and the padded [R, T] layout around them."""

    first: int  # column of the first prompt token (= the number of decode rows)
    num_tokens: int  # N
    positions: torch.Tensor  # [R, T]; padded cells get positions past their row's end (never seen)
    columns: torch.Tensor  # [R, T] the column of each cell (padded cells: the first column, a real value)
    valid: torch.Tensor  # [R, T] bool, the real cells
    last_columns: list[int]  # each chunk's last token

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """t [features, P] -> the chunks' columns as [R, T, features]."""
        return t[:, self.columns].permute(1, 2, 0)

    def put(self, t: torch.Tensor, rows: torch.Tensor) -> None:
        """Write rows [R, T, features] (real cells) back into t's chunk columns, in place."""
        t[:, self.first:self.first + self.num_tokens] = rows[self.valid].t()


def _layout(chunks: PromptChunks, first: int) -> _Layout:
    lengths = [len(ids) for ids in chunks.token_ids]
    width = max(lengths)
    steps = torch.arange(width)
    starts = torch.tensor(chunks.starts)
    valid = steps[None, :] < torch.tensor(lengths)[:, None]
    offsets = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    columns = torch.where(valid, first + offsets[:, None] + steps[None, :], first)
    ends = [first + int(o) + n - 1 for o, n in zip(offsets, lengths, strict=True)]
    return _Layout(first, sum(lengths), starts[:, None] + steps[None, :], columns, valid, ends)


def mixed_step(model: Model, ops: StepOps, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache,
               chunks: PromptChunks) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step for rows token_ids/positions [B] over `kv` (as `feature_major_step`), computing
    `chunks` in the same pass: their K/V go into chunks.kv. Returns (decode logits [B, V], each chunk's
    logits at its last token [R, V]), fp32."""
    w, c = model.weights, model.config
    bsz = token_ids.shape[0]
    lay = _layout(chunks, bsz)
    prompt_ids = torch.tensor([t for ids in chunks.token_ids for t in ids])
    prompt_pos = lay.positions[lay.valid]
    total = bsz + lay.num_tokens
    width = -(-total // CPU_COLUMN_MULTIPLE) * CPU_COLUMN_MULTIPLE
    h = pad_columns(w.embed[torch.cat([token_ids, prompt_ids])].t(), width)  # [d, P]
    if w.pos_embed is not None:
        h[:, :total] += w.pos_embed[torch.cat([positions, prompt_pos])].t()
    attend = ops.attention(positions)
    mask, rope = model.causal_mask(lay.positions), model.rope_at(lay.positions)
    hooks = chunks.hooks
    h, x = ops.add_norm(h, None, w.layers[0].attn_norm_w, w.layers[0].attn_norm_b)
    for i, lw in enumerate(w.layers):
        qkv = ops.linear(lw.qkv_w, x, lw.qkv_b)  # [q_size + 2 kv_size, P]
        q, k, v = qkv[:, :bsz].split([c.q_size, c.kv_size, c.kv_size], dim=0)
        a = qkv.new_zeros(c.q_size, width)
        a[:, :bsz] = attend(i, q.view(c.num_heads, c.head_dim, bsz), k.view(c.num_kv_heads, c.head_dim, bsz),
                            v.view(c.num_kv_heads, c.head_dim, bsz), kv)
        x_rows, qkv_rows = lay.rows(x), lay.rows(qkv)
        if hooks is not None:
            qkv_rows = hooks.adapt_qkv(i, x_rows, qkv_rows)
        a_rows = model.attend(i, qkv_rows, lay.positions, chunks.kv, mask, rope)  # [R, T, q_size]
        lay.put(a, a_rows)
        o = ops.linear(lw.o_w, a, lw.o_b)
        if hooks is not None:
            lay.put(o, hooks.adapt_o(i, a_rows, lay.rows(o)))
        h, z = ops.add_norm(h, o, lw.mlp_norm_w, lw.mlp_norm_b)
        y = mlp(c, lw, z, ops)
        if hooks is not None:
            lay.put(y, hooks.adapt_mlp(i, lay.rows(z), lay.rows(y)))
        following = w.layers[i + 1] if i + 1 < len(w.layers) else None
        norm_w, norm_b = ((following.attn_norm_w, following.attn_norm_b) if following
                          else (w.final_norm_w, w.final_norm_b))
        h, x = ops.add_norm(h, y, norm_w, norm_b)
    picked = torch.cat([torch.arange(bsz), torch.tensor(lay.last_columns)])
    num_picked = picked.shape[0]
    logits = ops.lm_head(w.lm_head, pad_columns(x[:, picked], -(-num_picked // CPU_COLUMN_MULTIPLE)
                                             * CPU_COLUMN_MULTIPLE), num_picked)
    return logits[:bsz], logits[bsz:]
