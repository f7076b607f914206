"""Our forward pass == HF transformers' own model on the real SmolLM2 weights (fp32); the tiny random
models of every family are compared in tests/unit/test_forward.py."""

from __future__ import annotations

import torch


def test_real_smollm2_matches_hf(smollm2) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32).eval()
    ids = torch.tensor([smollm2.tokenizer("PrAd adapts only the prompt, then decodes with the base model.").input_ids])
    with torch.no_grad():
        ref = hf(ids).logits
    got = smollm2.model.forward(ids, torch.arange(ids.shape[1])[None], None)
    # logits reach ~30 in magnitude; fp32 with a different op order stays within 2e-4.
    assert torch.allclose(got, ref, atol=2e-4), (got - ref).abs().max()
