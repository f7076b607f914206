"""Native CPU kernels: C++ sources compiled on first use with the host's compiler, cached by hash.

The decode step uses them on the CPU in fp32 and bf16 (docs/design.md gives the measurements):
decode attention (decode_attention.cpp) in place of RoPE + `KVCache.update` + SDPA, the fused
residual add + RMSNorm and SiLU(gate) * up (elementwise.cpp) in place of 6-8 small PyTorch ops
each, in bf16 on CPUs with AVX512-BF16, the projections and the LM head (linear_bf16.cpp) in
place of torch.mm, and in fp32 the projections and LM head of steps of up to 16 rows
(linear_narrow_f32.cpp), which torch.mm runs on one thread or pads. One library holds them all. It
is built with `-march=native`, so the cached library is keyed by the sources, the flags, the compiler
and the CPU's feature flags; a machine without a C++ compiler, or with `PRAD_NATIVE_KERNELS=0`, runs
the PyTorch path instead (logged once), with the same results up to floating-point rounding.

The kernels do not use OpenMP: their parallel loops run on the library's own small thread pool
(pool.h), whose workers spin briefly between jobs instead of sleeping at once as OpenMP's do under
`OMP_WAIT_POLICY=PASSIVE`, so the ~150 parallel loops of a decode step do not each pay a thread
wake-up. `PRAD_KERNEL_SPIN_US` sets how long a worker spins before it sleeps (default 200 us).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from prad.machine import cpuinfo

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("decode_attention.cpp", "elementwise.cpp", "linear_bf16.cpp", "linear_narrow_f32.cpp"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("simd.h", "pool.h"))
# 512-bit vectors where the CPU has them (GCC prefers 256 on some Intel parts; with AVX-512 the kernels'
# vectors and register blocking are 16 floats wide, simd.h); the flag exists on x86 only.
_X86_FLAGS = ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()
CFLAGS = ("-O3", "-march=native", *_X86_FLAGS, "-pthread", "-fPIC", "-shared")
DISABLE_ENV = "PRAD_NATIVE_KERNELS"  # "0" turns the native kernels off
COMPILE_TIMEOUT_S = 120
LINEAR_COLUMN_MULTIPLE = 16  # linear_bf16.cpp's vector width in activation columns
NARROW_COLUMNS = 16  # linear_narrow_f32.cpp's MAX_COLUMNS: the most columns it takes (it refuses more)
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_ENTRY = {dtype: f"prad_decode_attention_{suffix}" for dtype, suffix in _SUFFIX.items()}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = ([_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64,
              _PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, ctypes.c_float, _PTR, _I64, _I64, _I64, ctypes.c_int])


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else c++ or g++ on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return name
    return None


def cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for): x86's "flags", Arm's "Features"."""
    fields = cpuinfo()
    if not fields:
        return platform.processor()
    return fields.get("flags", fields.get("Features", ""))


def build_key(source: bytes, cc_version: str, flags: str) -> str:
    """What the cached library depends on, hashed: source, compiler flags, compiler and CPU."""
    digest = hashlib.sha256()
    for part in (source, " ".join(CFLAGS).encode(), cc_version.encode(), flags.encode(),
                 platform.machine().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build(cc: str, sources: tuple[Path, ...], out: Path) -> None:
    """Compile `sources` into the shared library `out` (atomically: concurrent builders are safe)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *CFLAGS, "-o", tmp, *map(str, sources)], check=True, capture_output=True,
                       text=True, timeout=COMPILE_TIMEOUT_S)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _cache_dir() -> Path:
    from prad.loading import cache_root

    return cache_root() / "kernels"


def library_file(cc: str) -> Path:
    """Where the library built by `cc` for this CPU is cached."""
    version = subprocess.run([cc, "--version"], check=True, capture_output=True, text=True, timeout=30).stdout
    source = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    return _cache_dir() / f"prad_kernels-{build_key(source, version, cpu_flags())}.so"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels library, built on first use; None where it cannot be (logged)."""
    if not enabled():
        log.info("native kernels off (%s=0): the decode step runs on PyTorch ops", DISABLE_ENV)
        return None
    cc = compiler()
    if cc is None:
        log.warning("no C++ compiler found ($CXX, c++, g++): the decode step runs on PyTorch ops (slower)")
        return None
    try:
        out = library_file(cc)
        if not out.exists():
            log.info("compiling %s -> %s (once per machine)", ", ".join(p.name for p in SOURCES), out)
            build(cc, SOURCES, out)
        lib = ctypes.CDLL(str(out))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        log.warning("could not build the native kernels (%s): the decode step runs on PyTorch ops", detail)
        return None
    for name in _ENTRY.values():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    lib.prad_decode_attention_supports.argtypes = [_I64, _I64]
    lib.prad_decode_attention_supports.restype = ctypes.c_int
    for suffix in _SUFFIX.values():
        norm, silu = getattr(lib, f"prad_add_rms_norm_{suffix}"), getattr(lib, f"prad_silu_mul_{suffix}")
        norm.argtypes, norm.restype = [_PTR, _PTR, _PTR, ctypes.c_float, _I64, _I64, _I64, _PTR, _I64], None
        silu.argtypes, silu.restype = [_PTR, _I64, _I64, _I64, _PTR, _I64], None
    lib.prad_linear_bf16_supported.argtypes, lib.prad_linear_bf16_supported.restype = [], ctypes.c_int
    lib.prad_linear_bf16.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, ctypes.c_int]
    lib.prad_linear_bf16_t_f32.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _I64, ctypes.c_int]
    lib.prad_linear_bf16.restype = lib.prad_linear_bf16_t_f32.restype = ctypes.c_int
    lib.prad_linear_narrow_f32.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, ctypes.c_int]
    lib.prad_linear_narrow_f32.restype = ctypes.c_int
    return lib


