"""The static-shape decode step (prad/static_decode.py) decodes the tokens of the other steps, its padding
writes only free rows, its CUDA graphs (prad/cuda_graphs.py; GPU tests, skipped without one) replay the
eager step, and the prepared GPU check (bench/gpu_check.sh) parses and passes valid flags to its commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from decode_service import runner as runner_module
from decode_service.engine import DecodeConfig
from decode_service.runner import DecodeRunner, choose_step_backend
from launcher.settings import ServeSettings
from prad.config import model_config_from_hf
from prad.cpu_decode import CpuStepBackend
from prad.decode_step import ReferenceStep, StepBackend
from prad.device_sampling import sample_batch_on_device, sample_tokens
from prad.model import Model
from prad.sampling import SamplingParams, sample_batch
from prad.static_decode import StaticStep, batch_buckets, bucket_for
from prad.weights import read_tensors, weights_from_tensors
from prefill_service.runner import ChunkInput, PrefillRunner
from tests.helpers import tiny_hf_model

REPO = Path(__file__).resolve().parents[2]
GPU_CHECK = REPO / "bench" / "gpu_check.sh"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PLAN = [(0, 7), (1, 9), (1, 4), (2, 6), (2, 11), (3, 5), (3, 10), (3, 3), (6, 24)]  # per request: arrives, steps


@dataclass
class Request:
    prompt: list[int]
    arrives: int  # the step before which it is admitted
    num_steps: int  # decode steps it takes (tokens after the prefill's first)


@dataclass
class Served:
    tokens: list[list[int]]  # per request: the prefill's token, then one per decode step
    batch_sizes: list[int]  # rows of every step
    capacities: list[int]  # cache capacity at every step
    logits: list[torch.Tensor]  # every step's logits (copied)


def prefill(model: Model, requests: list[Request]) -> list[tuple[torch.Tensor, int]]:
    """Each request's prompt KV and greedy first token, as the prefill service hands them over."""
    outputs = PrefillRunner(model).run([ChunkInput(r.prompt, 0, None, None) for r in requests])
    return [(out.kv, int(out.logits.argmax())) for out in outputs]


def serve(runner: DecodeRunner, requests: list[Request], prefilled: list[tuple[torch.Tensor, int]],
          follow: Served | None = None) -> Served:
    """Greedy decoding driven the way the decode engine drives its runner: an arriving request gets
    the cache grown for it and its KV inserted into the next free row; a finished one's row is taken
    by the last row (a KV move), so running rows stay dense in [0, n). With `follow`, each request is
    fed that run's tokens instead of its own argmax (to compare logits where near-ties could flip one)."""
    out = Served([[first] for _, first in prefilled], [], [], [])
    rows: list[int] = []  # request index per row
    step = 0
    while rows or any(r.arrives >= step for r in requests):
        for i, r in enumerate(requests):
            if r.arrives == step:
                runner.ensure_capacity(len(r.prompt) + r.num_steps + 1)
                runner.insert(len(rows), prefilled[i][0])
                rows.append(i)
        if rows:
            positions = [len(requests[i].prompt) + len(out.tokens[i]) - 1 for i in rows]
            logits = runner.decode([out.tokens[i][-1] for i in rows], positions)
            out.logits.append(logits.float().cpu().clone())
            out.batch_sizes.append(len(rows))
            out.capacities.append(runner.cache.capacity)
            for i, token in zip(rows, logits.argmax(dim=-1).tolist(), strict=True):
                out.tokens[i].append(token if follow is None else follow.tokens[i][len(out.tokens[i])])
            for i in [i for i in rows if len(out.tokens[i]) == requests[i].num_steps + 1]:
                row, last = rows.index(i), len(rows) - 1
                if row != last:
                    runner.move(last, row, len(requests[rows[last]].prompt) + len(out.tokens[rows[last]]))
                    rows[row] = rows[last]
                rows.pop()
        step += 1
    return out


def requests_for(tokenize) -> list[Request]:
    """Rows join and leave so that batches of 1, 3, 5 and 8 rows (and sizes between buckets) occur, and
    a longer request arriving mid-run grows the cache while other rows are live."""
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
             "1, 2, 3,", "The best way to learn a language is", "import numpy as np", "Dear Sir or Madam,",
             "Water boils at", "In the beginning of the twentieth century, the physicists of Europe discovered that"]
    return [Request(tokenize(text), arrives, steps) for text, (arrives, steps) in zip(texts, PLAN, strict=True)]


def runner_with(model: Model, backend: StepBackend | None, decode_graphs: str = "off") -> DecodeRunner:
    runner = DecodeRunner(model, max_batch_size=8, max_seq_len=256, decode_graphs=decode_graphs)
    if backend is not None:
        runner.backend = backend
    return runner


