"""The decode runner: a slot KV cache and one batched, adapter-free decode step.

KV memory is one contiguous cache `[layers, max_batch_size, kv_heads, capacity, head_dim]` (see
docs/design.md for why slots and not paged blocks on this CPU-first design). Its capacity grows in
steps of CAPACITY_STEP positions as longer requests arrive, up to max_seq_len, so memory follows the
longest running request rather than the model's whole context.

The decode step (`choose_step_backend`, setting `decode_graphs`): on CUDA the static-shape step
replayed as one CUDA graph per batch bucket (prad/static_decode.py, prad/cuda_graphs.py), captured
here at start-up; on the CPU the CPU backend (prad/cpu_decode); elsewhere the reference step.
"""

from __future__ import annotations

import logging

import torch

from prad.cpu_decode import CpuStepBackend
from prad.cpu_decode.mixed import PromptChunks
from prad.cuda_graphs import GraphStats
from prad.decode_step import ReferenceStep, StepBackend
from prad.model import Model
from prad.static_decode import StaticStep

log = logging.getLogger(__name__)

CAPACITY_STEP = 256
DECODE_GRAPHS = ("auto", "off", "static")  # the values of the decode_graphs setting
MAX_STATIC_ROWS = 1024  # input buffer rows of a static step built without a batch size (ServeSettings' bound)


def choose_step_backend(model: Model, decode_graphs: str = "auto",
                        max_batch_size: int = MAX_STATIC_ROWS) -> StepBackend:
    """The decode step for `model`, by `decode_graphs`:

    * auto: on CUDA the static step with CUDA graphs; on the CPU the CPU backend (it builds the native
      kernels now, once per machine, rather than in the first request); elsewhere the reference step;
    * off: no graphs: the reference step on CUDA (the eager step), the CPU backend on the CPU;
    * static: the static step without graphs, on any device (tests and benchmarks without CUDA).
    """
    if decode_graphs not in DECODE_GRAPHS:
        raise ValueError(f"decode_graphs {decode_graphs!r}: expected one of {', '.join(DECODE_GRAPHS)}")
    on_cuda = model.device.type == "cuda"
    if decode_graphs == "static" or (decode_graphs == "auto" and on_cuda):
        return StaticStep(model, max_batch_size, use_graphs=decode_graphs == "auto")
    return CpuStepBackend(model) if model.device.type == "cpu" else ReferenceStep(model)


class DecodeRunner:
    def __init__(self, model: Model, max_batch_size: int, max_seq_len: int, decode_graphs: str = "auto") -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.cache = model.new_kv_cache(max_batch_size, 0)
        self.backend = choose_step_backend(model, decode_graphs, max_batch_size)
        log.info("decode step: %s", self.backend)
        if isinstance(self.backend, StaticStep) and self.backend.graphs is not None:
            self._capture_graphs(self.backend)

    def _capture_graphs(self, backend: StaticStep) -> None:
        """Capture every bucket's graph now, on a first cache of CAPACITY_STEP positions, so that the
        first requests do not wait for it (a cache grown later is captured again on first use)."""
        self.ensure_capacity(min(CAPACITY_STEP, self.max_seq_len))
        stats = backend.capture(self.cache)
        log.info("decode CUDA graphs: %d buckets %s captured in %.2f s, %.1f MiB of GPU memory",
                 len(stats.buckets), list(stats.buckets), stats.capture_s, stats.pool_bytes / 2**20)

    def graph_stats(self) -> GraphStats | None:
        """Capture time and memory of the decode step's CUDA graphs; None when it runs without them."""
        return self.backend.graph_stats() if isinstance(self.backend, StaticStep) else None

    @property
    def num_kv_bytes(self) -> int:
        return self.cache.k.numel() * self.cache.k.element_size() * 2

    def ensure_capacity(self, num_positions: int) -> None:
        if num_positions <= self.cache.capacity:
            return
        if num_positions > self.max_seq_len:
            raise ValueError(f"{num_positions} positions exceed max_seq_len {self.max_seq_len}")
        capacity = min(self.max_seq_len, -(-num_positions // CAPACITY_STEP) * CAPACITY_STEP)
        bigger = self.model.new_kv_cache(self.max_batch_size, capacity)
        old = self.cache.capacity
        bigger.k[:, :, :, :old] = self.cache.k
        bigger.v[:, :, :, :old] = self.cache.v
        self.cache = bigger

    def insert(self, row: int, kv: torch.Tensor) -> None:
        """kv: [layers, 2, kv_heads, length, head_dim] from the handoff."""
        self.cache.insert(row, kv.to(device=self.model.device, dtype=self.model.dtype))

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move_row(src, dst, length)

    @property
    def can_mix(self) -> bool:
        """Whether a step can compute prompt chunks in its own pass (the CPU backend)."""
        return isinstance(self.backend, CpuStepBackend)

    def decode_mixed(self, token_ids: list[int], positions: list[int], chunks: PromptChunks) -> \
            tuple[torch.Tensor, torch.Tensor]:
        """`decode`, computing `chunks` in the same pass; (decode logits [B, V], chunk logits [R, V])."""
        assert isinstance(self.backend, CpuStepBackend), "only the CPU backend mixes prompt chunks in"
        ids, pos = torch.tensor(token_ids), torch.tensor(positions)
        return self.backend.mixed_step(ids, pos, self.cache.rows(len(token_ids)), chunks)

    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One step for rows [0, B): feed each row's newest token at its position; logits [B, V]
        (with the static step, a view of its output: valid until the next step)."""
        device = self.model.device
        ids = torch.tensor(token_ids, device=device)  # [B]
        pos = torch.tensor(positions, device=device)  # [B]
        if isinstance(self.backend, StaticStep):
            # Checked here, on the host lists: the static step cannot check positions without a sync.
            if max(positions) >= self.cache.capacity:
                raise ValueError(f"position {max(positions)} exceeds KV capacity {self.cache.capacity}")
            # The whole cache: rows [B, bucket) are free (running rows are dense) and take the padding.
            return self.backend.step(ids, pos, self.cache)
        return self.backend.step(ids, pos, self.cache.rows(len(token_ids)))
