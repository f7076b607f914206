"""bench/peak.py: the FLOP counts on a config small enough to count by hand, the compute floor, and the
peak probe's output on tiny shapes (its numbers are timings: only their sign and structure are checked)."""

from __future__ import annotations

import argparse

import pytest

from bench import peak
from prad.config import ModelConfig


def _config(family: str = "llama", **changes: int) -> ModelConfig:
    fields = {"vocab_size": 10, "hidden_size": 4, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": 2,
              "intermediate_size": 6} | changes
    return ModelConfig(family=family, model_type=family, max_position_embeddings=64, norm_eps=1e-5,  # type: ignore[arg-type]
                       rope_theta=10000.0, has_qkv_bias=False, tie_word_embeddings=True, eos_token_ids=(0,), **fields)


def test_weight_counts_by_hand() -> None:
    c = _config()  # q 2x2 = 4 features, kv 1x2 = 2
    assert peak.projection_dims(c) == {"qkv": (4, 8), "o": (4, 4), "mlp_in": (4, 12), "down": (6, 4)}
    assert peak.layer_weight_count(c) == 2 * (32 + 16 + 48 + 24)  # 240
    assert peak.linear_weight_count(c) == 240 + 10 * 4
    gpt2 = _config("gpt2", num_kv_heads=2)  # one fc matrix instead of gate|up
    assert peak.projection_dims(gpt2)["mlp_in"] == (4, 6)


def test_flops_by_hand() -> None:
    c = _config()
    assert peak.attention_flops(c, 1) == 4 * 2 * 2 * 2  # 32 per (query, key) pair
    # 3-token prompt: 2 * 3 * 240 projections, 1 + 2 + 3 = 6 causal pairs, the LM head on one row
    assert peak.prefill_flops(c, 3) == 1440 + 6 * 32 + 2 * 40
    assert peak.prefill_flops(c, 3, rows=2, logits_rows=0) == 2 * (1440 + 6 * 32)
    # batch 2 attending 4 keys each: the LM head on every row
    assert peak.decode_step_flops(c, 2, 4) == 2 * 2 * 280 + 2 * 4 * 32
    # the prompt, then 2 decode steps at positions 3 and 4 (4 and 5 keys)
    assert peak.generation_flops(c, [3], 3) == 1712 + (560 + 4 * 32) + (560 + 5 * 32)
    assert peak.generation_flops(c, [3, 3], 1) == 2 * 1712


def test_flops_of_the_default_model_shape() -> None:
    """SmolLM2-135M's shape: about 0.21 GFLOP per prompt token and 0.27 per generated token (issue #22)."""
    c = _config(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                intermediate_size=1536)
    assert 2 * peak.layer_weight_count(c) / 1e9 == pytest.approx(0.212, abs=1e-3)
    assert 2 * peak.linear_weight_count(c) / 1e9 == pytest.approx(0.269, abs=1e-3)


def test_compute_floor_and_fraction() -> None:
    assert peak.compute_floor_s(2e9, 1e9) == 2.0
    assert peak.fraction_of_floor(2e9, 4.0, 1e9) == 0.5
    assert peak.fraction_of_floor(2e9, 4.0, None) is None


def test_model_shapes_from_the_config() -> None:
    c = _config()
    shapes = peak.model_shapes(c, tokens=[16], batches=[1, 16])
    by_name = {s.name: (s.rows, s.inner, s.cols) for s in shapes}
    # decode B=16's projections are prefill T=16's: listed once, under their first name
    assert by_name == {"prefill T=16 qkv": (16, 4, 8), "prefill T=16 o": (16, 4, 4), "prefill T=16 mlp_in": (16, 4, 12),
                       "prefill T=16 down": (16, 6, 4), "decode B=1 qkv": (1, 4, 8), "decode B=1 o": (1, 4, 4),
                       "decode B=1 mlp_in": (1, 4, 12), "decode B=1 down": (1, 6, 4),
                       "decode B=1 lm_head": (1, 4, 10), "decode B=16 lm_head": (16, 4, 10)}
    assert peak.GemmShape("x", 2, 3, 5).flops == 60


def test_probe_on_tiny_shapes() -> None:
    shapes = [peak.GemmShape("a", 4, 8, 16), peak.GemmShape("b", 16, 32, 8)]
    out = peak.measure_peaks(["float32", "bfloat16"], shapes, seconds=0.01)
    native = out["native_bf16"]["available"]
    assert isinstance(native, bool) and out["native_bf16"]["reason"]
    assert len(out["rates"]) == 2 * len(shapes) + (len(shapes) if native else 0)
    assert all(r["flops_per_s"] > 0 for r in out["rates"])
    assert {(r["backend"], r["dtype"]) for r in out["rates"]} >= {(peak.TORCH_MM, "float32"),
                                                                  (peak.TORCH_MM, "bfloat16")}
    assert set(out["best"]) == {"float32", "bfloat16"}
    for dtype, best in out["best"].items():
        assert best["flops_per_s"] == max(r["flops_per_s"] for r in out["rates"] if r["dtype"] == dtype)
        assert peak.peak_of(out, dtype) == best["flops_per_s"]
    assert out["shapes"][0] == {"name": "a", "rows": 4, "inner": 8, "cols": 16}
    assert peak.peak_of(None, "float32") is None and "skipped" in peak.describe(None)
    assert "peak float32" in peak.describe(out)


def test_probe_flags() -> None:
    parser = argparse.ArgumentParser()
    peak.add_probe_args(parser)
    args = parser.parse_args(["--no-peak-probe", "--peak-seconds", "0.05", "--peak-tokens", "16"])
    assert not args.peak_probe and args.peak_seconds == 0.05 and args.peak_tokens == [16]
    assert args.peak_batches == list(peak.DEFAULT_BATCHES)
    assert peak.probe_for_run(args, ["float32"], _config()) is None
