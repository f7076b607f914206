"""The native decode attention (prad/kernels) against a plain PyTorch reference, and its build."""

from __future__ import annotations

import ctypes
import logging
import math
import os
import platform
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from prad import kernels
from prad.model import apply_rope, rms_norm


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """library() and supports() recomputed from scratch, building into an empty cache dir."""
    monkeypatch.setenv("PRAD_CACHE_DIR", str(tmp_path))
    for cached in (kernels.library, kernels.supports, kernels.supports_linear):
        cached.cache_clear()
    yield tmp_path
    for cached in (kernels.library, kernels.supports, kernels.supports_linear):
        cached.cache_clear()


@pytest.fixture
def lib():
    if kernels.compiler() is None:
        pytest.skip("no C++ compiler")
    built = kernels.library()
    assert built is not None, "a C++ compiler is present, so the kernel must build"
    return built


def _rope_tables(max_positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    emb = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq).repeat(1, 2)
    return emb.cos().float(), emb.sin().float()


def _reference(q, k_new, v_new, k_cache, v_cache, positions, rope):
    """RoPE in fp32 rounded to the dtype (as the model does), KV write, attention in fp64."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[1]
    for b, pos in enumerate(positions.tolist()):
        qb, kb = q[b], k_new[b]
        if rope is not None:
            cos, sin = rope[0][pos], rope[1][pos]
            qb, kb = apply_rope(qb, (cos, sin)), apply_rope(kb, (cos, sin))
        k_cache[b, :, pos], v_cache[b, :, pos] = kb, v_new[b]
        keys = k_cache[b, :, :pos + 1].double().repeat_interleave(group, dim=0)  # [H, S, D]
        values = v_cache[b, :, :pos + 1].double().repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hsd->hs", qb.double(), keys) / math.sqrt(q.shape[-1])
        out[b] = torch.einsum("hs,hsd->hd", scores.softmax(-1), values).to(q.dtype)
    return out, k_cache, v_cache


CASES = [  # (num_heads, num_kv_heads, head_dim, rope)
    (9, 3, 64, True),  # SmolLM2
    (4, 2, 16, True),  # the tests' tiny Llama
    (4, 4, 32, False),  # GPT-2 style: no RoPE, no GQA
    (8, 1, 128, True),  # multi-query, head_dim 128
]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "rope"), CASES)
def test_decode_attention_matches_reference(lib, dtype, tol, num_heads, num_kv_heads, head_dim, rope) -> None:
    gen = torch.Generator().manual_seed(head_dim + num_heads)
    positions = torch.tensor([0, 5, 130, 300, 1])  # one key, short rows, and rows over several key blocks
    rows, capacity, bsz = 6, 320, len(positions)  # more cache rows than batch rows: row 5 stays untouched
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)
    # q, k, v as the decode step passes them: feature-major [heads, D, B] viewed as [B, heads, D]
    q = randn(num_heads, head_dim, bsz).permute(2, 0, 1)
    kv_new = randn(2 * num_kv_heads, head_dim, bsz).permute(2, 0, 1)
    k_new, v_new = kv_new[:, :num_kv_heads], kv_new[:, num_kv_heads:]
    k_cache, v_cache = randn(rows, num_kv_heads, capacity, head_dim), randn(rows, num_kv_heads, capacity, head_dim)
    tables = _rope_tables(capacity, head_dim) if rope else None
    ref_out, ref_k, ref_v = _reference(q, k_new, v_new, k_cache, v_cache, positions, tables)
    out = torch.empty(num_heads, head_dim, bsz, dtype=dtype).permute(2, 0, 1)  # strided, as in the step
    kernels.decode_attention(q, k_new, v_new, k_cache, v_cache, positions, tables, 1 / math.sqrt(head_dim), out,
                             threads=2)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)  # the new K/V landed exactly, only there
    err = (out.float() - ref_out.float()).abs().max()
    assert err <= tol * max(1.0, ref_out.float().abs().max()), err


def _attention_call(seed: int) -> Callable[[int], torch.Tensor]:
    """A bf16 SmolLM2-shaped decode attention over 32 rows; the returned call(threads) runs it on
    fresh copies of its inputs and returns the output."""
    gen = torch.Generator().manual_seed(seed)
    bsz, heads, kv_heads, dim, capacity = 32, 9, 3, 64, 160
    q = torch.randn(bsz, heads, dim, generator=gen).bfloat16()
    kv_new = torch.randn(bsz, 2 * kv_heads, dim, generator=gen).bfloat16()
    cache = torch.randn(2, bsz, kv_heads, capacity, dim, generator=gen).bfloat16()
    positions = torch.randint(0, capacity, (bsz,), generator=gen)
    tables = _rope_tables(capacity, dim)

    def call(threads: int) -> torch.Tensor:
        k_cache, v_cache, out = cache[0].clone(), cache[1].clone(), torch.empty_like(q)
        kernels.decode_attention(q, kv_new[:, :kv_heads], kv_new[:, kv_heads:], k_cache, v_cache, positions, tables,
                                 0.125, out, threads)
        return out

    return call


def test_the_thread_pool_gives_the_same_results_to_concurrent_callers(lib) -> None:
    """Each work item runs on one thread, so the output is the same on 1 or 2 threads; callers on four
    Python threads at once (one job at a time runs on the pool, the others alone) all get it too."""
    calls = [_attention_call(seed) for seed in range(4)]
    expected = [call(1) for call in calls]
    assert all(torch.equal(call(2), want) for call, want in zip(calls, expected, strict=True))

    def hammer(i: int) -> bool:
        return all(torch.equal(calls[i](2), expected[i]) for _ in range(25))

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(hammer, range(4)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_gets_a_working_thread_pool(lib) -> None:
    """The parent's pool workers do not exist in a forked child: its kernel calls must neither wait for
    them (a job offered to a worker that never takes it is withdrawn) nor compute anything else."""
    call = _attention_call(7)
    expected = call(2)  # the parent's pool is running now
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only an exit status
        try:
            torch.set_num_threads(1)  # torch's own OpenMP team does not survive fork() either
            os._exit(0 if torch.equal(call(2), expected) else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's kernel call hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_decode_attention_refuses_a_position_past_the_cache_and_writes_nothing(lib) -> None:
    k_cache, v_cache = torch.zeros(2, 1, 8, 16), torch.zeros(2, 1, 8, 16)
    q, kv = torch.ones(2, 2, 16), torch.ones(2, 1, 16)
    with pytest.raises(ValueError, match="position 8 exceeds KV capacity 8"):
        kernels.decode_attention(q, kv, kv, k_cache, v_cache, torch.tensor([3, 8]), None, 0.25, q.clone(), 1)
    assert not k_cache.any() and not v_cache.any()
    with pytest.raises(TypeError, match="must share one dtype"):
        kernels.decode_attention(q, kv, kv, k_cache.double(), v_cache.double(), torch.tensor([3, 4]), None, 0.25,
                                 q.clone(), 1)


def test_supports_names_the_shapes_the_kernel_is_built_for(lib) -> None:
    cpu = torch.device("cpu")
    assert kernels.supports(torch.bfloat16, cpu, 64, 3) and kernels.supports(torch.float32, cpu, 128, 8)
    assert not kernels.supports(torch.float32, cpu, 80, 1)  # head_dim 80: PyTorch path
    assert not kernels.supports(torch.float32, cpu, 64, 12)  # 12 query heads per KV head
    assert not kernels.supports(torch.float16, cpu, 64, 1)


def test_library_is_built_once_and_cached(fresh_build, lib) -> None:
    built = list((fresh_build / "kernels").glob("prad_kernels-*.so"))
    assert len(built) == 1
    kernels.library.cache_clear()
    mtime = built[0].stat().st_mtime_ns
    assert kernels.library() is not None and built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_without_a_working_compiler_the_step_falls_back_to_pytorch(fresh_build, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CXX", "false")  # on PATH, fails
    with caplog.at_level(logging.WARNING, logger="prad.kernels"):
        assert kernels.library() is None
    assert "could not build the native kernels" in caplog.text
    assert not kernels.supports(torch.float32, torch.device("cpu"), 64, 3)


def test_the_environment_switch_turns_the_kernel_off(fresh_build, monkeypatch) -> None:
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    assert kernels.library() is None
    assert not list(fresh_build.glob("kernels/*.so"))


def test_build_key_follows_source_compiler_and_cpu() -> None:
    base = kernels.build_key(b"src", "g++ 12", "avx2")
    assert base == kernels.build_key(b"src", "g++ 12", "avx2")
    assert len({base, kernels.build_key(b"src2", "g++ 12", "avx2"), kernels.build_key(b"src", "g++ 13", "avx2"),
                kernels.build_key(b"src", "g++ 12", "avx2 avx512f")}) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, 17, 64])  # one column (scalar tail only), vectors + tail, vectors only
def test_add_rms_norm_matches_the_pytorch_ops(lib, dtype, cols) -> None:
    gen = torch.Generator().manual_seed(cols)
    h = (3 * torch.randn(576, cols, generator=gen)).to(dtype)
    y = torch.randn(576, cols, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(576, generator=gen)).to(dtype)
    expected_h = h + y
    expected = rms_norm(expected_h, weight[:, None], 1e-5, dim=0)
    got = kernels.add_rms_norm(h, y, weight, 1e-5)
    assert torch.equal(h, expected_h)  # the residual add happened in place, rounded as torch rounds
    _assert_within_one_rounding(got, expected)
    _assert_within_one_rounding(kernels.add_rms_norm(h, None, weight, 1e-5), expected)  # no add: norm only
    assert torch.equal(h, expected_h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, 17, 64])
def test_silu_mul_matches_the_pytorch_ops(lib, dtype, cols) -> None:
    gen = torch.Generator().manual_seed(cols)
    gate_up = (4 * torch.randn(2 * 1536, cols, generator=gen)).to(dtype)
    gate, up = gate_up.chunk(2, dim=0)
    _assert_within_one_rounding(kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_keeps_the_special_values_of_the_pytorch_ops(lib, dtype) -> None:
    """Lane selection (sign, underflow, NaN) holds at every lane of a vector and in the scalar tail."""
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -87.5, -100.0, 88.0, -1e-30])
    gate = special.repeat(4)[:33]  # 2 vectors of 16 + a tail
    gate_up = torch.cat([gate, torch.linspace(-3, 3, 33)]).to(dtype)[:, None].repeat(1, 17)  # [2 * 33, 17]
    g, u = gate_up.chunk(2, dim=0)
    expected = torch.nn.functional.silu(g) * u
    got = kernels.silu_mul(gate_up)
    assert torch.equal(got.isnan(), expected.isnan())
    infinite = expected.isinf()
    assert torch.equal(got[infinite], expected[infinite])
    finite = expected.isfinite()
    _assert_within_one_rounding(got[finite], expected[finite])


def test_elementwise_kernels_refuse_mismatched_operands(lib) -> None:
    h = torch.zeros(8, 4)
    with pytest.raises(ValueError, match="shaped like h"):
        kernels.add_rms_norm(h, torch.zeros(8, 5), torch.ones(8), 1e-5)
    with pytest.raises(TypeError, match="share the activations' dtype"):
        kernels.add_rms_norm(h, None, torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="contiguous 2-D"):
        kernels.silu_mul(torch.zeros(8, 4).t())
    with pytest.raises(ValueError, match="odd number of rows"):
        kernels.silu_mul(torch.zeros(7, 4))


@pytest.mark.parametrize(("out_features", "in_features"), [(1728, 576), (7, 13), (49, 40), (1, 1)])
@pytest.mark.parametrize("cols", [1, 3, 8, 11, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_narrow_f32_is_addmm_up_to_the_order_of_sums(lib, out_features, in_features, cols,
                                                             with_bias) -> None:
    """Row blocks and a remainder, vector steps and a scalar tail of K, one or two groups of up to 8 columns,
    both output layouts."""
    gen = torch.Generator().manual_seed(out_features + in_features + cols)
    weight = torch.randn(out_features, in_features, generator=gen)
    x = torch.randn(in_features, cols, generator=gen)
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    expected = torch.mm(weight, x) if bias is None else torch.addmm(bias[:, None], weight, x)
    bound = 4 * in_features * torch.finfo(torch.float32).eps * (weight.abs() @ x.abs()) + 1e-6
    for threads in (1, 2):
        got = kernels.linear_narrow_f32(weight, x, bias, threads)
        assert got.shape == (out_features, cols) and ((got - expected).abs() <= bound).all()
        flipped = kernels.linear_narrow_f32(weight, x, bias, threads, transposed=True)
        assert flipped.is_contiguous() and torch.equal(flipped, got.t())


def test_linear_narrow_f32_gives_a_column_what_it_gets_alone(lib) -> None:
    """Each output is one sum in a fixed order: a row of a batch equals itself alone, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(101, 75, generator=gen), torch.randn(101, generator=gen)
    x = torch.randn(75, kernels.NARROW_COLUMNS, generator=gen)
    together = kernels.linear_narrow_f32(weight, x, bias, 2)
    for cols in range(1, kernels.NARROW_COLUMNS + 1):
        assert torch.equal(kernels.linear_narrow_f32(weight, x[:, :cols].contiguous(), bias, 2), together[:, :cols])


