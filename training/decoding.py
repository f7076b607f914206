"""Greedy generation for evaluation, through the serving code path.

PrAd adapters and the base model: `PrefillRunner` (adapted prompt, first token from the adapted last
position) then `DecodeRunner` (plain base model over a slot KV cache) — the two runners the server
uses, so evaluation scores what the server would answer. The conventional `pa`/`sa`/`lora` baselines
apply the adapter to every token; the server refuses them, so their decode steps go through the same
forward with the adapter on (mask 1) — caching is still exact, as every cached token was adapted.
"""

from __future__ import annotations

import torch

from decode_service.runner import DecodeRunner
from prad.adapters import Adapter, RowAdapters
from prad.model import Model
from prefill_service.runner import ChunkInput, PrefillRunner


def greedy_generate(model: Model, adapter: Adapter | None, prompts: list[list[int]], max_new_tokens: int,
                    ignore_eos: bool = False) -> list[list[int]]:
    """Greedy output ids per prompt (EOS included when it ends a row), all prompts as one batch."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
    eos = set() if ignore_eos else set(model.config.eos_token_ids)
    prefilled = PrefillRunner(model).run([ChunkInput(list(p), 0, adapter, None) for p in prompts])
    decoder = DecodeRunner(model, len(prompts), model.config.max_position_embeddings)
    decoder.ensure_capacity(max(len(p) for p in prompts) + max_new_tokens)
    outputs: list[list[int]] = []
    for row, out in enumerate(prefilled):
        decoder.insert(row, out.kv)
        outputs.append([int(torch.argmax(out.logits))])
    done = _Finished(prompts, outputs, eos, max_new_tokens)
    running = done.drop(decoder, list(range(len(prompts))))  # running[slot] = prompt index
    while running:
        ids = [outputs[i][-1] for i in running]
        positions = [len(prompts[i]) + len(outputs[i]) - 1 for i in running]
        logits = _decode_step(model, decoder, adapter, ids, positions)  # [n, V]
        for i, token in zip(running, torch.argmax(logits, dim=-1).tolist(), strict=True):
            outputs[i].append(token)
        running = done.drop(decoder, running)
    return outputs


class _Finished:
    """Finishing rule and slot compaction: running rows must occupy decode slots 0..n-1."""

    def __init__(self, prompts: list[list[int]], outputs: list[list[int]], eos: set[int], max_new_tokens: int):
        self.prompts, self.outputs, self.eos, self.max_new_tokens = prompts, outputs, eos, max_new_tokens

    def is_done(self, i: int) -> bool:
        return self.outputs[i][-1] in self.eos or len(self.outputs[i]) >= self.max_new_tokens

    def drop(self, decoder: DecodeRunner, running: list[int]) -> list[int]:
        """Running minus finished rows; the last slot's KV moves into each freed slot."""
        slot = 0
        while slot < len(running):
            if not self.is_done(running[slot]):
                slot += 1
                continue
            last = len(running) - 1
            if slot != last:
                moved = running[last]
                # cached positions of `moved`: its prompt and every output token but the newest
                decoder.move(last, slot, len(self.prompts[moved]) + len(self.outputs[moved]) - 1)
                running[slot] = moved
            running.pop()
        return running


def _decode_step(model: Model, decoder: DecodeRunner, adapter: Adapter | None, ids: list[int],
                 positions: list[int]) -> torch.Tensor:
    if adapter is None or adapter.config.is_prompt_only:
        return decoder.decode(ids, positions)  # the server's adapter-free decode
    return _adapted_decode(model, decoder, adapter, ids, positions)


@torch.inference_mode()
def _adapted_decode(model: Model, decoder: DecodeRunner, adapter: Adapter, ids: list[int],
                    positions: list[int]) -> torch.Tensor:
    """A conventional baseline's decode step: the adapter applies to generated tokens too."""
    device = model.device
    token_ids = torch.tensor(ids, device=device)[:, None]  # [n, 1]
    pos = torch.tensor(positions, device=device)[:, None]  # [n, 1]
    hooks = RowAdapters(model.config, [adapter] * len(ids), torch.ones(len(ids), 1, device=device))
    return model.forward(token_ids, pos, decoder.cache.rows(len(ids)), hooks,
                         logit_index=torch.zeros_like(token_ids[:, 0]))
