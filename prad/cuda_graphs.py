"""CUDA graphs of the static decode step: one per batch bucket, bound to one KV cache.

A graph replays the recorded kernels on the recorded addresses: the step's input buffers, the
weights and the cache it was captured with. The decode runner grows its cache by reallocating it,
so the graphs remember which cache they were captured for and are captured again (lazily, bucket
by bucket, on first use) when a step comes with another one. All graphs share one memory pool and
are captured largest first, so the smaller ones reuse the largest one's activation memory.

Only a model on a CUDA device builds a `DecodeGraphs`; nothing else here touches torch.cuda, so this
module imports, and the CPU paths run, on machines without CUDA.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prad.kv_cache import KVCache

log = logging.getLogger(__name__)

CacheKey = tuple[int, int, tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class GraphStats:
    buckets: tuple[int, ...]  # batch buckets with a captured graph now
    num_captures: int  # graphs captured since start-up (a grown cache captures again)
    capture_s: float  # wall seconds spent warming up and capturing, all captures together
    pool_bytes: int  # GPU memory the captures reserved (growth of torch.cuda.memory_reserved)


def cache_key(kv: KVCache) -> CacheKey:
    """What a graph depends on in a cache: its tensors' addresses, its shape and dtype."""
    return kv.k.data_ptr(), kv.v.data_ptr(), tuple(kv.k.shape), kv.k.dtype


class DecodeGraphs:
    """`forward(bucket, kv)` captured once per bucket. It must read its inputs only from `token_ids`
    and `positions` (preallocated [max rows] buffers) and return a tensor it allocates (the output)."""

    def __init__(self, forward: Callable[[int, KVCache], torch.Tensor], token_ids: torch.Tensor,
                 positions: torch.Tensor) -> None:
        self.forward = forward
        self.token_ids = token_ids
        self.positions = positions
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> graph, its logits
        self.bound: CacheKey | None = None
        self.num_captures = 0
        self.capture_s = 0.0
        self.pool_bytes = 0

    def ensure(self, bucket: int, kv: KVCache) -> None:
        """Make sure `bucket` has a graph for `kv`, capturing it now if not (graphs of another cache
        are dropped first: they would read and write memory the old cache no longer owns)."""
        key = cache_key(kv)
        if key != self.bound:
            if self.graphs:
                log.info("decode KV cache reallocated (now %s): recapturing CUDA graphs on first use", key[2])
            self.graphs.clear()
            self.bound = key
        if bucket not in self.graphs:
            self._capture(bucket, kv)

    def replay(self, bucket: int) -> torch.Tensor:
        """Run `bucket`'s graph on the current contents of the input buffers; returns its output."""
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits

    def stats(self) -> GraphStats:
        return GraphStats(tuple(sorted(self.graphs)), self.num_captures, self.capture_s, self.pool_bytes)

    def _capture(self, bucket: int, kv: KVCache) -> None:
        start, reserved = time.perf_counter(), _reserved_bytes()
        # The warm-up run executes, so it writes K/V: token 0 at the cache's last position, for rows
        # [0, bucket). Rows may be live here (a cache grown while requests run), but no live row has
        # written that position yet (capacity only grows past every running position), and a row
        # writes each position itself before reading it, so this is overwritten before it is read.
        self.token_ids[:bucket].zero_()
        self.positions[:bucket].fill_(kv.capacity - 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(bucket, kv)  # warm-up: lazy initialisation (cuBLAS, kernels) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (prefill in role=all) do not invalidate this capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self.forward(bucket, kv)
        torch.cuda.synchronize()
        self.graphs[bucket] = graph, logits
        self.num_captures += 1
        self.capture_s += time.perf_counter() - start
        self.pool_bytes += max(0, _reserved_bytes() - reserved)
        log.debug("captured the decode step for batch bucket %d (cache capacity %d)", bucket, kv.capacity)


def _reserved_bytes() -> int:
    """GPU memory the caching allocator holds once idle blocks are released: what stays is in use,
    a graph's private pool included (torch.cuda.graph itself empties the cache before capturing)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved()