def test_linear_narrow_f32_refuses_what_it_cannot_multiply(lib) -> None:
    weight = torch.zeros(8, 4)
    with pytest.raises(ValueError, match="do not chain"):
        kernels.linear_narrow_f32(weight, torch.zeros(5, 1), None, 1)
    with pytest.raises(ValueError, match="columns"):
        kernels.linear_narrow_f32(weight, torch.zeros(4, kernels.NARROW_COLUMNS + 1), None, 1)
    with pytest.raises(ValueError, match="fp32"):
        kernels.linear_narrow_f32(weight.bfloat16(), torch.zeros(4, 1), None, 1)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.linear_narrow_f32(torch.zeros(4, 8).t(), torch.zeros(4, 1), None, 1)
    with pytest.raises(ValueError, match="bias"):
        kernels.linear_narrow_f32(weight, torch.zeros(4, 1), torch.zeros(7), 1)


@pytest.fixture
def linear_lib(lib):
    if not kernels.supports_linear(torch.bfloat16, torch.device("cpu")):
        pytest.skip("this CPU has no AVX512-BF16: the bf16 projections stay on torch.mm")
    return lib


LINEAR_SHAPES = [  # (out, in, columns)
    (960, 576, 64),  # SmolLM2's q|k|v at batch 64
    (13, 577, 16),  # out not a multiple of the 6-row tile, odd in (a zero-padded last pair)
    (7, 33, 80),  # one 64-column tile and a 16-column one
    (30, 1536, 128),  # two full column tiles, SmolLM2's down projection width
]


