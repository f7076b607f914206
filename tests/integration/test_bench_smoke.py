"""The benchmarks run end to end on a tiny workload with the real model: their plumbing, JSON and plot
are checked, and the token agreements they check themselves must hold; their timings are not checked."""

from __future__ import annotations

import json
import os

import torch

from bench import decode, multitask, soak, soak_requests
from prad import kernels


def _threads() -> list[str]:
    return ["--threads", str(torch.get_num_threads())]  # keep the test session's thread count


def test_decode_bench_smoke(tmp_path) -> None:
    decode.main(["--batches", "1,3", "--steps", "2", "--warmup", "1", "--repeats", "1", "--context", "8",
                 "--tasks", "2", "--dtypes", "float32", "--out", str(tmp_path), *_threads()])
    out = json.loads((tmp_path / "decode.json").read_text())
    assert [r["batch"] for r in out["results"]] == [1, 3]  # 3 rows: a padded step on CPU
    for r in out["results"]:
        assert set(r["tokens_per_s"]) == {"base", "tasks", "forward", "torch-ops"}
        assert min(r["tokens_per_s"].values()) > 0 and r["step_over_forward"] > 0
        assert r["native_over_torch_ops"] > 0
        assert r["matmul_ref_flops_per_s"] > 0 and r["fraction_of_matmul_ref"] > 0
        low, high = r["fraction_of_matmul_ref_ci95"]
        assert low <= r["fraction_of_matmul_ref"] <= high and r["fraction_of_matmul_ref_rounds"] > 0
        assert len(out["matmul_reference"]["float32"]["paired_samples"][str(r["batch"])]) == 2  # one per step
        assert {len(v) for v in r["step_seconds"].values()} == {2}  # repeats x steps, every condition
        low, high = r["tasks_over_base_ci95"]
        assert low <= r["tasks_over_base"] <= high
    assert out["machine"]["native_kernels"] is (kernels.library() is not None)
    assert (tmp_path / "decode.png").stat().st_size > 0


def test_multitask_bench_smoke(tmp_path) -> None:
    arms = "prad-pa,prad-pa-grpc,base,lora-per-task,lora-mixed,peft-lora-mixed,base-loop"
    multitask.main(["--tasks", "2", "--requests", "4", "--prompt-len", "8", "--gen", "3", "--repeats", "1",
                    "--arms", arms, "--no-estimate", "--out", str(tmp_path), *_threads()])
    out = json.loads((tmp_path / "multitask.json").read_text())
    assert {r["arm"] for r in out["results"]} == set(arms.split(","))
    assert all(r["total_s"] > 0 for r in out["results"])
    checks = out["per_dtype"]["float32"]["checks"]
    agreements = {k: v for k, v in checks.items() if "==" in k}
    assert len(agreements) == 4 and all(v == 1.0 for v in agreements.values()), checks
    assert checks["peft_vs_engine_lora_max_abs_logit_diff"] < 1e-3
    assert (tmp_path / "multitask.png").stat().st_size > 0


def test_soak_bench_smoke(server, tmp_path) -> None:
    """~20 s of the soak's whole mix against the in-process server; RSS is this process's (the server's)."""
    exit_code = soak.main(["--url", server, "--pid", str(os.getpid()), "--minutes", "0.3", "--concurrency", "4",
                           "--sample-s", "1", "--progress-s", "5", "--request-timeout-s", "20",
                           "--out", str(tmp_path)])
    [path] = tmp_path.glob("soak_*.json")
    out = json.loads(path.read_text())
    assert path.with_suffix(".png").stat().st_size > 0
    assert exit_code == (1 if out["unexplained"]["total"] else 0)
    assert out["num_requests"] == sum(sum(c.values()) for c in out["counts"].values()) > 10
    assert set(out["counts"]) <= set(soak_requests.KINDS) and len(out["counts"]) >= 5
    assert 0.0 <= out["rate_429"] <= 1.0
    rss = out["rss"]
    assert len(rss["samples"]) >= 10 and rss["max_mb"] > 0 and isinstance(rss["growth_pct"], float)
    assert all(0 < v["p50"] <= v["p99"] and v["count"] > 0 for v in out["latency_s"].values())
    assert set(out["unexplained"]) == {"total", "by_kind", "examples"}
    assert set(out["errors"]) <= set(out["counts"])
    assert out["server"]["tasks"][0] == "base" and out["server"]["after_load"]["is_idle"] is not None
