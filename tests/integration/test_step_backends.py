"""The decode step backends agree (tiny models and the real SmolLM2), and the decode runner picks the one
meant for its device."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from decode_service.runner import DecodeRunner, choose_step_backend
from prad import kernels
from prad.config import model_config_from_hf
from prad.cpu_decode import CpuStepBackend
from prad.decode_step import ReferenceStep, StepBackend
from prad.model import Model
from prad.weights import read_tensors, weights_from_tensors
from tests.helpers import tiny_hf_model


def _model(family: str, tmp_path) -> Model:
    path = tiny_hf_model(family, tmp_path, vocab_size=512)
    config = model_config_from_hf(json.loads((path / "config.json").read_text()))
    return Model(config, weights_from_tensors(config, read_tensors(path)))


def greedy_tokens(backend: StepBackend, model: Model, prompts: list[list[int]], num_steps: int) -> list[list[int]]:
    """Prefill each prompt alone (Model.forward), then `num_steps` batched greedy steps through `backend`."""
    capacity = max(map(len, prompts)) + num_steps
    kv = model.new_kv_cache(len(prompts), capacity)
    tokens = []
    for row, prompt in enumerate(prompts):
        one = model.new_kv_cache(1, capacity)
        logits = model.forward(torch.tensor([prompt]), torch.arange(len(prompt))[None], one,
                               logit_index=torch.tensor([len(prompt) - 1]))
        kv.insert(row, one.extract(0, len(prompt)))
        tokens.append(int(logits.argmax()))
    positions = torch.tensor([len(p) for p in prompts])
    out = [tokens]
    for _ in range(num_steps):
        logits = backend.step(torch.tensor(out[-1]), positions, kv)
        assert logits.shape == (len(prompts), model.config.vocab_size) and logits.dtype == torch.float32
        out.append(logits.argmax(-1).tolist())
        positions = positions + 1
    return [list(row) for row in zip(*out, strict=True)]


def prompts_for(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(2, vocab_size, (length,), generator=gen).tolist() for length in (3, 9, 1, 14, 6)]


@pytest.mark.parametrize("native_kernels", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_reference_and_cpu_backends_give_the_same_greedy_tokens(family: str, native_kernels: bool, tmp_path) -> None:
    model = _model(family, tmp_path)
    prompts = prompts_for(model.config.vocab_size)
    reference = greedy_tokens(ReferenceStep(model), model, prompts, num_steps=6)
    cpu = greedy_tokens(CpuStepBackend(model, native_kernels=native_kernels), model, prompts, num_steps=6)
    assert cpu == reference


def test_the_runner_picks_the_cpu_backend_for_a_cpu_model(tmp_path, caplog) -> None:
    model = _model("llama", tmp_path)
    with caplog.at_level(logging.INFO, logger="decode_service.runner"):
        runner = DecodeRunner(model, max_batch_size=2, max_seq_len=64)
    assert isinstance(runner.backend, CpuStepBackend)
    assert runner.backend.name == ("cpu-native" if kernels.library() is not None else "cpu-torch")
    assert f"decode step: {runner.backend.name}" in caplog.text


def test_native_kernels_off_leaves_the_cpu_backend_on_pytorch_ops(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    for cached in (kernels.library, kernels.supports, kernels.supports_linear):
        cached.cache_clear()
    try:
        backend = choose_step_backend(_model("llama", tmp_path))
        assert isinstance(backend, CpuStepBackend) and backend.name == "cpu-torch" and backend.ops.native == ()
    finally:
        for cached in (kernels.library, kernels.supports, kernels.supports_linear):
            cached.cache_clear()


def test_a_model_off_the_cpu_gets_the_reference_step(tmp_path) -> None:
    """Shown with the meta device, which every machine has; a CUDA model takes the same branch."""
    cpu = _model("llama", tmp_path)
    meta = Model(cpu.config, cpu.weights.to(torch.device("meta"), torch.float32))
    assert isinstance(choose_step_backend(meta), ReferenceStep)
    with pytest.raises(ValueError, match="needs a model on the CPU"):
        CpuStepBackend(meta)



def test_reference_and_cpu_backends_give_the_same_greedy_tokens_on_smollm2(smollm2) -> None:
    """On the real model (fp32), the CPU backend decodes the same greedy tokens as the reference step."""
    model = smollm2.model
    prompts = [smollm2.tokenizer(text).input_ids for text in
               ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,", "1, 2, 3,")]
    reference = greedy_tokens(ReferenceStep(model), model, prompts, num_steps=8)
    assert greedy_tokens(CpuStepBackend(model), model, prompts, num_steps=8) == reference
