"""bench/serve_load.py end to end on a tiny random model (bench/random_model.py, 2 layers): capacity at
rate inf, then one Poisson rate at half of it, through the real server and the client process. Its
plumbing, arrival schedule and the consistency of what it reports are checked; its timings are not."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import serve_load
from bench.random_model import write_random_model

GEN, REQUESTS = 4, 6
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000}


def test_serve_load_bench_smoke(tmp_path) -> None:
    model = write_random_model(tmp_path / "model", **TINY)
    out = serve_load.main(["--model", str(model), "--tasks", "3", "--requests", str(REQUESTS), "--prompt-len", "8",
                           "--gen", str(GEN), "--capacity-fractions", "0.5", "--seed", "3", "--out", str(tmp_path),
                           "--threads", str(torch.get_num_threads()),
                           "--peak-seconds", "0.02", "--peak-tokens", "16", "--peak-batches", "2"])
    assert out == json.loads((tmp_path / "serve_load.json").read_text())
    assert (tmp_path / "serve_load.png").stat().st_size > 0
    burst, half = out["results"]
    assert (burst["label"], burst["rate_rps"], half["label"], half["capacity_fraction"]) == ("inf", None, "0.5 C", 0.5)
    assert half["rate_rps"] == pytest.approx(0.5 * burst["request_throughput_rps"])  # the capacity it measured
    for r in out["results"]:
        assert r["num_tokens"] == [GEN] * REQUESTS  # every request finished with all its tokens
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] <= r["e2e_p99_ms"] and r["ttft_p50_ms"] <= r["e2e_p50_ms"]
        assert 0 <= r["itl_p50_ms"] <= r["itl_p99_ms"] <= r["itl_max_ms"] and r["tpot_median_ms"] > 0
        assert r["output_throughput_tok_s"] == pytest.approx(GEN * r["request_throughput_rps"])
        assert 0 <= r["goodput_rps"] <= r["request_throughput_rps"] and 0 <= r["slo_met"] <= r["ttft_slo_met"] <= 1
        assert r["num_prefill_passes"] >= 1 and r["num_decode_steps"] >= GEN - 1
        assert 0 < r["fraction_of_floor"] <= 1.5  # a tiny probe: loose bounds
    burst_run, half_run = out["runs"]
    assert all(q["scheduled_s"] == 0.0 for q in burst_run["requests"])
    expected = serve_load.arrivals_s(REQUESTS, half["rate_rps"], 4)  # seed 3 + 1, the recorded ones rounded
    assert [q["scheduled_s"] for q in half_run["requests"]] == pytest.approx(expected, abs=1e-4)
    for q in burst_run["requests"] + half_run["requests"]:
        assert sum(q["chunk_tokens"]) == GEN and q["chunk_s"] == sorted(q["chunk_s"])
        assert q["scheduled_s"] - 1e-3 <= q["sent_s"] <= q["chunk_s"][0]  # never sent early (asyncio clock slack)
    assert {q["task"] for q in burst_run["requests"] + half_run["requests"]} <= {"task-000", "task-001", "task-002"}


def test_arrivals_are_seeded_and_scale_with_the_rate() -> None:
    unit = serve_load.arrivals_s(50, 1.0, seed=7)
    assert unit == serve_load.arrivals_s(50, 1.0, seed=7) != serve_load.arrivals_s(50, 1.0, seed=8)
    assert unit[0] == 0.0 and unit == sorted(unit)
    assert serve_load.arrivals_s(50, 4.0, seed=7) == pytest.approx([t / 4 for t in unit])
    assert serve_load.arrivals_s(3, math.inf, seed=7) == [0.0, 0.0, 0.0]


def test_itl_is_per_token_and_splits_merged_events() -> None:
    # events at 0 (first token), 1 (one token), 3 (two merged tokens): gaps 1, then 2 over two tokens
    assert serve_load.itl_samples_s([0.0, 1.0, 3.0], [1, 1, 2]) == [1.0, 1.0, 1.0]
    assert serve_load.itl_samples_s([0.5], [2]) == []


def test_rates_or_capacity_fractions_plan_the_runs() -> None:
    args = serve_load.parse_args(["--rates", "0.5,2,inf"])
    assert serve_load.plan(args) == [("0.5", None), ("2", None), ("inf", None)]
    assert serve_load.plan(serve_load.parse_args([])) == [("inf", None), ("0.5 C", 0.5), ("0.8 C", 0.8),
                                                          ("1 C", 1.0)]
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--rates", "1", "--capacity-fractions", "0.5"])
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--rates", "0,1"])