def test_the_static_step_decodes_the_tokens_of_the_reference_and_cpu_steps_on_smollm2(smollm2, monkeypatch) -> None:
    """fp32, the real model: rows at different positions, joining and leaving, across cache growth."""
    monkeypatch.setattr(runner_module, "CAPACITY_STEP", 16)  # grow often: 16 -> 32 -> 48 positions
    model = smollm2.model
    requests = requests_for(lambda text: smollm2.tokenizer(text).input_ids)
    prefilled = prefill(model, requests)
    static = serve(runner_with(model, None, "static"), requests, prefilled)
    assert {1, 3, 5, 8} <= set(static.batch_sizes) and {6, 7} & set(static.batch_sizes)
    grown_at = [i for i in range(1, len(static.capacities)) if static.capacities[i] > static.capacities[i - 1]]
    assert len(grown_at) >= 2 and all(static.batch_sizes[i - 1] > 1 for i in grown_at)  # grew under live rows
    assert serve(runner_with(model, ReferenceStep(model)), requests, prefilled).tokens == static.tokens
    assert serve(runner_with(model, CpuStepBackend(model)), requests, prefilled).tokens == static.tokens


def _tiny_model(tmp_path: Path, family: str = "llama", device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> Model:
    path = tiny_hf_model(family, tmp_path, vocab_size=512)
    config = model_config_from_hf(json.loads((path / "config.json").read_text()))
    return Model(config, weights_from_tensors(config, read_tensors(path)).to(torch.device(device), dtype))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_the_static_step_computes_the_reference_logits(family: str, tmp_path) -> None:
    model = _tiny_model(tmp_path, family)
    kv = model.new_kv_cache(8, 32)
    kv.k.normal_(generator=torch.Generator().manual_seed(0))
    kv.v.normal_(generator=torch.Generator().manual_seed(1))
    reference_kv = type(kv)(kv.k.clone(), kv.v.clone())
    ids, positions = torch.tensor([5, 7, 9]), torch.tensor([3, 30, 0])
    expected = ReferenceStep(model).step(ids, positions, reference_kv.rows(3))
    got = StaticStep(model, 8).step(ids, positions, kv)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(kv.k[:, :3], reference_kv.k[:, :3], atol=1e-6)


def test_padding_rows_write_only_position_0_of_free_rows(tmp_path) -> None:
    model = _tiny_model(tmp_path)
    kv = model.new_kv_cache(8, 32)
    kv.k.normal_(generator=torch.Generator().manual_seed(0))
    before = kv.k.clone()
    StaticStep(model, 8).step(torch.tensor([5, 7, 9]), torch.tensor([3, 30, 12]), kv)  # bucket 4
    changed = (kv.k != before).any(dim=(0, 2, 4))  # [rows, positions]
    expected = torch.zeros_like(changed)
    for row, position in ((0, 3), (1, 30), (2, 12), (3, 0)):  # row 3: the padding row
        expected[row, position] = True
    assert torch.equal(changed, expected)


def test_buckets_are_powers_of_two_up_to_the_rows_there_are() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1) == [1]
    assert [bucket_for(n, 48) for n in (1, 2, 3, 5, 8, 9, 33, 48)] == [1, 2, 4, 8, 8, 16, 48, 48]
    with pytest.raises(ValueError, match="rows"):
        bucket_for(9, 8)


def test_decode_graphs_picks_the_step(tmp_path) -> None:
    model = _tiny_model(tmp_path)
    assert isinstance(choose_step_backend(model), CpuStepBackend)  # auto on a CPU
    assert isinstance(choose_step_backend(model, "off"), CpuStepBackend)
    static = choose_step_backend(model, "static", 8)
    assert isinstance(static, StaticStep) and static.graphs is None and static.name == "static"
    with pytest.raises(ValueError, match="decode_graphs 'on'"):
        choose_step_backend(model, "on")
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        StaticStep(model, 8, use_graphs=True)
    runner = DecodeRunner(model, 4, 64, decode_graphs="static")
    assert isinstance(runner.backend, StaticStep) and runner.graph_stats() is None
    with pytest.raises(ValueError, match="exceeds KV capacity"):
        runner.decode([1], [0])  # the cache has no positions yet
    assert DecodeConfig().decode_graphs == "auto" and ServeSettings().decode_graphs == "auto"
    assert ServeSettings(decode_graphs="static").decode_graphs == "static"


class _NoCuda:
    def __getattr__(self, name: str):
        raise AssertionError(f"the CPU path used torch.cuda.{name}")


def test_the_cpu_path_never_touches_torch_cuda(tmp_path, monkeypatch) -> None:
    model = _tiny_model(tmp_path)
    monkeypatch.setattr(torch, "cuda", _NoCuda())
    runner = DecodeRunner(model, 4, 64, decode_graphs="static")
    runner.ensure_capacity(16)
    tokens = sample_tokens(runner.decode([1, 2, 3], [4, 5, 6]), [SamplingParams(temperature=0.8, seed=1)] * 3, [1] * 3)
    assert tokens.shape == (3,)


