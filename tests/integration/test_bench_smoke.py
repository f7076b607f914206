"""The benchmarks run end to end on a tiny workload with the real model: their plumbing, JSON and plot
are checked, and the token agreements they check themselves must hold; their timings are not checked.
Every bench module with a `main` has one here, so `make bench` cannot break unnoticed."""

from __future__ import annotations

import io
import json
import os

import httpx
import pytest
import torch

from bench import decode, http_load, multitask, prefill, prefix_cache, soak, soak_requests, transfer
from prad import kernels


def _threads() -> list[str]:
    return ["--threads", str(torch.get_num_threads())]  # keep the test session's thread count


def test_decode_bench_smoke(tmp_path) -> None:
    decode.main(["--batches", "1,3", "--steps", "2", "--warmup", "1", "--repeats", "1", "--context", "8",
                 "--tasks", "2", "--dtypes", "float32", "--out", str(tmp_path), *_threads(),
                 "--peak-seconds", "0.02", "--peak-tokens", "16", "--peak-batches", "2"])
    out = json.loads((tmp_path / "decode.json").read_text())
    assert out["peak"]["best"]["float32"]["flops_per_s"] > 0
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
        assert r["peak_flops_per_s"] > 0 and 0 < r["fraction_of_floor"] <= 1.5  # a tiny probe: loose bounds
    assert out["machine"]["native_kernels"] is (kernels.library() is not None)
    assert (tmp_path / "decode.png").stat().st_size > 0


def test_multitask_bench_smoke(tmp_path) -> None:
    arms = "prad-pa,prad-pa-grpc,base,base-whole,lora-per-task,lora-mixed,peft-lora-mixed,base-loop"
    multitask.main(["--tasks", "2", "--requests", "4", "--prompt-len", "8", "--gen", "3", "--repeats", "1",
                    "--arms", arms, "--no-estimate", "--out", str(tmp_path), *_threads(),
                    "--peak-seconds", "0.02", "--peak-tokens", "16", "--peak-batches", "2"])
    out = json.loads((tmp_path / "multitask.json").read_text())
    assert {r["arm"] for r in out["results"]} == set(arms.split(","))
    assert all(r["total_s"] > 0 for r in out["results"])
    assert out["peak"]["best"]["float32"]["flops_per_s"] > 0
    assert all(r["flops"] > 0 and 0 < r["fraction_of_floor"] <= 1.5 for r in out["results"])  # a tiny probe
    assert all(0 < r["prefill_fraction_of_floor"] <= 1.5 for r in out["results"] if r["prefill_s"] is not None)
    checks = out["per_dtype"]["float32"]["checks"]
    agreements = {k: v for k, v in checks.items() if "==" in k}
    assert len(agreements) == 5 and all(v == 1.0 for v in agreements.values()), checks
    whole = next(r for r in out["results"] if r["arm"] == "base-whole")
    assert whole["prefill_s"] is None and whole["decode_s"] is None  # no first-token time without streaming
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


def test_prefill_bench_smoke(tmp_path) -> None:
    """Both strategies and the mixed row; 4 prompts of 8 tokens in sub-batches of 16 (two calls per run)."""
    prefill.main(["--prompts", "4", "--prompt-len", "8", "--tasks", "1,3", "--repeats", "1", "--warmup-rows", "1",
                  "--max-prefill-tokens", "16", "--dtypes", "float32", "--out", str(tmp_path), *_threads(),
                  "--peak-seconds", "0.02", "--peak-tokens", "16", "--peak-batches", "2"])
    out = json.loads((tmp_path / "prefill.json").read_text())
    assert [r["name"] for r in out["results"]] == ["base", "prad-pa x1", "prad-pa x3 gather", "prad-pa x3 segment",
                                                  "mixed x3 gather", "mixed x3 segment"]
    for r in out["results"]:
        assert r["tokens"] == 32 and r["calls"] == 2 and len(r["tokens_per_s_runs"]) == 1
        assert r["tokens_per_s"] > 0 and r["vs_base"] > 0 and r["vs_one_task"] > 0
        assert r["flops"] > 0 and 0 < r["fraction_of_floor"] <= 1.5  # a tiny probe: loose bounds
    assert out["settings"]["prompts"] == 4 and out["machine"]
    assert (tmp_path / "prefill.png").stat().st_size > 0