@pytest.mark.parametrize(("out_features", "in_features", "cols"), LINEAR_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_bf16_is_the_exact_product_rounded_once(linear_lib, out_features, in_features, cols,
                                                       with_bias) -> None:
    gen = torch.Generator().manual_seed(out_features + cols)
    w = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    x = torch.randn(in_features, cols, generator=gen).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=gen).to(torch.bfloat16) if with_bias else None
    exact = w.double() @ x.double() + (0 if bias is None else bias.double()[:, None])
    got = kernels.linear_bf16(w, x, bias, threads=2)
    assert got.dtype == torch.bfloat16 and got.shape == (out_features, cols)
    # one bf16 rounding (half an ulp, 2^-8 relative) of an fp32 sum (its error ~ in * 2^-24 * sum |terms|)
    magnitude = w.double().abs() @ x.double().abs()
    assert ((got.double() - exact).abs() <= exact.abs() * 2.0**-8 + magnitude * 1e-6).all()
    # and what torch.mm / addmm (oneDNN) gives, up to that same rounding
    ref = torch.mm(w, x) if bias is None else torch.addmm(bias[:, None], w, x)
    assert ((got.double() - ref.double()).abs() <= ref.double().abs() * 2.0**-7 + magnitude * 1e-6).all()


@pytest.mark.parametrize(("out_features", "in_features", "cols"), LINEAR_SHAPES)
def test_lm_head_bf16_is_the_projection_transposed(linear_lib, out_features, in_features, cols) -> None:
    gen = torch.Generator().manual_seed(cols)
    w = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    x = torch.randn(in_features, cols, generator=gen).to(torch.bfloat16)
    rows = cols - 5  # padding columns are computed but never written
    logits = kernels.lm_head_bf16(w, x, rows, threads=2)
    assert logits.dtype == torch.float32 and logits.shape == (rows, out_features)
    assert torch.equal(logits, kernels.linear_bf16(w, x, None, threads=2)[:, :rows].t().float())


