"""Adapter configuration (`adapter_config.json`) and the tensor names and shapes each variant owns.

Conventions (documented in docs/design.md):
* PA / PrAd-PA: parallel to the FFN, `y' = y + scale * m * ReLU(z @ down) @ up`, z the normed FFN
  input, `up` zero-initialised so a fresh adapter is the identity.
* SA / PrAd-SA: sequential after the FFN, `y' = y + scale * m * ReLU(y @ down) @ up`.
* LoRA / PrAd-LoRA: on attention projections (targets among q, k, v, o; default q, v),
  `proj' = proj + (alpha / rank) * m * (x @ a) @ b`, `a` random, `b` zero-initialised (PEFT's
  convention). Foreign checkpoints scaled by `alpha` alone must be converted (alpha := alpha * rank).
`m` is the per-token prompt mask: 1 on prompt tokens, 0 on generated tokens and padding, for the
PrAd variants; the conventional `pa`, `sa`, `lora` use m = 1 everywhere (training baselines only —
a decode service without adapters cannot serve them).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from prad.config import ModelConfig

FORMAT_VERSION = 1
VARIANTS = ("prad-pa", "prad-sa", "prad-lora", "pa", "sa", "lora")
PRAD_VARIANTS = ("prad-pa", "prad-sa", "prad-lora")
LORA_TARGETS = ("q", "k", "v", "o")
MAX_RANK = 1024
TASK_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # use with fullmatch: "$" lets a trailing newline pass


class AdapterError(ValueError):
    """An adapter that cannot be used: the message names the file and the problem."""


def validate_task_id(task: str) -> str:
    if not TASK_ID_RE.fullmatch(task) or task == "base":
        raise AdapterError(
            f"invalid task id {task!r}: use 1-64 chars of a-z, 0-9, '_', '.', '-' (not 'base')")
    return task


@dataclass(frozen=True)
class AdapterConfig:
    variant: str  # one of VARIANTS
    rank: int  # bottleneck width (PA/SA) or LoRA rank
    base_model_fingerprint: str  # the model it was made for; loading on another model is refused
    alpha: float = 16.0  # LoRA only: scaling is alpha / rank
    scale: float = 1.0  # PA/SA only: output multiplier
    targets: tuple[str, ...] = ("q", "v")  # LoRA only
    prompt_template: str | None = None  # e.g. "Review: {input}\nSentiment:"; applied to "input" requests
    format_version: int = FORMAT_VERSION
    metadata: dict[str, Any] = field(default_factory=dict)  # free-form: training run, task, scores

    @property
    def kind(self) -> str:
        """The adapter family without the prad- prefix: pa, sa or lora."""
        return self.variant.removeprefix("prad-")

    @property
    def is_prompt_only(self) -> bool:
        return self.variant in PRAD_VARIANTS

    @property
    def lora_scaling(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> str:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AdapterConfig:
        if not isinstance(raw, dict):
            raise AdapterError("adapter_config.json must hold a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise AdapterError(f"adapter_config.json: unknown fields {unknown}")
        for name in ("variant", "rank", "base_model_fingerprint"):
            if name not in raw:
                raise AdapterError(f"adapter_config.json: missing field {name!r}")
        raw = dict(raw)
        if "targets" in raw:
            raw["targets"] = tuple(raw["targets"])
        try:
            config = cls(**raw)
        except TypeError as e:
            raise AdapterError(f"adapter_config.json: {e}") from e
        config.check()
        return config

    def check(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise AdapterError(f"format_version {self.format_version!r} unsupported (expected {FORMAT_VERSION})")
        if self.variant not in VARIANTS:
            raise AdapterError(f"unknown variant {self.variant!r}; expected one of {list(VARIANTS)}")
        if not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
            raise AdapterError(f"rank {self.rank!r} must be an integer in [1, {MAX_RANK}]")
        if self.kind == "lora":
            bad = [t for t in self.targets if t not in LORA_TARGETS]
            if bad or not self.targets or len(set(self.targets)) != len(self.targets):
                raise AdapterError(f"LoRA targets {list(self.targets)} invalid; choose from {list(LORA_TARGETS)}")
        for name in ("alpha", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise AdapterError(f"{name} must be a finite number, got {value!r}")
        if self.prompt_template is not None and "{input}" not in self.prompt_template:
            raise AdapterError("prompt_template must contain '{input}'")


def expected_shapes(config: AdapterConfig, model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the adapter must hold, by name, with its shape on this model."""
    d, r = model.hidden_size, config.rank
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(model.num_layers):
        if config.kind in ("pa", "sa"):
            shapes[f"layers.{i}.{config.kind}.down"] = (d, r)
            shapes[f"layers.{i}.{config.kind}.up"] = (r, d)
        else:
            dims = {"q": (d, model.q_size), "k": (d, model.kv_size), "v": (d, model.kv_size),
                    "o": (model.q_size, d)}
            for t in config.targets:
                d_in, d_out = dims[t]
                shapes[f"layers.{i}.lora_{t}.a"] = (d_in, r)
                shapes[f"layers.{i}.lora_{t}.b"] = (r, d_out)
    return shapes
