"""On the real model (fp32), the CPU backend decodes the same greedy tokens as the reference step."""

from __future__ import annotations

from prad.cpu_decode import CpuStepBackend
from prad.decode_step import ReferenceStep
from tests.unit.test_step_backends import greedy_tokens


def test_reference_and_cpu_backends_give_the_same_greedy_tokens_on_smollm2(smollm2) -> None:
    model = smollm2.model
    prompts = [smollm2.tokenizer(text).input_ids for text in
               ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,", "1, 2, 3,")]
    reference = greedy_tokens(ReferenceStep(model), model, prompts, num_steps=8)
    assert greedy_tokens(CpuStepBackend(model), model, prompts, num_steps=8) == reference