def test_gpu_check_parses_and_its_commands_accept_their_flags(tmp_path) -> None:
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    _write_fake_results(tmp_path)
    env = os.environ | {"PYTHON": sys.executable, "PRAD_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for module in ("bench.random_model", "bench.decode", "bench.multitask"):
        assert f"flags ok: {module}" in done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["goals"]["server-path ratio base / base-loop <= 1.25"] == pytest.approx(1.5)
    assert summary["decode"]["64"]["graphs_ms"] == pytest.approx(2.0)
    assert (tmp_path / "summary.png").exists()


def _write_fake_results(out: Path) -> None:
    """Benchmark JSON with only the fields the summary reads (numbers made up for the test)."""
    for name, ms in (("decode_graphs", 2.0), ("decode_static", 15.0)):
        (out / name).mkdir()
        results = [{"batch": b, "tokens_per_s": {"base": 1000.0 * b / ms, "forward": 1000.0 * b / 19.0},
                    "step_over_forward": 19.0 / ms} for b in (1, 64)]
        (out / name / "decode.json").write_text(json.dumps({"results": results, "decode_step": {}}))
    (out / "multitask").mkdir()
    arms = [{"arm": arm, "total_s": total, "prefill_s": 0.1, "decode_s": total - 0.1}
            for arm, total in (("prad-pa", 3.0), ("base", 3.0), ("base-loop", 2.0), ("lora-mixed", 4.5))]
    (out / "multitask" / "multitask.json").write_text(json.dumps({"results": arms}))


def test_the_random_model_loads_and_its_words_round_trip(tmp_path) -> None:
    """bench/random_model.py (the GPU check's stand-in for the checkpoint), in a tiny shape."""
    from bench.multitask import build_workload
    from bench.random_model import write_random_model
    from prad.loading import load_model

    path = write_random_model(tmp_path / "model", num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000)
    loaded = load_model(str(path), "cpu", "float32")
    assert loaded.config.vocab_size == 1000 and loaded.config.eos_token_ids == (2,)
    work = build_workload(loaded, requests=2, prompt_len=8, gen=2, seed=0)  # checks the round trip itself
    assert len(work.prompt_ids[0]) == 8
    assert loaded.tokenizer.decode(list(range(3, 1000))).count(" ") == 997


# --- on a GPU (skipped without one): the next GPU session runs these -------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_graph_replay_equals_the_eager_static_step_in_bf16(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(runner_module, "CAPACITY_STEP", 16)
    model = _tiny_model(tmp_path, device="cuda", dtype=torch.bfloat16)
    graphs_runner = runner_with(model, None, "auto")
    stats = graphs_runner.graph_stats()
    assert stats is not None and stats.buckets == (1, 2, 4, 8) and stats.num_captures == 4 and stats.capture_s > 0
    gen = torch.Generator().manual_seed(0)
    requests = [Request(torch.randint(3, 512, (length,), generator=gen).tolist(), arrives, steps)
                for length, (arrives, steps) in zip((5, 9, 3, 12, 7, 4, 10, 6, 14), PLAN, strict=True)]
    prefilled = prefill(model, requests)
    eager = serve(runner_with(model, None, "static"), requests, prefilled)
    replayed = serve(graphs_runner, requests, prefilled, follow=eager)
    assert replayed.batch_sizes == eager.batch_sizes and replayed.capacities == eager.capacities
    for got, expected in zip(replayed.logits, eager.logits, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)
    after = graphs_runner.graph_stats()
    assert after is not None and after.num_captures > 4  # the grown cache was captured again


@pytest.mark.gpu
@needs_cuda
def test_a_replayed_step_and_the_device_sampler_never_wait_for_the_gpu(tmp_path) -> None:
    model = _tiny_model(tmp_path, device="cuda", dtype=torch.bfloat16)
    runner = runner_with(model, None, "auto")
    ids, positions = torch.tensor([5, 7, 9], device="cuda"), torch.tensor([3, 10, 0], device="cuda")
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=1.0, top_p=0.9)]
    sample_tokens(runner.backend.step(ids, positions, runner.cache), params, [1, 2, 3])  # warm-up, untimed
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample_tokens(runner.backend.step(ids, positions, runner.cache), params, [1, 2, 3])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (3,)


@pytest.mark.gpu
@needs_cuda
def test_the_device_sampler_draws_sample_batchs_tokens_on_cuda() -> None:
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)).mul(3).cuda()
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=3), SamplingParams(temperature=1.0, top_k=9),
              SamplingParams(temperature=1.3, top_p=0.9, seed=5), SamplingParams(temperature=50.0, top_p=0.99),
              SamplingParams(temperature=0.9, top_k=40, top_p=0.5, seed=8)]
    for step in range(5):
        indices = [step * 6 + i for i in range(6)]
        assert sample_batch_on_device(logits, params, indices) == sample_batch(logits, params, indices)
