"""Shared test helpers: tiny random HF models, adapters, and a real uvicorn server on loopback."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import uvicorn

from launcher.local import free_port
from prad.adapters import Adapter, AdapterConfig
from prad.adapters.io import init_tensors, save_adapter
from prad.config import ModelConfig


def tiny_hf_model(family: str, tmp: Path, vocab_size: int = 128) -> Path:
    """Save a tiny random-initialised HF model (fp32, safetensors), without a tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128, rope_theta=10000.0,
                                             tie_word_embeddings=False, eos_token_id=1))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128, tie_word_embeddings=True,
                                             eos_token_id=1))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                           eos_token_id=1))
    out = tmp / family
    model.save_pretrained(out, safe_serialization=True)
    return out


def random_adapter(variant: str, model: ModelConfig, fingerprint: str, seed: int, scale: float = 0.2,
                   rank: int = 4, targets: tuple[str, ...] = ("q", "v")) -> Adapter:
    config = AdapterConfig(variant=variant, rank=rank, base_model_fingerprint=fingerprint, targets=targets)
    return Adapter(config, init_tensors(config, model, seed, scale), f"v{seed}")


def write_adapter(root: Path, task: str, variant: str, model: ModelConfig, fingerprint: str, seed: int,
                  scale: float = 0.2, rank: int = 8, template: str | None = None) -> Path:
    config = AdapterConfig(variant=variant, rank=rank, base_model_fingerprint=fingerprint, prompt_template=template)
    save_adapter(root / task, config, init_tensors(config, model, seed, scale))
    return root / task


@contextmanager
def running_server(app, timeout_s: float = 60.0, **uvicorn_options):
    """Serve a FastAPI app with uvicorn on a free loopback port; yields the base URL. `uvicorn_options`
    go to uvicorn.Config (e.g. launcher.embedded.uvicorn_options(settings))."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           **uvicorn_options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        raise RuntimeError("server did not become ready")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
