"""Adapter variants: identity init, per-row batching, the prompt mask, and refusal of bad adapters."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from prad.adapters import AdapterConfig, AdapterError, RowAdapters, load_adapter, save_adapter
from prad.adapters.io import init_tensors
from prad.config import model_config_from_hf
from prad.model import Model
from prad.weights import read_tensors, weights_from_tensors
from tests.helpers import random_adapter, tiny_hf_model

FP = "test-fingerprint"
VARIANTS = ["prad-pa", "prad-sa", "prad-lora"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Model:
    path = tiny_hf_model("llama", tmp_path_factory.mktemp("tiny"))
    config = model_config_from_hf(json.loads((path / "config.json").read_text()))
    return Model(config, weights_from_tensors(config, read_tensors(path)))


def _logits(model: Model, ids: torch.Tensor, adapters, mask: torch.Tensor, strategy: str = "gather") -> torch.Tensor:
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    hooks = RowAdapters(model.config, adapters, mask, strategy)
    return model.forward(ids, positions, None, hooks)


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_init_adapter_is_identity_and_nonzero_changes_output(tiny: Model, variant: str) -> None:
    ids = torch.randint(2, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    base = tiny.forward(ids, torch.arange(9)[None], None)
    identity = random_adapter(variant, tiny.config, FP, seed=1, scale=0.0)
    assert torch.equal(_logits(tiny, ids, [identity], torch.ones(1, 9)), base)
    changed = random_adapter(variant, tiny.config, FP, seed=1, scale=0.5)
    assert (_logits(tiny, ids, [changed], torch.ones(1, 9)) - base).abs().max() > 1e-3


@pytest.mark.parametrize("strategy", ["gather", "segment"])
def test_mixed_batch_rows_equal_rows_alone(tiny: Model, strategy: str) -> None:
    """Rows of one batch with different variants, ranks, targets, or none == each row run alone."""
    adapters = [
        random_adapter("prad-pa", tiny.config, FP, 1, rank=4),
        random_adapter("prad-pa", tiny.config, FP, 2, rank=8),
        None,
        random_adapter("prad-sa", tiny.config, FP, 3),
        random_adapter("prad-lora", tiny.config, FP, 4, targets=("q", "k", "v", "o")),
        random_adapter("prad-lora", tiny.config, FP, 5, rank=2),
    ]
    adapters.append(adapters[0])  # the same adapter on two rows
    ids = torch.randint(2, 128, (len(adapters), 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(len(adapters), 11)
    mask[1, 7:] = 0.0  # a PrAd prompt mask that ends early on one row
    batched = _logits(tiny, ids, adapters, mask, strategy)
    for i, a in enumerate(adapters):
        alone = _logits(tiny, ids[i : i + 1], [a], mask[i : i + 1])
        assert torch.allclose(batched[i], alone[0], atol=1e-5), i


def test_unknown_strategy_refused(tiny: Model) -> None:
    with pytest.raises(ValueError, match="unknown adapter strategy"):
        RowAdapters(tiny.config, [None], torch.ones(1, 2), "per-row")


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_mask_keeps_adapter_off_masked_rows(tiny: Model, variant: str) -> None:
    """With mask 0 from position 6 on, position 6's own contribution is the base model's:
    changing the adapter changes earlier positions' outputs but the masked token adds nothing itself."""
    ids = torch.randint(2, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    a = random_adapter(variant, tiny.config, FP, seed=7, scale=0.5)
    all_masked = _logits(tiny, ids, [a], torch.zeros(1, 8))
    base = tiny.forward(ids, torch.arange(8)[None], None)
    assert torch.equal(all_masked, base)
    mask = torch.zeros(1, 8)
    mask[0, :6] = 1.0
    prompt_only = _logits(tiny, ids, [a], mask)
    assert torch.allclose(prompt_only[0, :6], _logits(tiny, ids[:, :6], [a], torch.ones(1, 6))[0], atol=1e-5)


def _adapter_grad(tiny: Model, mask: torch.Tensor) -> torch.Tensor:
    a = random_adapter("prad-pa", tiny.config, FP, seed=2, scale=0.1)
    for t in a.tensors.values():
        t.requires_grad_(True)
    ids = torch.randint(2, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    logits = tiny.forward_train(ids, torch.arange(8)[None], None, RowAdapters(tiny.config, [a], mask))
    logits[0, 5:].sum().backward()  # a loss on the "target" rows only
    return torch.stack([t.grad.abs().sum() if t.grad is not None else torch.tensor(0.0)
                        for t in a.tensors.values()]).sum()


def test_gradients_flow_only_through_prompt_rows(tiny: Model) -> None:
    """Target rows carry no adapter: with the prompt masked too, the adapter gets exactly zero gradient;
    unmask the prompt and the target loss reaches it (through the prompt's keys and values)."""
    assert float(_adapter_grad(tiny, torch.zeros(1, 8))) == 0.0
    prompt_mask = torch.zeros(1, 8)
    prompt_mask[0, :5] = 1.0
    assert float(_adapter_grad(tiny, prompt_mask)) > 0.0


def _save(tmp_path, tiny: Model, variant: str = "prad-pa", fingerprint: str = FP):
    config = AdapterConfig(variant=variant, rank=4, base_model_fingerprint=fingerprint)
    save_adapter(tmp_path / "a", config, init_tensors(config, tiny.config, 0, 0.1))
    return tmp_path / "a"


def test_adapter_roundtrip_and_content_version(tmp_path, tiny: Model) -> None:
    path = _save(tmp_path, tiny)
    a = load_adapter(path, tiny.config, FP)
    b = load_adapter(path, tiny.config, FP)
    assert a.version == b.version and len(a.version) == 16


def test_wrong_fingerprint_refused(tmp_path, tiny: Model) -> None:
    path = _save(tmp_path, tiny, fingerprint="other-model")
    with pytest.raises(AdapterError, match="made for model fingerprint 'other-model'"):
        load_adapter(path, tiny.config, FP)


def test_wrong_shapes_refused(tmp_path, tiny: Model) -> None:
    path = _save(tmp_path, tiny)
    raw = json.loads((path / "adapter_config.json").read_text())
    raw["rank"] = 5
    (path / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(AdapterError, match=r"shape \[64, 4\], expected \[64, 5\]"):
        load_adapter(path, tiny.config, FP)


def test_unknown_variant_refused(tmp_path, tiny: Model) -> None:
    path = _save(tmp_path, tiny)
    raw = json.loads((path / "adapter_config.json").read_text())
    raw["variant"] = "prad-magic"
    (path / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(AdapterError, match="unknown variant 'prad-magic'"):
        load_adapter(path, tiny.config, FP)


def test_pickle_refused(tmp_path, tiny: Model) -> None:
    path = _save(tmp_path, tiny)
    (path / "adapter.safetensors").unlink()
    (path / "adapter.bin").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(AdapterError, match=r"found \['adapter.bin'\]: pickle files are never loaded"):
        load_adapter(path, tiny.config, FP)
    # a pickle renamed to .safetensors is not parsed either
    (path / "adapter.safetensors").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(AdapterError, match="not a valid safetensors file"):
        load_adapter(path, tiny.config, FP)


def test_non_finite_refused(tmp_path, tiny: Model) -> None:
    config = AdapterConfig(variant="prad-pa", rank=4, base_model_fingerprint=FP)
    tensors = init_tensors(config, tiny.config, 0, 0.1)
    tensors["layers.1.pa.up"][0, 0] = float("nan")
    save_adapter(tmp_path / "a", config, tensors)
    with pytest.raises(AdapterError, match=r"layers\.1\.pa\.up holds NaN"):
        load_adapter(tmp_path / "a", tiny.config, FP)


@pytest.mark.parametrize("field", ["alpha", "scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), True, "1.0"])
def test_non_finite_or_non_numeric_scalars_refused(field: str, value: object) -> None:
    with pytest.raises(AdapterError, match=field):
        AdapterConfig.from_dict({"variant": "prad-pa", "rank": 4, "base_model_fingerprint": "f", field: value})


@pytest.mark.parametrize("task", ["evil\n", "ok\n", "a/b", "../x", "Upper", "", "base", "x" * 65, "t\x00"])
def test_task_ids_must_match_whole(task: str) -> None:
    from prad.adapters.config import validate_task_id

    with pytest.raises(AdapterError):
        validate_task_id(task)
