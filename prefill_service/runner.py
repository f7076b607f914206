"""The prefill runner: one forward pass over a batch of prompt chunks of many tasks, per-row adapters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prad.adapters import Adapter, RowAdapters
from prad.cpu_decode.mixed import PromptChunks
from prad.kv_cache import KVCache
from prad.model import Model


@dataclass
class ChunkInput:
    token_ids: list[int]  # this chunk's prompt tokens
    start: int  # position of token_ids[0]
    adapter: Adapter | None  # None = base model
    past_kv: torch.Tensor | None  # [L, 2, Hkv, start, D]: KV of earlier chunks (None when start == 0)


@dataclass
class ChunkOutput:
    kv: torch.Tensor  # [L, 2, Hkv, start + len, D]: KV of the prompt so far
    logits: torch.Tensor  # [V] at the chunk's last token (fp32)


class PrefillRunner:
    def __init__(self, model: Model) -> None:
        self.model = model

    def new_outputs(self, chunks: list[ChunkInput]) -> list[torch.Tensor]:
        """Each chunk's output KV [L, 2, Hkv, start + len, D], unfilled: `run` fills it layer by layer."""
        c, m = self.model.config, self.model
        return [torch.empty(c.num_layers, 2, c.num_kv_heads, ch.start + len(ch.token_ids), c.head_dim,
                            dtype=m.dtype, device=m.device) for ch in chunks]

    @torch.inference_mode()
    def run(self, chunks: list[ChunkInput], outputs: list[torch.Tensor] | None = None,
            on_layer: Callable[[int], None] | None = None) -> list[ChunkOutput]:
        """One pass over `chunks`. Their KV goes into `outputs` (new_outputs' tensors; made here when None)
        as each layer is computed, after which `on_layer(layer)` is called: prefill streams it from there."""
        device = self.model.device
        lengths = [len(c.token_ids) for c in chunks]
        width = max(lengths)
        # Right-padded batch; padded cells get positions past their row's end, whose keys no real
        # query can see (keys are visible only at positions <= the query's) and whose KV is discarded.
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, : lengths[i]] = torch.tensor(c.token_ids)
        starts = torch.tensor([c.start for c in chunks])
        positions = starts[:, None] + torch.arange(width)[None, :]  # [B, T]
        kv = self._cache_with_past(chunks, width)
        outs = self.new_outputs(chunks) if outputs is None else outputs

        def layer_done(layer: int) -> None:
            for i, out in enumerate(outs):
                length = out.shape[3]
                out[layer, 0] = kv.k[layer, i, :, :length]
                out[layer, 1] = kv.v[layer, i, :, :length]
            if on_layer is not None:
                on_layer(layer)

        logits = self.model.forward(ids.to(device), positions.to(device), kv, self._hooks(chunks, width),
                                    logit_index=torch.tensor(lengths, device=device) - 1, on_layer=layer_done)
        return [ChunkOutput(out, logits[i]) for i, out in enumerate(outs)]

    def prompt_chunks(self, chunks: list[ChunkInput]) -> PromptChunks:
        """`chunks` as a decode step computes them in its own pass (role all; prad/cpu_decode/mixed.py): a KV
        cache holding each chunk's earlier KV, and the rows' adapters over the padded [R, T] layout."""
        width = max(len(c.token_ids) for c in chunks)
        return PromptChunks([c.token_ids for c in chunks], [c.start for c in chunks],
                            self._cache_with_past(chunks, width), self._hooks(chunks, width))

    def _cache_with_past(self, chunks: list[ChunkInput], width: int) -> KVCache:
        """A KV cache with one row per chunk holding its earlier chunks' KV, and room for this pass's
        `width` (padded) positions after the latest start."""
        kv = self.model.new_kv_cache(len(chunks), max(c.start for c in chunks) + width)
        for i, c in enumerate(chunks):
            if c.past_kv is not None:
                kv.insert(i, c.past_kv)
        return kv

    def _hooks(self, chunks: list[ChunkInput], width: int) -> RowAdapters | None:
        """The chunks' adapters over the right-padded [B, width] layout (None when every row is base)."""
        adapters = [c.adapter for c in chunks]
        if all(a is None for a in adapters):
            return None
        lengths = torch.tensor([len(c.token_ids) for c in chunks])
        prompt_mask = (torch.arange(width)[None, :] < lengths[:, None]).float()  # 1 on each row's tokens
        return self.row_adapters(adapters, prompt_mask.to(self.model.device))

    @staticmethod
    def chunk_outputs(chunks: list[ChunkInput], computed: PromptChunks, logits: torch.Tensor) -> list[ChunkOutput]:
        """What `run` returns, from chunks a decode step computed (their KV is in computed.kv)."""
        return [ChunkOutput(computed.kv.extract(i, c.start + len(c.token_ids)), logits[i])
                for i, c in enumerate(chunks)]

    def row_adapters(self, adapters: list[Adapter | None], prompt_mask: torch.Tensor) -> RowAdapters:
        """The batch's per-row adapter hooks; prompt_mask [B, T] is 1 on each row's prompt tokens."""
        return RowAdapters(self.model.config, adapters, prompt_mask)
