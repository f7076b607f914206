"""The KVHandoff message: everything decode needs to continue a request prefill started.

Decode never recomputes a prompt token (it has no adapter), so the handoff carries the KV of
every prompt token and the first output token, sampled at prefill from the adapted logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kv_transfer.outcome import HandoffError
from prad.sampling import SamplingParams

__all__ = ["HandoffError", "KVHandoff", "KVLayout", "check_handoff"]


@dataclass(frozen=True)
class KVLayout:
    num_layers: int  # transformer layers
    num_kv_heads: int  # key/value heads per layer
    head_dim: int  # features per head
    dtype: str  # "float32" | "bfloat16" | "float16"
    length: int  # prompt tokens covered (= len(prompt_token_ids))

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """The tensor shape: [layers, 2 (K, V), kv_heads, length, head_dim]."""
        return (self.num_layers, 2, self.num_kv_heads, self.length, self.head_dim)


@dataclass
class KVHandoff:
    request_id: str  # unique per request; KV keys and token streams are named after it
    task: str  # task id ("base" = no adapter)
    adapter_version: str  # content hash of the adapter version that prefilled ("base" for none)
    model_fingerprint: str  # hash of config + weights + tokenizer; decode refuses any other
    prompt_token_ids: list[int]  # the prompt, as prefilled
    first_token_id: int  # output token 0, sampled at prefill from the adapted logits
    sampling: SamplingParams  # how to sample the rest; max_new_tokens counts the first token
    deadline_s: float | None  # absolute time.time() after which decode aborts the request
    layout: KVLayout  # shape/dtype of `kv`
    kv: torch.Tensor  # [layers, 2, kv_heads, length, head_dim]


def check_handoff(handoff: KVHandoff, fingerprint: str, expected: KVLayout) -> None:
    """Raise HandoffError naming the first mismatch; nothing is admitted before this passes."""
    if handoff.model_fingerprint != fingerprint:
        raise HandoffError(
            f"model fingerprint mismatch: KV made by {handoff.model_fingerprint!r}, decode runs {fingerprint!r}")
    got = handoff.layout
    for name in ("num_layers", "num_kv_heads", "head_dim"):
        if getattr(got, name) != getattr(expected, name):
            raise HandoffError(f"KV layout mismatch: {name}={getattr(got, name)}, decode expects "
                               f"{getattr(expected, name)}")
    if got.length != len(handoff.prompt_token_ids) or tuple(handoff.kv.shape) != got.shape:
        raise HandoffError(f"KV shape {list(handoff.kv.shape)} does not match layout {list(got.shape)}")
