"""The device sampler (prad/device_sampling.py) draws exactly sample_batch's tokens, row for row."""

from __future__ import annotations

import pytest
import torch

from prad.device_sampling import NO_TOKEN, sample_batch_on_device, sample_tokens
from prad.sampling import NUCLEUS_CANDIDATES, SamplingError, SamplingParams, sample_batch, sample_one

VOCAB = 3 * NUCLEUS_CANDIDATES  # larger than the nucleus candidates, so both nucleus paths run


def random_logits(rows: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


PARAMS = [
    SamplingParams(),  # greedy
    SamplingParams(temperature=1e-6, seed=3),  # below MIN_TEMPERATURE: greedy
    SamplingParams(temperature=0.7, seed=11),
    SamplingParams(temperature=1.0, top_k=5, seed=12),
    SamplingParams(temperature=1.3, top_p=0.9, seed=13),  # nucleus inside the top candidates
    SamplingParams(temperature=50.0, top_p=0.99, seed=14),  # flat: the nucleus needs the full sort
    SamplingParams(temperature=0.9, top_k=40, top_p=0.5, seed=15),
    SamplingParams(temperature=2.0, top_p=1e-12, seed=16),  # keeps the most likely token alone
]


@pytest.mark.parametrize("seed", range(4))
def test_the_device_sampler_draws_sample_batchs_tokens(seed: int) -> None:
    logits = random_logits(len(PARAMS), seed)
    indices = [seed * 7 + i for i in range(len(PARAMS))]
    assert sample_batch_on_device(logits, PARAMS, indices) == sample_batch(logits, PARAMS, indices)


def test_seeded_rows_match_over_many_output_indices() -> None:
    """Every output index reseeds the row's generator: the exponential race equals multinomial for each."""
    params = [SamplingParams(temperature=1.0, seed=99)] * 4 + [SamplingParams(temperature=0.8, top_p=0.95, seed=7)] * 4
    for step in range(12):
        logits = random_logits(len(params), 100 + step, scale=1.0)
        indices = [step * 8 + i for i in range(len(params))]
        assert sample_batch_on_device(logits, params, indices) == sample_batch(logits, params, indices)


def test_greedy_only_batches_take_the_batched_argmax() -> None:
    logits = random_logits(5, 1)
    assert sample_tokens(logits, [SamplingParams()] * 5, [0] * 5).tolist() == logits.argmax(-1).tolist()


def test_nan_and_inf_rows_sample_as_sample_one_does() -> None:
    logits = random_logits(4, 2)
    logits[0, 10] = float("nan")  # greedy row with a NaN: argmax of the rest
    logits[1, 20] = float("inf")  # greedy row with +inf: that token
    logits[2, ::3] = float("nan")  # seeded rows with non-finite values
    logits[3, 5] = float("inf")
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.8, seed=1),
              SamplingParams(temperature=0.8, top_p=0.9, seed=2)]
    expected = [sample_one(logits[i], params[i], i) for i in range(4)]
    assert sample_batch_on_device(logits, params, list(range(4))) == expected


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.5, seed=4)])
def test_a_row_without_finite_logits_fails_as_in_sample_batch(params: SamplingParams) -> None:
    logits = random_logits(3, 3)
    logits[1] = float("nan")
    tokens = sample_tokens(logits, [params] * 3, [0, 1, 2]).tolist()
    assert tokens[1] == NO_TOKEN and tokens[0] >= 0 and tokens[2] >= 0
    with pytest.raises(SamplingError):
        sample_batch(logits, [params] * 3, [0, 1, 2])
    with pytest.raises(SamplingError):
        sample_batch_on_device(logits, [params] * 3, [0, 1, 2])
