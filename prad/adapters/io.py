"""Adapter folders on disk: `adapter_config.json` + `adapter.safetensors`, validated on load.

Only safetensors is ever read; a folder offering a pickle (`*.bin`, `*.pt`, `*.pth`, `*.pkl`)
instead is refused by name. The version is a content hash, so equal bytes mean equal versions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from prad.adapters.config import AdapterConfig, AdapterError, expected_shapes
from prad.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass
class Adapter:
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]  # name -> tensor, names and shapes from expected_shapes()
    version: str  # content hash of config + weights

    def tensor(self, layer: int, name: str) -> torch.Tensor:
        return self.tensors[f"layers.{layer}.{name}"]

    def to(self, device: torch.device, dtype: torch.dtype) -> Adapter:
        moved = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}
        return replace(self, tensors=moved)


def content_version(config_bytes: bytes, weight_bytes: bytes) -> str:
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(config_bytes).digest())
    digest.update(hashlib.sha256(weight_bytes).digest())
    return digest.hexdigest()[:16]


def parse_adapter(config_bytes: bytes, weight_bytes: bytes, model: ModelConfig, fingerprint: str,
                  source: str = "adapter") -> Adapter:
    """Validate raw bytes (from disk or an upload) into an Adapter, or raise AdapterError."""
    try:
        raw = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{source}: {CONFIG_FILE} is not valid JSON ({e})") from e
    config = AdapterConfig.from_dict(raw)
    if config.base_model_fingerprint != fingerprint:
        raise AdapterError(
            f"{source}: made for model fingerprint {config.base_model_fingerprint!r}, "
            f"but this server runs {fingerprint!r}")
    try:
        tensors = load_safetensors_bytes(weight_bytes)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{source}: {WEIGHTS_FILE} is not a valid safetensors file ({e})") from e
    check_tensors(tensors, config, model, source)
    return Adapter(config, tensors, content_version(config_bytes, weight_bytes))


def check_tensors(tensors: dict[str, torch.Tensor], config: AdapterConfig, model: ModelConfig,
                  source: str) -> None:
    expected = expected_shapes(config, model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterError(
            f"{source}: tensors do not match variant {config.variant!r} rank {config.rank} on this model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise AdapterError(f"{source}: tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
        if not t.is_floating_point():
            raise AdapterError(f"{source}: tensor {name} has dtype {t.dtype}, expected a float type")
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{source}: tensor {name} holds NaN or infinite values")


def load_adapter(path: Path, model: ModelConfig, fingerprint: str) -> Adapter:
    """Read and validate an adapter folder."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not an adapter folder")
    if not (path / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
        raise AdapterError(f"{path}: missing {WEIGHTS_FILE}{hint}")
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{path}: missing {CONFIG_FILE}")
    return parse_adapter((path / CONFIG_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes(), model,
                         fingerprint, source=str(path))


def save_adapter(path: Path, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> str:
    """Write an adapter folder; returns its content version."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(path / WEIGHTS_FILE), metadata={"format": "pt", "variant": config.variant})
    (path / CONFIG_FILE).write_text(config.to_json())
    return content_version((path / CONFIG_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes())


def init_tensors(config: AdapterConfig, model: ModelConfig, seed: int, up_std: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Fresh adapter weights. down/a: Kaiming-uniform like nn.Linear; up/b: N(0, up_std) (0 = identity)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(config, model).items():
        if name.endswith((".down", ".a")):
            bound = 1.0 / shape[0] ** 0.5
            tensors[name] = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).to(dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=gen, dtype=torch.float64) * up_std).to(dtype)
    return tensors
