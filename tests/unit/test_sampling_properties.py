"""Property tests: sampling over the whole valid parameter space always gives a valid token id."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prad.sampling import MAX_SEED, MIN_TEMPERATURE, SamplingError, SamplingParams, sample_batch, sample_one

VOCAB = 2048  # over NUCLEUS_CANDIDATES, so the full-sort fall-back is reached too

params_strategy = st.builds(
    SamplingParams,
    max_new_tokens=st.just(1),
    temperature=st.one_of(st.just(0.0), st.floats(0.0, 10.0), st.floats(1e-320, 1e-4)),
    top_p=st.one_of(st.just(1.0), st.floats(1e-320, 1.0, exclude_min=False).filter(lambda p: p > 0),
                    st.sampled_from([1e-300, 5e-324, 1e-45, 0.999999])),
    top_k=st.one_of(st.just(0), st.integers(1, VOCAB + 10), st.integers(2**31, 2**63)),
    seed=st.integers(0, MAX_SEED),
)


@st.composite
def logits_rows(draw: st.DrawFn) -> torch.Tensor:
    """fp32 logits [VOCAB]: flat, peaked, huge, or with some NaN / inf entries."""
    kind = draw(st.sampled_from(["normal", "flat", "peaked", "huge", "holes"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    row = torch.randn(VOCAB, generator=gen) * 3
    if kind == "flat":
        row = torch.zeros(VOCAB)
    elif kind == "peaked":
        row[draw(st.integers(0, VOCAB - 1))] = 1e4
    elif kind == "huge":
        row = row * 1e37
    elif kind == "holes":
        cells = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=VOCAB // 2))
        row[cells] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        row[draw(st.integers(0, VOCAB - 1))] = 1.0  # at least one finite logit
    return row


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logits=logits_rows(), params=params_strategy, index=st.integers(0, 4096))
def test_sampling_always_returns_a_token_id(logits: torch.Tensor, params: SamplingParams, index: int) -> None:
    token = sample_one(logits, params, index)
    assert 0 <= token < VOCAB
    assert not math.isnan(float(logits[token]))  # a NaN logit never wins


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(logits_rows(), min_size=1, max_size=4), data=st.data())
def test_batch_sampling_equals_row_by_row(rows: list[torch.Tensor], data: st.DataObject) -> None:
    params = [data.draw(params_strategy) for _ in rows]
    indices = [data.draw(st.integers(0, 100)) for _ in rows]
    batch = sample_batch(torch.stack(rows), params, indices)
    assert batch == [sample_one(r, p, i) for r, p, i in zip(rows, params, indices, strict=True)]


@settings(max_examples=100, deadline=None)
@given(logits=logits_rows(), temperature=st.floats(0.0, MIN_TEMPERATURE, exclude_max=True),
       seed=st.integers(0, MAX_SEED))
def test_temperatures_below_the_floor_are_greedy(logits: torch.Tensor, temperature: float, seed: int) -> None:
    params = SamplingParams(1, temperature=temperature, seed=seed)
    cleaned = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    assert sample_one(logits, params, 0) == int(torch.argmax(cleaned))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_all_nan_logits_raise_sampling_error(temperature: float) -> None:
    with pytest.raises(SamplingError):
        sample_one(torch.full((VOCAB,), float("nan")), SamplingParams(1, temperature=temperature), 0)
