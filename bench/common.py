"""Helpers shared by the benchmarks: threads, machine info, models, adapters, prompts, timing, output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from prad.adapters import Adapter, AdapterConfig
from prad.adapters.io import init_tensors
from prad.loading import LoadedModel, load_model
from prad.machine import cpuinfo

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def setup_threads(threads: int | None = None) -> int:
    """Use `threads` torch threads, by default every core this process may run on (the benchmarks then
    assume nothing else heavy is running; pass fewer to leave cores to other work)."""
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print(f"warning: OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')!r}, expected PASSIVE", file=sys.stderr)
    cores = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    return cores


def parse_ints(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]."""
    return [int(x) for x in text.split(",") if x.strip()]


def parse_dtypes(text: str) -> list[str]:
    """'float32,bf16' -> ['float32', 'bfloat16']; raises on an unknown name."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in DTYPE_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {unknown}; use float32 and/or bfloat16")
    return [DTYPE_NAMES[n] for n in names]


def add_common_args(parser: argparse.ArgumentParser, default_dtypes: str, default_repeats: int = 3) -> None:
    parser.add_argument("--dtypes", type=parse_dtypes, default=parse_dtypes(default_dtypes),
                        help=f"comma-separated model dtypes (default {default_dtypes})")
    parser.add_argument("--repeats", type=int, default=default_repeats,
                        help=f"timed repeats per measurement; the median is reported (default {default_repeats})")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank, bottleneck width or LoRA rank (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts and adapter weights (default 0)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    parser.add_argument("--model", default=None,
                        help="a local HF model directory (default: the embedded SmolLM2-135M-Instruct)")


def cpu_id(fields: dict[str, str]) -> str | None:
    """e.g. "family 26 model 2 stepping 1": tells apart VMs whose model name is just "AMD EPYC"."""
    names = ("cpu family", "model", "stepping")
    if not all(name in fields for name in names):
        return None
    return " ".join(f"{name.removeprefix('cpu ')} {fields[name]}" for name in names)


def cpu_flags(fields: dict[str, str]) -> list[str]:
    """The SIMD flags that decide fp32/bf16 matmul speed, as /proc/cpuinfo lists them."""
    present = set(fields.get("flags", "").split())
    return [f for f in CPU_FLAGS_OF_INTEREST if f in present]


def machine_info(dtypes: Sequence[str]) -> dict[str, Any]:
    fields = cpuinfo()
    return {
        "cpu_model": fields.get("model name") or platform.processor() or "unknown",
        "cpu_id": cpu_id(fields),
        "cpu_flags": cpu_flags(fields),
        "cores": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "dtypes": list(dtypes),
        "load_average_start": list(os.getloadavg()),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def load(dtype: str, device: str = "cpu", model: str | None = None) -> LoadedModel:
    """`model` (default: the embedded one, cached after its first conversion) on `device` in `dtype`."""
    return load_model(model, device, dtype)


def random_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` random token ids (ids below 100, mostly special tokens, avoided)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab_size, (count, length), generator=gen).tolist()


def make_adapter(loaded: LoadedModel, variant: str, rank: int, seed: int) -> Adapter:
    """A random, non-identity adapter on the model's device and dtype, as the adapter cache would hold it."""
    config = AdapterConfig(variant=variant, rank=rank, base_model_fingerprint=loaded.fingerprint)
    tensors = init_tensors(config, loaded.config, seed, up_std=0.05)
    model = loaded.model
    return Adapter(config, tensors, f"bench-{variant}-{seed}").to(model.device, model.dtype)


def synchronize() -> None:
    """Wait for queued GPU work (a no-op without CUDA), so wall-clock timings include it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object]) -> float:
    """Wall seconds of one call, GPU work included."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


MATMUL_LAYOUTS = ("row_major", "weight", "weight_left")


def matmul_operands(rows: int, inner: int, cols: int, dtype: torch.dtype, layout: str,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two operands of [rows, inner] x [inner, cols] in `layout` (see `matmul_flops_per_s`)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=gen).to(dtype)
    if layout == "row_major":
        b = torch.randn(inner, cols, generator=gen).to(dtype)
    elif layout == "weight":
        b = torch.randn(cols, inner, generator=gen).to(dtype).t()
    else:
        a, b = torch.randn(cols, inner, generator=gen).to(dtype), a.t().contiguous()
    return a.to(device), b.to(device)


def matmul_loop(a: torch.Tensor, b: torch.Tensor, calls: int) -> float:
    """FLOP/s of `calls` back-to-back torch.matmul(a, b), timed as one loop."""
    flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]

    def loop() -> None:
        for _ in range(calls):
            torch.matmul(a, b)

    return calls * flops / time_call(loop)


def calls_for(a: torch.Tensor, b: torch.Tensor, seconds: float) -> int:
    """How many matmul(a, b) calls take about `seconds` (at least 3), after two warm-up calls."""
    for _ in range(2):
        torch.matmul(a, b)
    per_call = time_call(lambda: torch.matmul(a, b))
    return max(3, int(seconds / max(per_call, 1e-7)))


def matmul_flops_per_s(rows: int, inner: int, cols: int, dtype: torch.dtype, layout: str,
                       device: torch.device, min_seconds: float = 0.2) -> float:
    """FLOP/s of one timed loop of plain torch.matmul [rows, inner] x [inner, cols] (2*rows*inner*cols each).

    layout "row_major": the right operand is a contiguous [inner, cols] tensor; "weight": it is the
    transposed view of a contiguous [cols, inner] tensor, the `[out, in]` layout the model's weights
    use (on some CPUs bf16 matmul is an order of magnitude faster in one layout than the other);
    "weight_left": the same product computed transposed, contiguous [cols, inner] x [inner, rows],
    the orientation of the decode step (prad/decode_step.py).
    """
    a, b = matmul_operands(rows, inner, cols, dtype, layout, device)
    return matmul_loop(a, b, calls_for(a, b, min_seconds))


def best_matmul_flops_per_s(rows: int, inner: int, cols: int, dtype: torch.dtype,
                            device: torch.device) -> dict[str, float]:
    """The rate in each layout, and "best": the faster one, the fair reference for the model's speed."""
    rates = {layout: matmul_flops_per_s(rows, inner, cols, dtype, layout, device) for layout in MATMUL_LAYOUTS}
    rates["best"] = max(rates.values())
    return rates


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table; floats are printed with 3 significant decimals where useful."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line, sep, *("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body)])


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run's arguments as JSON-ready values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


@contextmanager
def serve_app(app: Any, timeout_s: float = 120.0) -> Iterator[str]:
    """Serve a FastAPI app with uvicorn on a loopback port until the block ends; yields its base URL
    once /readyz answers 200."""
    import httpx
    import uvicorn

    from launcher.local import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="bench-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server at {url} did not become ready")
        time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def run_http_load(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One run of the load generator (bench/http_load.py) in its own process, as clients are."""
    proc = subprocess.run([sys.executable, "-m", "bench.http_load"], input=json.dumps(job), capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def save_results(out_dir: Path, name: str, payload: dict[str, Any], draw: Callable[[Path], None]) -> None:
    """`name`.json from `payload` and `name`.png drawn by `draw(path)`, both in `out_dir`."""
    json_path = write_json(out_dir, name, payload)
    png_path = out_dir / f"{name}.png"
    draw(png_path)
    print(f"wrote {json_path} and {png_path}")


def write_json(out_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload["machine"]["load_average_end"] = list(os.getloadavg())
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the non-interactive Agg backend (imported only when a plot is written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
