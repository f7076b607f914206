"""Sampling on the logits' device: `sample_batch`'s tokens, with one read-back per batch.

`prad.sampling.sample_batch` decides on the host: whether a row has a NaN, whether the top
NUCLEUS_CANDIDATES tokens hold the nucleus, and `torch.multinomial` itself reads its input back
(it checks the probabilities). On a GPU each of those is a synchronisation per row. Here every such
decision is made on the device (`torch.where` between both outcomes, each computed exactly as the
host path computes it), so nothing is read back until the token ids are.

Exactly the same tokens, row for row, because each row runs the same operations on the same values:

* greedy rows: one batched argmax, as in sample_batch (rows with a NaN: the argmax of the cleaned
  row, as sample_one does);
* seeded rows (temperature >= MIN_TEMPERATURE): sample_one's operations on the row alone, with the
  generator seeded from (seed, output index) as there. `torch.multinomial(probs, 1, generator=g)` is
  the exponential race `argmax(probs / q)`, q ~ Exp(1) drawn by `exponential_(generator=g)` (its
  one-sample path); that race is run here without multinomial's checks, which read back. A unit
  test holds the two to equal tokens, so a torch release that changes multinomial is caught.

Seeded rows cost ~20 small kernels each (a full vocabulary sort too when top_p < 1); greedy rows
cost one argmax for the whole batch. A row with no finite logit yields -1 (`sample_tokens`) or a
SamplingError for the batch (`sample_batch_on_device`), as sample_batch raises.
"""

from __future__ import annotations

import torch

from prad.sampling import NUCLEUS_CANDIDATES, SamplingError, SamplingParams, _generator, filter_logits

NO_TOKEN = -1  # a row with no finite logit


def sample_batch_on_device(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> list[int]:
    """`sample_batch(logits, params, indices)` computed on the logits' device: the same tokens, one
    read-back. Raises SamplingError if a row cannot be sampled, as sample_batch does."""
    tokens = sample_tokens(logits, params, indices).tolist()
    if NO_TOKEN in tokens:
        raise SamplingError("the model produced no finite logit for a request of this batch")
    return tokens


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (int64, on the logits' device; NO_TOKEN where a row has no
    finite logit). Only queues device work: nothing is read back."""
    greedy = _greedy_tokens(logits)  # [B]
    if all(p.is_greedy for p in params):
        return greedy
    # Stacked from 0-dim tensors: a row index list copied to the device would wait for queued work.
    return torch.stack([greedy[i] if p.is_greedy else _sample_row(logits[i], p, indices[i])
                        for i, p in enumerate(params)])


def _greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B]: the argmax; for a row with a NaN, the argmax of the row without NaN (sample_one)."""
    plain = torch.argmax(logits, dim=-1)
    row = logits.float()
    cleaned = torch.nan_to_num(row, nan=float("-inf"), posinf=torch.finfo(row.dtype).max)
    cleaned_ids = torch.where(torch.isfinite(cleaned.amax(dim=-1)), torch.argmax(cleaned, dim=-1), NO_TOKEN)
    return torch.where(torch.isnan(logits).any(dim=-1), cleaned_ids, plain)


def _sample_row(logits: torch.Tensor, params: SamplingParams, index: int) -> torch.Tensor:
    """sample_one for a seeded row: logits [V] -> a 0-dim token id (NO_TOKEN if no logit is finite)."""
    logits = logits.float()
    cleaned = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    logits = torch.where(torch.isfinite(logits).all(), logits, cleaned)  # sample_one's _without_nan
    scaled = (logits - logits.max()) / params.temperature
    probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p, nucleus=_nucleus), dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=_generator(params.seed, index, logits.device))
    token = torch.argmax(probs / race)  # torch.multinomial(probs, 1, generator=...) without its checks
    return torch.where(torch.isfinite(cleaned.max()), token, NO_TOKEN)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """prad.sampling._nucleus without its read-back: both the top-NUCLEUS_CANDIDATES answer and the
    full sort's are computed, and the same test the host makes (in float64, as Python compares)
    picks one on the device."""
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    top_probs, top_ids = torch.topk(probs, k)  # descending
    keep = _kept(probs, top_probs, top_ids, top_p)
    if k == probs.shape[-1]:
        return keep
    sorted_probs, sorted_ids = torch.sort(probs, descending=True)
    needs_sort = top_probs.sum().double() < top_p
    return torch.where(needs_sort, _kept(probs, sorted_probs, sorted_ids, top_p), keep)


def _kept(probs: torch.Tensor, ranked_probs: torch.Tensor, ranked_ids: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean [V]: the tokens, ranked by probability, whose preceding mass is below top_p (the first always)."""
    keep_ranked = (torch.cumsum(ranked_probs, dim=-1) - ranked_probs) < top_p
    keep_ranked[0] = True
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(0, ranked_ids, keep_ranked)
