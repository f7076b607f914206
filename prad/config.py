"""The model description our forward pass needs, read from a Hugging Face `config.json`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["llama", "gpt2"]

# Hugging Face `model_type` values served by each forward-pass family.
LLAMA_TYPES = frozenset({"llama", "qwen2", "mistral"})
GPT2_TYPES = frozenset({"gpt2"})


class UnsupportedModelError(ValueError):
    """The checkpoint is of a family or configuration our forward pass does not implement."""


@dataclass(frozen=True)
class ModelConfig:
    family: Family  # which forward pass: llama (RMSNorm, RoPE, SwiGLU, GQA) or gpt2 (LayerNorm, learned pos)
    model_type: str  # the HF model_type, kept for messages and the fingerprint
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int  # the model's context length, in tokens
    norm_eps: float
    rope_theta: float  # llama family only
    has_qkv_bias: bool  # qwen2 and gpt2 have biases on the attention input projections
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _llama_config(raw: dict[str, Any]) -> ModelConfig:
    num_heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    return ModelConfig(
        family="llama",
        model_type=raw["model_type"],
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(raw.get("head_dim") or hidden // num_heads),
        intermediate_size=int(raw["intermediate_size"]),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(raw),
        has_qkv_bias=raw["model_type"] == "qwen2" or bool(raw.get("attention_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=_eos_ids(raw),
    )


def _gpt2_config(raw: dict[str, Any]) -> ModelConfig:
    hidden = int(raw["n_embd"])
    num_heads = int(raw["n_head"])
    return ModelConfig(
        family="gpt2",
        model_type="gpt2",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["n_layer"]),
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        intermediate_size=int(raw.get("n_inner") or 4 * hidden),
        max_position_embeddings=int(raw["n_positions"]),
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        rope_theta=0.0,
        has_qkv_bias=True,
        tie_word_embeddings=True,
        eos_token_ids=_eos_ids(raw),
    )


def model_config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Map an HF config dict to ours; raise UnsupportedModelError naming what is not supported."""
    model_type = raw.get("model_type")
    if model_type in LLAMA_TYPES:
        if model_type == "mistral" and raw.get("sliding_window"):
            raise UnsupportedModelError("mistral with sliding-window attention is not supported")
        return _llama_config(raw)
    if model_type in GPT2_TYPES:
        if raw.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"gpt2 activation {raw.get('activation_function')!r} not supported")
        return _gpt2_config(raw)
    supported = sorted(LLAMA_TYPES | GPT2_TYPES)
    raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported: {supported}")