def test_transfer_bench_smoke(tmp_path) -> None:
    """The in-process stack and the gRPC pair only (three `prad serve` processes, one thread each; the
    Redis stack starts the same way, plus a redis-server); one 16-token request each, 2 tokens."""
    transfer.main(["--transports", "inproc,grpc", "--prompt-lengths", "16", "--requests", "1", "--gen", "2",
                   "--threads", "1", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "transfer.json").read_text())
    rows = {(r["transport"], r["kv_stream"]): r for r in out["results"]}
    assert set(rows) == {("inproc", None), ("grpc", True), ("grpc", False)}  # --kv-stream both: two prefills
    for r in rows.values():
        assert r["prompt_len"] == 16 and r["requests"] == 1 and len(r["ttft_ms_runs"]) == 1
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
        assert r["kv_bytes_per_token"] and r["kv_bytes_per_token"] > 0  # the counter moved: KV was handed over
    assert rows["inproc", None]["ttft_overhead"] is None and rows["grpc", True]["ttft_overhead"] is not None
    assert out["references_mb_per_s"]["loopback TCP"] > 0
    assert (tmp_path / "transfer.png").stat().st_size > 0


def test_http_load_smoke(server, smollm2, monkeypatch, capsys) -> None:
    """The load generator's main (a JSON job on stdin, a JSON result on stdout) against the in-process
    server: its greedy tokens == the server's own non-streamed answer."""
    work = multitask.build_workload(smollm2, 3, 8, 3, seed=0)
    tasks = ["base", "pa-task", "lora-task"]
    job = {"url": server, "gen": 3, "requests": [{"task": t, "prompt": text, "prompt_tokens": len(ids)}
                                                 for t, text, ids in zip(tasks, work.texts, work.prompt_ids,
                                                                         strict=True)]}
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(job)))
    http_load.main()
    out = json.loads(capsys.readouterr().out)
    assert 0 < out["prefill_s"] <= out["total_s"] and out["client_cpu_s"] >= 0
    expected = [_generate(server, t, text) for t, text in zip(tasks, work.texts, strict=True)]
    assert out["tokens"] == expected
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(job | {"stream": False})))
    http_load.main()
    whole = json.loads(capsys.readouterr().out)
    assert whole["tokens"] == expected and whole["prefill_s"] is None and whole["ttft_s"] is None
    assert 0 < max(whole["latency_s"]) <= whole["total_s"]
    job["requests"][0]["prompt_tokens"] += 1  # a run that is not the benchmark's must fail, naming the task
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(job)))
    with pytest.raises(RuntimeError, match=r"task base: .*; expected length, 3 tokens, 9 prompt tokens"):
        http_load.main()


def _generate(url: str, task: str, prompt: str) -> list[int]:
    body = {"task": task, "prompt": prompt, "max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True}
    r = httpx.post(url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["token_ids"]


def test_prefix_cache_bench_smoke(tmp_path) -> None:
    out = prefix_cache.main(["--tasks", "2", "--requests", "4", "--prefix-tokens", "48", "--gen", "2",
                             "--repeats", "1", "--out", str(tmp_path), *_threads(),
                             "--peak-seconds", "0.02", "--peak-tokens", "256", "--peak-batches", "2"])
    summary = out["summary"]
    assert out["peak"]["best"]["float32"]["flops_per_s"] > 0
    # a tiny probe (on the ~250-token prefill pass's shapes): loose bounds; with the cache on the cached
    # prefix's FLOPs are not done, so that arm's (effective) fraction may pass 1
    assert 0 < summary["cache-off"]["fraction_of_floor"] <= 1.5
    assert 0 < summary["cache-off"]["prefill_fraction_of_floor"] <= 1.5
    assert summary["cache-on"]["fraction_of_floor"] > 0 and summary["cache-on"]["prefill_fraction_of_floor"] > 0
    assert summary["tokens_identical"]  # the cache is exact: both arms answer alike
    assert summary["cache-on"]["prefill_tokens_per_s"] > 0 and summary["ttft_median_speedup"] > 0
    assert len(out["runs"]["cache-on"][0]["ttft_s"]) == 4
    assert (tmp_path / "prefix_cache.png").stat().st_size > 0
