"""Our forward pass == HF transformers' own model on the same weights (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from prad.config import UnsupportedModelError, model_config_from_hf
from prad.model import Model
from prad.weights import read_tensors, weights_from_tensors
from tests.helpers import tiny_hf_model

# fp32, different op order (fused qkv / gate-up, SDPA): agreement well below 1e-4 absolute.
ATOL = 1e-4


def _ours_and_hf(family: str, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny_hf_model(family, tmp_path)
    config = model_config_from_hf(json.loads((path / "config.json").read_text()))
    ours = Model(config, weights_from_tensors(config, read_tensors(path)))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, hf


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_logits_match_hf(family: str, tmp_path) -> None:
    ours, hf = _ours_and_hf(family, tmp_path)
    ids = torch.randint(2, 128, (3, 17), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(17)[None].expand(3, -1)
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours.forward(ids, positions, None)
    assert torch.allclose(got, ref, atol=ATOL), (got - ref).abs().max()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_chunked_kv_cache_matches_full_forward(family: str, tmp_path) -> None:
    ours, hf = _ours_and_hf(family, tmp_path)
    ids = torch.randint(2, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
    kv = ours.new_kv_cache(1, 32)
    parts = []
    for start, end in [(0, 7), (7, 15), (15, 16), (16, 20)]:
        parts.append(ours.forward(ids[:, start:end], torch.arange(start, end)[None], kv))
    assert torch.allclose(torch.cat(parts, dim=1), ref, atol=ATOL)


def test_unsupported_model_type_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="model_type 'bert'"):
        model_config_from_hf({"model_type": "bert"})
