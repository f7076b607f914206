"""The CPU backend's feature-major decode step computes what `Model.forward` computes for one token per row."""

from __future__ import annotations

import json

import pytest
import torch

from prad import kernels
from prad.adapters import RowAdapters
from prad.config import model_config_from_hf
from prad.cpu_decode import CpuStepBackend, step_with_hooks
from prad.cpu_decode.ops import LM_HEAD_CHUNK_ROWS
from prad.cpu_decode.step import padded_columns
from prad.kv_cache import KVCache
from prad.model import Model
from prad.weights import read_tensors, weights_from_tensors
from tests.helpers import random_adapter, tiny_hf_model


@pytest.fixture(params=["native", "torch"])
def ops_path(request) -> str:
    """Every test runs twice: with the native kernels (prad/kernels) where they apply, and on
    PyTorch ops only."""
    if request.param == "native" and kernels.library() is None:
        pytest.skip("the native kernels could not be built here (no C++ compiler?)")
    return request.param


@pytest.fixture
def decode_step(ops_path: str):
    """decode_step(model, token_ids, positions, kv) -> logits: the CPU backend's step."""
    def step(model: Model, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache) -> torch.Tensor:
        return CpuStepBackend(model, native_kernels=ops_path == "native").step(token_ids, positions, kv)

    return step


def _model(family: str, tmp_path, vocab_size: int) -> Model:
    path = tiny_hf_model(family, tmp_path, vocab_size=vocab_size)
    config = model_config_from_hf(json.loads((path / "config.json").read_text()))
    return Model(config, weights_from_tensors(config, read_tensors(path)))


def _prefilled(model: Model, lengths: list[int], capacity: int) -> KVCache:
    """A cache whose row r holds a random prompt of lengths[r] tokens at positions [0, lengths[r])."""
    kv = model.new_kv_cache(len(lengths), capacity)
    gen = torch.Generator().manual_seed(3)
    for row, length in enumerate(lengths):
        ids = torch.randint(2, model.config.vocab_size, (1, length), generator=gen)
        one = model.new_kv_cache(1, capacity)
        model.forward(ids, torch.arange(length)[None], one)
        kv.insert(row, one.extract(0, length))
    return kv


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_decode_step_matches_forward_over_rows_of_different_lengths(family: str, decode_step, tmp_path) -> None:
    # a vocabulary over one LM-head slice, so the sliced LM head is exercised too
    model = _model(family, tmp_path, vocab_size=LM_HEAD_CHUNK_ROWS + 300)
    lengths = [5, 11, 1, 8]
    ref_kv = _prefilled(model, lengths, capacity=32)
    our_kv = KVCache(ref_kv.k.clone(), ref_kv.v.clone())
    ids = torch.tensor([7, 300, 2, LM_HEAD_CHUNK_ROWS + 5])
    positions = torch.tensor(lengths)
    for _ in range(3):  # three steps: each one reads the K/V the previous one wrote
        ref = model.forward(ids[:, None], positions[:, None], ref_kv, logit_index=torch.zeros_like(ids))
        got = decode_step(model, ids, positions, our_kv)
        assert got.shape == ref.shape and got.dtype == torch.float32 and got.is_contiguous()
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
        assert torch.allclose(our_kv.k, ref_kv.k, atol=1e-6) and torch.allclose(our_kv.v, ref_kv.v, atol=1e-6)
        ids, positions = ref.argmax(-1), positions + 1


def test_decode_step_refuses_a_position_past_the_cache(decode_step, tmp_path) -> None:
    model = _model("llama", tmp_path, vocab_size=128)
    kv = model.new_kv_cache(2, 8)
    with pytest.raises(ValueError, match="position 8 exceeds KV capacity 8"):
        decode_step(model, torch.tensor([3, 4]), torch.tensor([2, 8]), kv)


def test_decode_step_with_conventional_adapters_matches_forward(ops_path: str, tmp_path) -> None:
    """The benchmarks' LoRA/PA-at-every-step arms decode through the same step, hooks included."""
    model = _model("llama", tmp_path, vocab_size=128)
    fp = "test-fingerprint"
    adapters = [random_adapter("prad-lora", model.config, fp, 1, targets=("q", "k", "v", "o")),
                random_adapter("prad-pa", model.config, fp, 2), None,
                random_adapter("prad-sa", model.config, fp, 3)]
    hooks = RowAdapters(model.config, adapters, torch.ones(len(adapters), 1))  # every token adapted
    lengths = [4, 9, 6, 2]
    ref_kv = _prefilled(model, lengths, capacity=16)
    our_kv = KVCache(ref_kv.k.clone(), ref_kv.v.clone())
    ids, positions = torch.tensor([5, 17, 99, 3]), torch.tensor(lengths)
    ref = model.forward(ids[:, None], positions[:, None], ref_kv, hooks, logit_index=torch.zeros_like(ids))
    backend = CpuStepBackend(model, native_kernels=ops_path == "native")
    got = step_with_hooks(backend, ids, positions, our_kv, hooks)
    base = backend.step(ids, positions, KVCache(ref_kv.k.clone(), ref_kv.v.clone()))
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert torch.allclose(our_kv.k, ref_kv.k, atol=1e-6)
    assert (got - base)[[0, 1, 3]].abs().amax(dim=-1).min() > 1e-3  # the adapters did change those rows


