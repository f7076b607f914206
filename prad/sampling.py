"""Token sampling, shared by prefill (the first token) and decode (the rest).

Randomness is a pure function of (request seed, output index): token k of a request is drawn with a
generator seeded from both, so a seeded request gives the same tokens whatever batch it runs in,
whichever process samples it, and wherever the prefill/decode boundary falls.

Numerically safe over the whole valid parameter range: temperatures below MIN_TEMPERATURE mean
greedy (dividing by a smaller one overflows fp32 and picks the argmax anyway); logits are shifted by
their maximum before scaling; NaN logits never win; the nucleus always keeps the most likely token,
however small top_p is. A row whose logits are all NaN raises SamplingError (that request fails alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256  # characters per stop string
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy


class SamplingError(ValueError):
    """A row's logits cannot be sampled from (all NaN): the request fails, the batch goes on."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64  # budget of generated tokens, the first (prefill) one included
    temperature: float = 0.0  # below MIN_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # 0 = no top-k cut
    seed: int = 0  # per-request seed; the server draws one when the client gives none
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings (excluded from the text)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def _generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    # Mix seed and index (splitmix-style odd constant) into one 63-bit seed.
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) & MAX_SEED
    return torch.Generator(device=device).manual_seed(mixed)


NUCLEUS_CANDIDATES = 1024  # the nucleus is looked for among the top tokens first (exact, see below)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float,
                  nucleus: Callable[[torch.Tensor, float], torch.Tensor] | None = None) -> torch.Tensor:
    """logits [V] -> logits with everything outside top-k / top-p set to -inf. `nucleus(probs, top_p)`
    finds the top-p set (default: _nucleus below; prad/device_sampling passes one without read-backs)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        keep = (nucleus or _nucleus)(torch.softmax(logits, dim=-1), top_p)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean [V]: the smallest top set whose mass reaches top_p (a token is dropped when the mass
    before it already reaches top_p; the first token always stays).

    Sorting the whole vocabulary per row dominated sampled decode steps, so the top
    NUCLEUS_CANDIDATES tokens are tried first; when their mass reaches top_p the nucleus lies inside
    them and the answer is the same as a full sort's. Otherwise the full sort decides.
    """
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    top_probs, top_ids = torch.topk(probs, k)  # descending
    if float(top_probs.sum()) < top_p and k < probs.shape[-1]:
        top_probs, top_ids = torch.sort(probs, descending=True)
    keep_sorted = (torch.cumsum(top_probs, dim=-1) - top_probs) < top_p
    keep_sorted[0] = True  # a top_p below fp32's smallest value would otherwise keep nothing
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[top_ids[keep_sorted]] = True
    return keep


def sample_one(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """Sample output token number `index` (0 = first) from logits [V]."""
    logits = _without_nan(logits.float())
    if params.is_greedy:
        return int(torch.argmax(logits))
    # Shifted by the maximum first: (logits - max) / T cannot overflow, and the softmax is unchanged.
    scaled = (logits - logits.max()) / params.temperature
    probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
    gen = _generator(params.seed, index, logits.device)
    return int(torch.multinomial(probs, 1, generator=gen))


def _without_nan(logits: torch.Tensor) -> torch.Tensor:
    """logits [V] with NaN as -inf and +inf as the largest finite value; SamplingError if all are NaN."""
    if bool(torch.isfinite(logits).all()):
        return logits
    cleaned = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    if not bool(torch.isfinite(cleaned.max())):
        raise SamplingError("the model produced no finite logit for this request")
    return cleaned


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> list[int]:
    """Sample one token per row of logits [B, V]; greedy rows share one argmax.

    Raises SamplingError if a row cannot be sampled; callers that must isolate rows then sample
    them one by one with sample_one.
    """
    greedy_ids = torch.argmax(logits, dim=-1)  # [B]; a NaN anywhere in a row wins its argmax
    has_nan = torch.isnan(logits.gather(1, greedy_ids[:, None]))[:, 0].tolist()
    greedy = greedy_ids.tolist()
    return [greedy[i] if p.is_greedy and not has_nan[i] else sample_one(logits[i], p, indices[i])
            for i, p in enumerate(params)]
