"""Any local HF directory of the supported families serves end to end (tiny random models with the
SmolLM2 tokenizer), with the same invariant: server tokens == one masked forward per step."""

from __future__ import annotations

import shutil

import httpx
import pytest
import torch

from launcher.embedded import build_embedded_app
from launcher.settings import ServeSettings
from prad.adapters import load_adapter
from prad.loading import load_model
from prad.reference import reference_generate
from tests.helpers import running_server, tiny_hf_model, write_adapter


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "llama"])
def test_local_hf_dir_serves_and_matches_reference(family: str, smollm2, tmp_path) -> None:
    path = tiny_hf_model(family, tmp_path, vocab_size=smollm2.config.vocab_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2.path / name, path / name)
    loaded = load_model(str(path), "cpu", "float32")
    assert loaded.config.family == ("gpt2" if family == "gpt2" else "llama")
    assert loaded.fingerprint != smollm2.fingerprint
    adapters = tmp_path / "adapters"
    write_adapter(adapters, "lora", "prad-lora", loaded.config, loaded.fingerprint, 1, 0.5)
    write_adapter(adapters, "pa", "prad-pa", loaded.config, loaded.fingerprint, 2, 0.5)
    settings = ServeSettings(adapters=adapters, dtype="float32", device="cpu", max_seq_len=120)
    with running_server(build_embedded_app(settings, loaded)) as url:
        for task in ("base", "lora", "pa"):
            prompt = "Tiny models speak in random tokens:"
            r = httpx.post(url + "/generate", json={"task": task, "prompt": prompt, "max_new_tokens": 10,
                                                    "ignore_eos": True}, timeout=60)
            assert r.status_code == 200, r.text
            adapter = None if task == "base" else load_adapter(adapters / task, loaded.config, loaded.fingerprint)
            ref = reference_generate(loaded.model, adapter, loaded.tokenizer(prompt).input_ids, 10, ignore_eos=True)
            assert r.json()["token_ids"] == ref


def test_adapter_for_another_model_refused_by_fingerprint(smollm2, tmp_path) -> None:
    path = tiny_hf_model("llama", tmp_path, vocab_size=smollm2.config.vocab_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2.path / name, path / name)
    loaded = load_model(str(path), "cpu", "float32")
    write_adapter(tmp_path / "a", "t", "prad-pa", loaded.config, smollm2.fingerprint, 1, 0.5)
    with pytest.raises(ValueError, match="made for model fingerprint"):
        load_adapter(tmp_path / "a" / "t", loaded.config, loaded.fingerprint)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_forward_close_to_cpu_fp32(smollm2) -> None:
    gpu = load_model(None, "cuda", "bfloat16")
    ids = torch.tensor([smollm2.tokenizer("The quick brown fox jumps over").input_ids])
    positions = torch.arange(ids.shape[1])[None]
    ref = smollm2.model.forward(ids, positions, None)
    got = gpu.model.forward(ids.cuda(), positions.cuda(), None).cpu()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    assert (got - ref).abs().max() < 1.5