@pytest.mark.parametrize("batch", [1, 17])
def test_decode_step_padding_never_changes_a_row(batch: int, decode_step, tmp_path) -> None:
    """CPU steps pad B to a multiple of 16 columns (but a few rows, as StepOps.unpadded_rows says); each
    row equals itself alone."""
    model = _model("llama", tmp_path, vocab_size=128)
    assert padded_columns(batch) == (1 if batch == 1 else 32)
    assert padded_columns(batch, unpadded_rows=0) == (16 if batch == 1 else 32)
    assert padded_columns(batch, unpadded_rows=8) == (1 if batch == 1 else 32)
    assert padded_columns(8, unpadded_rows=8) == 8 and padded_columns(9, unpadded_rows=8) == 16
    lengths = [3 + (r * 5) % 11 for r in range(batch)]
    kv = _prefilled(model, lengths, capacity=32)
    alone_kv = KVCache(kv.k.clone(), kv.v.clone())
    ids = torch.arange(2, 2 + batch)
    got = decode_step(model, ids, torch.tensor(lengths), kv)
    for row in (0, batch - 1):
        one = KVCache(alone_kv.k[:, row:row + 1].clone(), alone_kv.v[:, row:row + 1].clone())
        alone = decode_step(model, ids[row:row + 1], torch.tensor(lengths[row:row + 1]), one)
        assert torch.allclose(got[row], alone[0], atol=1e-5)


@pytest.mark.parametrize("batch", [1, 17, 40])
def test_bf16_native_step_gives_each_row_what_it_gets_alone(batch: int, ops_path: str, decode_step, tmp_path) -> None:
    """With the native bf16 projections every output is one fixed-order sum per row and column, and
    attention and the element-wise kernels work per row too: a bf16 row's logits are bit-identical
    whatever else is in the batch (PyTorch's bf16 GEMMs promise no such thing; docs/design.md)."""
    if ops_path == "torch" or not kernels.supports_linear(torch.bfloat16, torch.device("cpu")):
        pytest.skip("needs the native bf16 projections (AVX512-BF16)")
    fp32 = _model("llama", tmp_path, vocab_size=LM_HEAD_CHUNK_ROWS + 300)
    model = Model(fp32.config, fp32.weights.to(torch.device("cpu"), torch.bfloat16))
    lengths = [3 + (r * 5) % 11 for r in range(batch)]
    kv = _prefilled(model, lengths, capacity=32)
    alone_kv = KVCache(kv.k.clone(), kv.v.clone())
    ids = torch.arange(2, 2 + batch) * 37 % model.config.vocab_size
    got = decode_step(model, ids, torch.tensor(lengths), kv)
    for row in sorted({0, batch // 2, batch - 1}):
        one = KVCache(alone_kv.k[:, row:row + 1].clone(), alone_kv.v[:, row:row + 1].clone())
        alone = decode_step(model, ids[row:row + 1], torch.tensor(lengths[row:row + 1]), one)
        assert torch.equal(got[row], alone[0])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_decode_step_matches_fp32_forward_up_to_rounding(family: str, decode_step, tmp_path) -> None:
    """bf16 takes its own LM-head path (one token-major GEMM); the logits must equal fp32's up to bf16
    rounding: measured 0.3 % of the logits' range on this tiny model, bound 1 %. (The paths bf16 and
    fp32 share, attention included, are pinned to `Model.forward` at 1e-5 by the fp32 tests.)"""
    fp32 = _model(family, tmp_path, vocab_size=LM_HEAD_CHUNK_ROWS + 300)
    bf16 = Model(fp32.config, fp32.weights.to(torch.device("cpu"), torch.bfloat16))
    lengths = [5, 11, 1, 8]
    ref_kv = _prefilled(fp32, lengths, capacity=32)
    our_kv = KVCache(ref_kv.k.to(torch.bfloat16), ref_kv.v.to(torch.bfloat16))
    ids = torch.tensor([7, 300, 2, LM_HEAD_CHUNK_ROWS + 5])
    positions = torch.tensor(lengths)
    for _ in range(3):
        ref = fp32.forward(ids[:, None], positions[:, None], ref_kv, logit_index=torch.zeros_like(ids))
        got = decode_step(bf16, ids, positions, our_kv)
        assert got.shape == ref.shape and got.dtype == torch.float32 and got.is_contiguous()
        spread = ref.amax() - ref.amin()
        assert (got - ref).abs().max() < 0.01 * spread, ((got - ref).abs().max(), spread)
        ids, positions = ref.argmax(-1), positions + 1