def test_linear_bf16_refuses_what_it_cannot_multiply(linear_lib) -> None:
    w, x = torch.zeros(8, 32, dtype=torch.bfloat16), torch.zeros(32, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not a positive multiple of 16"):
        kernels.linear_bf16(w, torch.zeros(32, 8, dtype=torch.bfloat16), None, 1)
    with pytest.raises(ValueError, match="do not chain"):
        kernels.linear_bf16(w, torch.zeros(31, 16, dtype=torch.bfloat16), None, 1)
    with pytest.raises(ValueError, match="contiguous 2-D bf16"):
        kernels.linear_bf16(w.float(), x, None, 1)
    with pytest.raises(ValueError, match="contiguous 2-D bf16"):
        kernels.linear_bf16(torch.zeros(32, 8, dtype=torch.bfloat16).t(), x, None, 1)
    with pytest.raises(ValueError, match="bias"):
        kernels.linear_bf16(w, x, torch.zeros(7, dtype=torch.bfloat16), 1)
    with pytest.raises(ValueError, match="rows 17 outside"):
        kernels.lm_head_bf16(w, x, 17, 1)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 target flags")
def test_without_avx512_bf16_the_projection_kernel_says_unsupported(lib, tmp_path) -> None:
    """linear_bf16.cpp built for a CPU without AVX512-BF16 (what -march=native gives on AVX2 machines)
    compiles to entry points that say "unsupported", so the step keeps torch.mm there."""
    source = next(p for p in kernels.SOURCES if p.name == "linear_bf16.cpp")
    out = tmp_path / "linear_no_bf16.so"
    flags = [f for f in kernels.CFLAGS if not f.startswith("-march")] + ["-march=x86-64-v2"]
    subprocess.run([kernels.compiler(), *flags, "-o", str(out), str(source)], check=True, timeout=120)
    built = ctypes.CDLL(str(out))
    assert built.prad_linear_bf16_supported() == 0
    assert built.prad_linear_bf16(None, 1, 1, None, 16, 16, None, None, 16, 1) == -2


def _assert_within_one_rounding(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to one rounding step of the dtype (the kernels sum and take exp in another order)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    eps = torch.finfo(got.dtype).eps
    err = (got.float() - expected.float()).abs()
    assert (err <= 2 * eps * expected.float().abs() + 1e-6).all(), err.max()
