"""The CPU decode backend: the feature-major step (step.py) on the parts chosen for this CPU (ops.py).

Threads. The count is read once, when the backend is built, from torch's intra-op setting (the
server sets it at start-up from `--threads`). The native kernels run their parallel loops on their
own pool (prad/kernels/pool.h) with that count; the GEMMs and the remaining PyTorch ops run on
torch's threads as configured. The step never changes torch's thread count: it is process-wide
state that prefill and any other thread share.
"""

from __future__ import annotations

import torch

from prad.cpu_decode.mixed import PromptChunks, mixed_step
from prad.cpu_decode.ops import choose_ops
from prad.cpu_decode.step import feature_major_step
from prad.decode_step import StepBackend
from prad.kv_cache import KVCache
from prad.model import AdapterHooks, Model


class CpuStepBackend(StepBackend):
    """The decode step for CPUs. Native kernels (prad/kernels) where they apply, unless
    `native_kernels` is False (or PRAD_NATIVE_KERNELS=0, or no C++ compiler): then PyTorch ops only."""

    def __init__(self, model: Model, native_kernels: bool = True) -> None:
        if model.device.type != "cpu":
            raise ValueError(f"CpuStepBackend needs a model on the CPU, not on {model.device}")
        self.model = model
        self.num_threads = torch.get_num_threads()
        self.ops = choose_ops(model, self.num_threads, native_kernels)
        self.name = "cpu-native" if self.ops.native else "cpu-torch"

    def __str__(self) -> str:
        native = ", ".join(self.ops.native) or "none"
        return f"{self.name} (native kernels: {native}; {self.num_threads} threads)"

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache) -> torch.Tensor:
        return feature_major_step(self.model, self.ops, token_ids, positions, kv)


    @torch.inference_mode()
    def mixed_step(self, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache,
                   chunks: PromptChunks) -> tuple[torch.Tensor, torch.Tensor]:
        """`step`, computing `chunks` in the same pass (prad/cpu_decode/mixed.py)."""
        return mixed_step(self.model, self.ops, token_ids, positions, kv, chunks)


@torch.inference_mode()
def step_with_hooks(backend: CpuStepBackend, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache,
                    hooks: AdapterHooks) -> torch.Tensor:
    """`backend.step` with adapters applied to every token, for the benchmarks' conventional
    baselines (LoRA at every decode step), so that they decode through the same step as PrAd and a
    comparison measures the method, not two decode loops. The decode service never adapts a step."""
    return feature_major_step(backend.model, backend.ops, token_ids, positions, kv, hooks)
