"""The yardstick: greedy generation by ONE masked forward over prompt + output per step, no KV cache.

This is the paper's training-time formulation. Every deployment path (embedded, gRPC, Redis, any
batch shape) must produce exactly these tokens for greedy requests.
"""

from __future__ import annotations

import torch

from prad.adapters import Adapter, RowAdapters
from prad.model import Model


def reference_generate(model: Model, adapter: Adapter | None, prompt_ids: list[int], max_new_tokens: int,
                       ignore_eos: bool = False) -> list[int]:
    """Greedy token ids after `prompt_ids` (EOS included when it ends the sequence)."""
    if not prompt_ids:
        raise ValueError("prompt must contain at least one token")
    output: list[int] = []
    eos = set(model.config.eos_token_ids)
    for _ in range(max_new_tokens):
        ids = torch.tensor([prompt_ids + output], device=model.device)
        num_tokens = ids.shape[1]
        positions = torch.arange(num_tokens, device=model.device)[None]
        mask = torch.zeros(1, num_tokens, device=model.device)
        mask[0, : len(prompt_ids)] = 1.0  # adapter output x mask: prompt rows only
        if adapter is not None and not adapter.config.is_prompt_only:
            mask.fill_(1.0)
        hooks = None if adapter is None else RowAdapters(model.config, [adapter], mask)
        logits = model.forward(ids, positions, None, hooks, logit_index=torch.tensor([num_tokens - 1]))
        token = int(torch.argmax(logits[0]))
        output.append(token)
        if token in eos and not ignore_eos:
            break
    return output
