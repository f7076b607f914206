"""The training objective on a tiny random llama: masks, target-only logits, gradients, and equality
with the serving path (adapted prefill + adapter-free decode), plus greedy evaluation decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from decode_service.runner import DecodeRunner
from prad.adapters import Adapter, AdapterConfig, RowAdapters
from prad.config import ModelConfig
from prad.model import Model
from prad.reference import reference_generate
from prad.weights import LayerWeights, ModelWeights
from prefill_service.runner import ChunkInput, PrefillRunner
from tests.helpers import random_adapter
from training.data import EncodedExample
from training.decoding import greedy_generate
from training.loop import TrainConfig, mean_loss, train_loop
from training.objective import Objective, make_batch, trainable_adapter

FP = "test-fingerprint"
PRAD = ["prad-pa", "prad-sa", "prad-lora"]
CPU = torch.device("cpu")


def _tiny_model(lm_head_std: float = 0.5) -> Model:
    """A random 2-layer llama built in our layout directly (no transformers import: it is fast)."""
    c = ModelConfig("llama", "llama", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, intermediate_size=96, max_position_embeddings=128, norm_eps=1e-5,
                    rope_theta=10000.0, has_qkv_bias=False, tie_word_embeddings=False, eos_token_ids=(1,))
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    d, ones = c.hidden_size, torch.ones(c.hidden_size)
    layers = [LayerWeights(ones, None, rand(c.q_size + 2 * c.kv_size, d), None, rand(d, c.q_size), None, ones, None,
                           rand(2 * c.intermediate_size, d), None, rand(d, c.intermediate_size), None)
              for _ in range(c.num_layers)]
    return Model(c, ModelWeights(rand(c.vocab_size, d, std=1.0), None, layers, ones, None,
                                 rand(c.vocab_size, d, std=lm_head_std)))


@pytest.fixture(scope="module")
def tiny() -> Model:
    return _tiny_model()


def _examples() -> list[EncodedExample]:
    return [EncodedExample([5, 6, 7, 8, 9], [20, 21, 1]), EncodedExample([10, 11], [30, 31, 32, 33, 1]),
            EncodedExample([12, 13, 14], [40])]


def _trainable(variant: str, model: Model, scale: float = 0.3) -> Adapter:
    adapter = random_adapter(variant, model.config, FP, seed=3, scale=scale)
    return Adapter(adapter.config, {k: v.clone().requires_grad_() for k, v in adapter.tensors.items()}, "t")


def test_make_batch_masks_prompt_target_and_padding() -> None:
    prad = make_batch(_examples(), is_prompt_only=True, device=CPU)
    conventional = make_batch(_examples(), is_prompt_only=False, device=CPU)
    assert prad.token_ids.shape == (3, 8)
    assert prad.adapter_mask.tolist()[1] == [1, 1, 0, 0, 0, 0, 0, 0]
    assert conventional.adapter_mask.tolist()[1] == [1, 1, 1, 1, 1, 1, 1, 0]
    # loss at the last prompt position and every target position but the last; labels = next tokens
    assert prad.loss_mask.tolist()[1] == [False, True, True, True, True, True, False, False]
    rows, cols = prad.loss_mask.nonzero(as_tuple=True)
    assert torch.equal(prad.token_ids[rows, cols + 1], prad.labels)
    assert prad.labels.tolist() == [20, 21, 1, 30, 31, 32, 33, 1, 40] and prad.num_target_tokens == 9


@pytest.mark.parametrize("variant", ["prad-pa", "prad-lora", "lora"])
def test_target_logits_equal_the_full_forward_at_loss_positions(tiny: Model, variant: str) -> None:
    adapter = random_adapter(variant, tiny.config, FP, seed=2, scale=0.3)
    batch = make_batch(_examples(), adapter.config.is_prompt_only, CPU)
    hooks = RowAdapters(tiny.config, [adapter] * 3, batch.adapter_mask)
    full = tiny.forward(batch.token_ids, batch.positions, None, hooks)  # [B, T, V]
    got = Objective(tiny).target_logits(batch, adapter)
    assert torch.allclose(got, full[batch.loss_mask], atol=1e-5)
    want = F.cross_entropy(full[batch.loss_mask], batch.labels)
    assert torch.allclose(Objective(tiny).loss(batch, adapter), want, atol=1e-5)


@pytest.mark.parametrize("variant", PRAD)
def test_adapter_gets_no_gradient_through_rows_masked_to_zero(tiny: Model, variant: str) -> None:
    """With the prompt mask zeroed too, no row carries the adapter: its gradient must be exactly 0."""
    adapter = _trainable(variant, tiny)
    batch = make_batch(_examples(), is_prompt_only=True, device=CPU)
    Objective(tiny).loss(batch, adapter).backward()
    assert any(bool(t.grad.abs().sum() > 0) for t in adapter.tensors.values())  # prompt rows do learn
    for t in adapter.tensors.values():
        t.grad = None
    batch.adapter_mask = torch.zeros_like(batch.adapter_mask)
    Objective(tiny).loss(batch, adapter).backward()
    assert all(t.grad is not None and not bool(t.grad.any()) for t in adapter.tensors.values())


@pytest.mark.parametrize("variant", PRAD)
def test_training_logits_equal_adapted_prefill_then_plain_decode(tiny: Model, variant: str) -> None:
    """Teacher forcing on the serving path gives the training logits: target rows saw no adapter."""
    adapter = random_adapter(variant, tiny.config, FP, seed=4, scale=0.5)
    examples = _examples()
    batch = make_batch(examples, is_prompt_only=True, device=CPU)
    with torch.no_grad():
        trained = Objective(tiny).target_logits(batch, adapter)
    served = []
    for ex in examples:
        first = PrefillRunner(tiny).run([ChunkInput(ex.prompt_ids, 0, adapter, None)])[0]
        decoder = DecodeRunner(tiny, 1, 128)
        decoder.ensure_capacity(ex.num_tokens)
        decoder.insert(0, first.kv)
        served.append(first.logits[None])
        for k, token in enumerate(ex.target_ids[:-1]):
            served.append(decoder.decode([token], [len(ex.prompt_ids) + k]))
    assert torch.allclose(trained, torch.cat(served), atol=1e-5)


@pytest.mark.parametrize("variant", [None, "prad-pa", "prad-sa", "prad-lora", "lora", "pa"])
def test_batched_greedy_decoding_equals_reference(tiny: Model, variant: str | None) -> None:
    adapter = None if variant is None else random_adapter(variant, tiny.config, FP, seed=5, scale=0.5)
    prompts = [[7 + i for i in range(n)] for n in (3, 9, 5, 1)]
    got = greedy_generate(tiny, adapter, prompts, 6)
    assert got == [reference_generate(tiny, adapter, p, 6) for p in prompts]
    assert greedy_generate(tiny, adapter, prompts, 4, ignore_eos=True) == [
        reference_generate(tiny, adapter, p, 4, ignore_eos=True) for p in prompts]


def test_a_few_steps_lower_the_loss(tiny: Model) -> None:
    # The answer is a function of the prompt's first token: learnable by a prompt-only adapter
    examples = [EncodedExample([10 + i % 8, 50 + i % 5, 60], [90 + i % 8, 1]) for i in range(32)]
    adapter = trainable_adapter(AdapterConfig("prad-lora", 8, FP, targets=("q", "k", "v", "o")), tiny.config,
                                seed=0, device=CPU)
    objective = Objective(tiny)
    before = mean_loss(objective, adapter, examples, 16)
    log = train_loop(objective, adapter, examples, TrainConfig(30, 8, 1e-2, show_progress=False))
    after = mean_loss(objective, adapter, examples, 16)
    assert len(log.losses) == 30 and log.num_tokens == 30 * 8 * 5
    assert after < 0.1 * before, (before, after)


def test_bf16_autocast_trains_fp32_master_weights() -> None:
    model = _tiny_model()
    bf16 = Model(model.config, model.weights.to(CPU, torch.bfloat16))
    adapter = trainable_adapter(AdapterConfig("prad-pa", 4, FP), bf16.config, seed=0, device=CPU)
    config = TrainConfig(3, 2, 1e-2, autocast_dtype=torch.bfloat16, show_progress=False)
    log = train_loop(Objective(bf16), adapter, _examples(), config)
    assert all(math.isfinite(loss) for loss in log.losses)
    assert all(t.dtype == torch.float32 and t.requires_grad for t in adapter.tensors.values())
    assert all(bool(t.any()) for name, t in adapter.tensors.items() if name.endswith(".up"))  # moved off zero