@functools.cache
def supports(dtype: torch.dtype, device: torch.device, head_dim: int, group: int) -> bool:
    """Whether `decode_attention` runs on this device for this dtype, head_dim and number of query
    heads per KV head (the kernel is specialised for head_dim 16/32/64/128, groups 1-8)."""
    if device.type != "cpu" or dtype not in _ENTRY:
        return False
    lib = library()
    return lib is not None and bool(lib.prad_decode_attention_supports(head_dim, group))


def supports_elementwise(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `add_rms_norm` and `silu_mul` run for this dtype on this device."""
    return device.type == "cpu" and dtype in _SUFFIX and library() is not None


@functools.cache
def supports_linear(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `linear_bf16` / `lm_head_bf16` run here: bf16 on a CPU with AVX512-BF16."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    lib = library()
    return lib is not None and bool(lib.prad_linear_bf16_supported())


def linear_columns_ok(x: torch.Tensor) -> bool:
    """Whether the native projections take x [in, P]: P a multiple of 16 (the step's padded columns)."""
    return x.dim() == 2 and x.shape[1] > 0 and x.shape[1] % LINEAR_COLUMN_MULTIPLE == 0


def linear_bf16(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, threads: int) -> torch.Tensor:
    """weight [out, in] @ x [in, P] (+ bias [out]) -> [out, P] bf16: `torch.addmm(bias[:, None], weight, x)`
    up to the order of the fp32 sums. weight, x contiguous bf16; P a multiple of 16."""
    lib = _linear_library(weight, x)
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype
                             or not bias.is_contiguous()):
        raise ValueError(f"linear_bf16: bias {tuple(bias.shape)} must be a contiguous bf16 [{weight.shape[0]}]")
    out = x.new_empty(weight.shape[0], x.shape[1])
    status = lib.prad_linear_bf16(weight.data_ptr(), weight.shape[0], weight.shape[1], x.data_ptr(), x.shape[1],
                                  x.shape[1], None if bias is None else bias.data_ptr(), out.data_ptr(),
                                  out.shape[1], threads)
    assert status == 0, f"prad_linear_bf16 returned {status}"
    return out


def lm_head_bf16(weight: torch.Tensor, x: torch.Tensor, rows: int, threads: int) -> torch.Tensor:
    """Token-major fp32 logits [rows, vocab] of the first `rows` columns of weight [vocab, d] @ x [d, P],
    each rounded to bf16 (what `torch.mm(x[:, :rows].t(), weight.t()).float()` gives, up to sum order)."""
    lib = _linear_library(weight, x)
    if not 0 < rows <= x.shape[1]:
        raise ValueError(f"lm_head_bf16: rows {rows} outside (0, {x.shape[1]}]")
    out = torch.empty(rows, weight.shape[0], dtype=torch.float32, device=x.device)
    status = lib.prad_linear_bf16_t_f32(weight.data_ptr(), weight.shape[0], weight.shape[1], x.data_ptr(),
                                        x.shape[1], x.shape[1], rows, out.data_ptr(), out.shape[1], threads)
    assert status == 0, f"prad_linear_bf16_t_f32 returned {status}"
    return out


def supports_narrow_linear(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `linear_narrow_f32` runs for this dtype on this device (fp32 on any CPU the kernels build for)."""
    return device.type == "cpu" and dtype == torch.float32 and library() is not None


def linear_narrow_f32(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, threads: int,
                      transposed: bool = False) -> torch.Tensor:
    """weight [out, in] @ x [in, n] (+ bias [out]) for n <= NARROW_COLUMNS, on the kernels' pool: [out, n],
    or with `transposed` its transpose [n, out] (contiguous). `torch.addmm(bias[:, None], weight, x)` up to
    the order of the sums, which is the same for every n. weight, x, bias contiguous fp32 CPU tensors."""
    lib = library()
    assert lib is not None, "check supports_narrow_linear() first"
    for name, t in (("weight", weight), ("x", x), ("bias", bias)):
        if t is not None and (not t.is_contiguous() or t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"linear_narrow_f32: {name} must be a contiguous fp32 CPU tensor, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if weight.dim() != 2 or x.dim() != 2 or x.shape[0] != weight.shape[1] or weight.numel() == 0:
        raise ValueError(f"linear_narrow_f32: weight {tuple(weight.shape)} and x {tuple(x.shape)} do not chain")
    if not 0 < x.shape[1] <= NARROW_COLUMNS:
        raise ValueError(f"linear_narrow_f32: x has {x.shape[1]} columns, not 1-{NARROW_COLUMNS}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_narrow_f32: bias {tuple(bias.shape)} is not [{weight.shape[0]}]")
    m, n = weight.shape[0], x.shape[1]
    out = x.new_empty((n, m) if transposed else (m, n))
    strides = (1, m) if transposed else (n, 1)
    status = lib.prad_linear_narrow_f32(weight.data_ptr(), m, weight.shape[1], x.data_ptr(), n, n,
                                        None if bias is None else bias.data_ptr(), out.data_ptr(), *strides, threads)
    assert status == 0, f"prad_linear_narrow_f32 returned {status}"
    return out


def _linear_library(weight: torch.Tensor, x: torch.Tensor) -> ctypes.CDLL:
    lib = library()
    assert lib is not None and supports_linear(torch.bfloat16, torch.device("cpu")), "check supports_linear() first"
    for name, t in (("weight", weight), ("x", x)):
        if t.dim() != 2 or not t.is_contiguous() or t.dtype != torch.bfloat16 or t.device.type != "cpu":
            raise ValueError(f"linear_bf16: {name} must be a contiguous 2-D bf16 CPU tensor, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if x.shape[0] != weight.shape[1]:
        raise ValueError(f"linear_bf16: weight {tuple(weight.shape)} and x {tuple(x.shape)} do not chain")
    if not linear_columns_ok(x):
        raise ValueError(f"linear_bf16: x has {x.shape[1]} columns, not a positive multiple of "
                         f"{LINEAR_COLUMN_MULTIPLE}")
    return lib


def add_rms_norm(h: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Feature-major h [d, P] += y (in place; skipped when y is None), then RMSNorm over the d features
    of each column, times weight [d]: `rms_norm(h, weight[:, None], eps, dim=0)` (prad/model.py)."""
    lib = _elementwise_library(h, y, weight)
    if y is not None and (y.shape != h.shape or not y.is_contiguous()):
        raise ValueError(f"add_rms_norm: y {tuple(y.shape)} must be contiguous and shaped like h {tuple(h.shape)}")
    if weight.shape != (h.shape[0],) or not weight.is_contiguous():
        raise ValueError(f"add_rms_norm: weight {tuple(weight.shape)} must be a contiguous [{h.shape[0]}]")
    out = torch.empty_like(h)
    d, cols = h.shape
    getattr(lib, f"prad_add_rms_norm_{_SUFFIX[h.dtype]}")(
        h.data_ptr(), None if y is None else y.data_ptr(), weight.data_ptr(), eps, d, cols, cols, out.data_ptr(), cols)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [2I, P] (gate rows, then up rows) -> SiLU(gate) * up [I, P], rounded as PyTorch rounds."""
    lib = _elementwise_library(gate_up)
    if gate_up.shape[0] % 2:
        raise ValueError(f"silu_mul: gate_up has an odd number of rows ({gate_up.shape[0]})")
    inter, cols = gate_up.shape[0] // 2, gate_up.shape[1]
    out = gate_up.new_empty(inter, cols)
    getattr(lib, f"prad_silu_mul_{_SUFFIX[gate_up.dtype]}")(gate_up.data_ptr(), inter, cols, cols, out.data_ptr(), cols)
    return out


def _elementwise_library(x: torch.Tensor, *others: torch.Tensor | None) -> ctypes.CDLL:
    lib = library()
    assert lib is not None, "check supports_elementwise() first"
    if x.dim() != 2 or not x.is_contiguous() or x.dtype not in _SUFFIX or x.device.type != "cpu":
        raise ValueError(f"expected a contiguous 2-D fp32 / bf16 CPU tensor, got {x.dtype} {tuple(x.shape)}")
    if any(t is not None and (t.dtype != x.dtype or t.device.type != "cpu") for t in others):
        raise TypeError("every operand must share the activations' dtype, on the CPU")
    return lib


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, positions: torch.Tensor,
                     rope: tuple[torch.Tensor, torch.Tensor] | None, scale: float, out: torch.Tensor,
                     threads: int) -> None:
    """One layer of a decode step, in place: RoPE on q and k_new (if `rope`), k_new / v_new written to
    the cache at each row's position, then attention of q over keys [0, position] into `out`.

    q, out: [B, H, D] and k_new, v_new: [B, Hkv, D], any strides (k_new and v_new the same ones);
    k_cache, v_cache: one layer of the slot cache, [rows >= B, Hkv, capacity, D], contiguous in the
    last two dims; positions: [B] int64; rope: the model's fp32 cos / sin tables [max_positions, D].
    """
    lib = library()
    assert lib is not None and q.dtype in _ENTRY, "check supports() first"
    bsz, num_heads, head_dim = q.shape
    num_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    _check(q, k_new, v_new, k_cache, v_cache, positions, out)
    cos, sin = (None, None) if rope is None else (rope[0].contiguous(), rope[1].contiguous())
    if cos is not None:
        capacity = min(capacity, cos.shape[0])
    positions = positions.contiguous()
    status = getattr(lib, _ENTRY[q.dtype])(
        q.data_ptr(), *q.stride(), k_new.data_ptr(), v_new.data_ptr(), *k_new.stride(),
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), capacity,
        positions.data_ptr(), bsz, num_heads, num_kv_heads, head_dim,
        None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(), scale,
        out.data_ptr(), *out.stride(), threads)
    if status == -2:
        raise ValueError(f"decode_attention: no kernel for head_dim {head_dim} with {num_heads // num_kv_heads} "
                         "query heads per KV head (check supports() first)")
    if status != 0:  # nothing was written
        if int(positions.min()) < 0:
            raise ValueError(f"negative position {int(positions.min())}")
        raise ValueError(f"position {int(positions.max())} exceeds KV capacity {capacity}")


def _check(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, positions: torch.Tensor, out: torch.Tensor) -> None:
    bsz, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    tensors = (q, k_new, v_new, k_cache, v_cache, out)
    if any(t.dtype != q.dtype or t.device.type != "cpu" for t in tensors):
        raise TypeError("decode_attention: q, k, v, the cache and out must share one dtype, on the CPU")
    if k_new.shape != (bsz, num_kv_heads, head_dim) or v_new.shape != k_new.shape or out.shape != q.shape:
        raise ValueError(f"decode_attention: shapes q {tuple(q.shape)}, k {tuple(k_new.shape)}, "
                         f"v {tuple(v_new.shape)}, out {tuple(out.shape)} do not match")
    if v_new.stride() != k_new.stride():
        raise ValueError("decode_attention: k_new and v_new must have the same strides")
    if (k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.shape[0] < bsz
            or k_cache.shape[3] != head_dim or k_cache.stride(3) != 1 or k_cache.stride(2) != head_dim):
        raise ValueError("decode_attention: the caches must be [rows >= B, Hkv, capacity, D] with the "
                         "same strides, contiguous in the last two dims")
    if num_heads % num_kv_heads or positions.shape != (bsz,) or positions.dtype != torch.int64:
        raise ValueError("decode_attention: heads must be a multiple of KV heads; positions [B] int64")
    if positions.device.type != "cpu":
        raise ValueError("decode_attention: positions must be on the CPU")
