"""Sampling: greedy argmax, top-k / top-p cuts, and seeded draws that depend only on (seed, index)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from prad.sampling import MAX_SEED, SamplingParams, sample_batch, sample_one

V = 64


def _logits(seed: int, vocab: int = V, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _draws(logits: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    return [sample_one(logits, params, i) for i in range(n)]


def test_params_defaults_and_greedy_flag() -> None:
    assert SamplingParams().is_greedy
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy


def test_greedy_picks_argmax() -> None:
    for s in range(10):
        logits = _logits(s)
        expected = int(torch.argmax(logits))
        for index in (0, 1, 17):
            assert sample_one(logits, SamplingParams(seed=s), index) == expected
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    assert sample_one(logits, SamplingParams(), 0) == 1


def test_greedy_rows_of_a_batch_pick_their_own_argmax() -> None:
    logits = torch.stack([_logits(s) for s in range(5)])
    params = [SamplingParams(seed=s) for s in range(5)]
    assert sample_batch(logits, params, [0, 3, 1, 9, 2]) == torch.argmax(logits, dim=-1).tolist()


def test_seeded_sampling_is_reproducible_per_seed_and_index() -> None:
    logits = _logits(0, scale=0.5)
    params = SamplingParams(temperature=1.0, seed=1234)
    first = _draws(logits, params, 40)
    assert _draws(logits, params, 40) == first
    # In any order, with any other draws interleaved: token k depends only on (seed, k).
    assert [sample_one(logits, params, i) for i in reversed(range(40))] == first[::-1]
    other = SamplingParams(temperature=1.0, seed=999)
    interleaved = []
    for i in range(40):
        sample_one(logits, other, i)
        interleaved.append(sample_one(logits, params, i))
    assert interleaved == first
    # Token k is not constant over k: the index really feeds the randomness.
    assert len(set(first)) > 5


def test_seeded_row_is_independent_of_its_batch() -> None:
    target = _logits(7, scale=0.5)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=42)
    alone = [sample_one(target, params, i) for i in range(20)]
    assert len(set(alone)) > 3

    neighbours = [
        (_logits(100), SamplingParams()),  # greedy
        (_logits(101, scale=0.5), SamplingParams(temperature=1.3, seed=42)),  # same seed, other logits
        (_logits(102, scale=0.5), SamplingParams(temperature=0.5, top_k=3, seed=7)),
    ]
    for position in range(len(neighbours) + 1):
        rows = [n[0] for n in neighbours]
        params_list = [n[1] for n in neighbours]
        rows.insert(position, target)
        params_list.insert(position, params)
        batch = torch.stack(rows)
        in_batch = []
        for i in range(20):
            indices = [i + 5 * j for j in range(len(rows))]
            indices[position] = i
            in_batch.append(sample_batch(batch, params_list, indices)[position])
        assert in_batch == alone, f"row at position {position}"


def test_different_seeds_give_different_sequences() -> None:
    logits = torch.zeros(V)  # uniform: a collision over 50 draws is vanishingly unlikely
    sequences = {tuple(_draws(logits, SamplingParams(temperature=1.0, seed=seed), 50)) for seed in range(20)}
    assert len(sequences) == 20


def test_extreme_seeds_are_accepted_and_distinct() -> None:
    logits = torch.zeros(V)
    hi = _draws(logits, SamplingParams(temperature=1.0, seed=MAX_SEED), 30)
    zero = _draws(logits, SamplingParams(temperature=1.0, seed=0), 30)
    assert hi != zero
    assert sample_one(logits, SamplingParams(temperature=1.0, seed=MAX_SEED), 10**9) in range(V)


def test_top_k_1_equals_greedy() -> None:
    for s in range(20):
        logits = _logits(s, scale=0.3)  # flat: without the cut, other tokens would be drawn
        expected = int(torch.argmax(logits))
        params = SamplingParams(temperature=2.0, top_k=1, seed=s)
        assert set(_draws(logits, params, 10)) == {expected}


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    for s in range(20):
        logits = _logits(s, scale=0.3)
        expected = int(torch.argmax(logits))
        params = SamplingParams(temperature=1.5, top_p=1e-6, seed=s)
        assert set(_draws(logits, params, 10)) == {expected}


def test_temperature_draws_only_from_the_top_k_set() -> None:
    logits = _logits(3, scale=0.3)
    top5 = set(torch.topk(logits, 5).indices.tolist())
    drawn: set[int] = set()
    for seed in range(10):
        drawn |= set(_draws(logits, SamplingParams(temperature=1.0, top_k=5, seed=seed), 30))
    assert drawn <= top5
    assert len(drawn) >= 4  # it really samples within the set


def test_top_p_keeps_the_nucleus() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05: with top_p=0.7 the mass before the third token (0.8) reaches it.
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()
    drawn: set[int] = set()
    for seed in range(10):
        drawn |= set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.7, seed=seed), 30))
    assert drawn == {1, 3}


def test_top_k_and_top_p_combine() -> None:
    logits = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1]).log()
    # top_k=3 keeps 0.3/0.25/0.2 -> renormalised 0.4/0.33/0.27; top_p=0.5 then keeps the first two.
    drawn: set[int] = set()
    for seed in range(10):
        drawn |= set(_draws(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.5, seed=seed), 30))
    assert drawn == {0, 1}


def test_sampled_frequencies_follow_the_distribution() -> None:
    probs = [0.6, 0.3, 0.1]
    logits = torch.tensor(probs).log()
    counts = Counter(_draws(logits, SamplingParams(temperature=1.0, seed=5), 3000))
    for token, p in enumerate(probs):
        # 5 standard deviations of a binomial proportion: a deterministic, non-flaky check.
        assert abs(counts[token] / 3000 - p) < 5 * math.sqrt(p * (1 - p) / 3000), counts


def test_low_temperature_sharpens_and_high_temperature_flattens() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0])
    cold = Counter(_draws(logits, SamplingParams(temperature=0.1, seed=1), 500))
    hot = Counter(_draws(logits, SamplingParams(temperature=10.0, seed=1), 500))
    assert cold[0] >= 495
    assert min(hot[t] for t in range(3)) > 100


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_are_sampled(dtype: torch.dtype) -> None:
    logits = _logits(11, scale=0.5)
    params = SamplingParams(temperature=1.0, top_k=8, seed=3)
    low = logits.to(dtype)
    top8 = set(torch.topk(low.float(), 8).indices.tolist())
    draws = _draws(low, params, 30)
    assert set(draws) <= top8
    assert sample_one(low, SamplingParams(), 0) == int(torch.argmax(low.float()))
