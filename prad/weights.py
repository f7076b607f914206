"""Base-model weights in our own layout, read straight from an HF checkpoint's safetensors files.

Every linear weight is stored `[out_features, in_features]` (the `F.linear` convention); GPT-2's
Conv1D weights are transposed on load. Projections that always run together are fused: q|k|v into
one matrix, and gate|up for the llama family, so each layer does two input matmuls instead of five.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open

from prad.config import ModelConfig


@dataclass
class LayerWeights:
    attn_norm_w: torch.Tensor  # [d]
    attn_norm_b: torch.Tensor | None  # [d] (gpt2)
    qkv_w: torch.Tensor  # [q_size + 2 * kv_size, d]
    qkv_b: torch.Tensor | None  # [q_size + 2 * kv_size]
    o_w: torch.Tensor  # [d, q_size]
    o_b: torch.Tensor | None  # [d] (gpt2)
    mlp_norm_w: torch.Tensor  # [d]
    mlp_norm_b: torch.Tensor | None  # [d] (gpt2)
    mlp_in_w: torch.Tensor  # llama: gate|up [2 * I, d]; gpt2: c_fc [I, d]
    mlp_in_b: torch.Tensor | None  # gpt2: [I]
    mlp_out_w: torch.Tensor  # [d, I]
    mlp_out_b: torch.Tensor | None  # gpt2: [d]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, d]
    pos_embed: torch.Tensor | None  # gpt2: [P, d]
    layers: list[LayerWeights]
    final_norm_w: torch.Tensor  # [d]
    final_norm_b: torch.Tensor | None  # gpt2: [d]
    lm_head: torch.Tensor  # [V, d]; the embedding itself when tied

    def to(self, device: torch.device, dtype: torch.dtype) -> ModelWeights:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        def move_optional(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else move(t)

        layers = [LayerWeights(**cast(dict[str, Any], {k: move_optional(v) for k, v in vars(lw).items()}))
                  for lw in self.layers]
        embed = move(self.embed)
        tied = self.lm_head is self.embed
        return ModelWeights(
            embed=embed,
            pos_embed=move_optional(self.pos_embed),
            layers=layers,
            final_norm_w=move(self.final_norm_w),
            final_norm_b=move_optional(self.final_norm_b),
            lm_head=embed if tied else move(self.lm_head),
        )


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files; pickle checkpoints (.bin/.pt) are never read."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{model_dir}: no model.safetensors (pickle checkpoints are not loaded)")


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = f.get_tensor(key)
    return tensors


def _getter(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> Callable[..., torch.Tensor]:
    def get(name: str, optional: bool = False) -> torch.Tensor:
        for prefix in prefixes:
            if prefix + name in tensors:
                return tensors[prefix + name].float()
        if optional:
            return None  # type: ignore[return-value]
        raise KeyError(f"checkpoint has no tensor {name!r} (tried prefixes {prefixes})")

    return get


def _llama_layer(get: Callable[..., torch.Tensor], i: int) -> LayerWeights:
    p = f"layers.{i}."
    qkv_b = None
    if get(p + "self_attn.q_proj.bias", optional=True) is not None:
        qkv_b = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
    return LayerWeights(
        attn_norm_w=get(p + "input_layernorm.weight"),
        attn_norm_b=None,
        qkv_w=torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
        qkv_b=qkv_b,
        o_w=get(p + "self_attn.o_proj.weight"),
        o_b=None,
        mlp_norm_w=get(p + "post_attention_layernorm.weight"),
        mlp_norm_b=None,
        mlp_in_w=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
        mlp_in_b=None,
        mlp_out_w=get(p + "mlp.down_proj.weight"),
        mlp_out_b=None,
    )


def _gpt2_layer(get: Callable[..., torch.Tensor], i: int) -> LayerWeights:
    p = f"h.{i}."
    # GPT-2's Conv1D stores weights [in, out]: transpose to [out, in].
    return LayerWeights(
        attn_norm_w=get(p + "ln_1.weight"),
        attn_norm_b=get(p + "ln_1.bias"),
        qkv_w=get(p + "attn.c_attn.weight").t().contiguous(),
        qkv_b=get(p + "attn.c_attn.bias"),
        o_w=get(p + "attn.c_proj.weight").t().contiguous(),
        o_b=get(p + "attn.c_proj.bias"),
        mlp_norm_w=get(p + "ln_2.weight"),
        mlp_norm_b=get(p + "ln_2.bias"),
        mlp_in_w=get(p + "mlp.c_fc.weight").t().contiguous(),
        mlp_in_b=get(p + "mlp.c_fc.bias"),
        mlp_out_w=get(p + "mlp.c_proj.weight").t().contiguous(),
        mlp_out_b=get(p + "mlp.c_proj.bias"),
    )


def weights_from_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> ModelWeights:
    """Build our layout (fp32, CPU) from an HF state dict."""
    if config.family == "llama":
        get = _getter(tensors, ("model.", ""))
        embed = get("embed_tokens.weight")
        layers = [_llama_layer(get, i) for i in range(config.num_layers)]
        head = None if config.tie_word_embeddings else _getter(tensors, ("",))("lm_head.weight", True)
        return ModelWeights(
            embed=embed,
            pos_embed=None,
            layers=layers,
            final_norm_w=get("norm.weight"),
            final_norm_b=None,
            lm_head=embed if head is None else head,
        )
    get = _getter(tensors, ("transformer.", ""))
    embed = get("wte.weight")
    return ModelWeights(
        embed=embed,
        pos_embed=get("wpe.weight"),
        layers=[_gpt2_layer(get, i) for i in range(config.num_layers)],
        final_norm_w=get("ln_f.weight"),
        final_norm_b=get("ln_f.bias"),
        lm_head=embed,
    )
