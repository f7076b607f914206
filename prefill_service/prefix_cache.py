"""Prompt KV of earlier prefills, reused by later prompts that start the same way: an adapter-aware
prefix cache.

A PrAd prompt's KV depends on the task's adapter, so entries are keyed by (model fingerprint, adapter
version) as well as by tokens: a hot swap or a canary version never sees another version's KV, by
construction. Prompts are cut into blocks of `block_tokens`; block i is keyed by a hash chained over
every token up to its end, so a block hit implies its whole prefix matches. A lookup returns the KV
of the longest run of cached blocks from the start, always leaving at least one prompt token to
compute (its logits give the first output token). Because attention is causal, the KV of a prefix
computed alone equals the KV of that prefix inside a longer prompt; the engine continues from it
exactly as chunked prefill continues from an earlier chunk.

Memory is bounded by a byte budget with LRU eviction. A lookup refreshes the blocks it hit from the
last to the first, so a prefix's first blocks are the last of it to be evicted and chains do not
break from the front. Thread-safe: lookups run on HTTP worker threads, inserts on the engine loop.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

DEFAULT_BLOCK_TOKENS = 16
BlockKey = tuple[str, bytes]  # (namespace: fingerprint + adapter version, chained hash of the tokens so far)


@dataclass
class PrefixStats:
    lookups: int = 0
    hit_tokens: int = 0  # prompt tokens whose KV came from the cache
    prompt_tokens: int = 0  # prompt tokens looked up
    inserted_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    def __init__(self, max_bytes: int, fingerprint: str, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        if max_bytes < 0 or block_tokens < 1:
            raise ValueError(f"bad prefix cache bounds: max_bytes={max_bytes} block_tokens={block_tokens}")
        self.max_bytes = max_bytes
        self.fingerprint = fingerprint
        self.block_tokens = block_tokens
        self.stats = PrefixStats()
        self.num_bytes = 0
        self._blocks: OrderedDict[BlockKey, torch.Tensor] = OrderedDict()  # LRU order, oldest first
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def lookup(self, adapter_version: str, token_ids: list[int]) -> tuple[int, torch.Tensor | None]:
        """(n, KV of the first n prompt tokens) for the longest cached prefix (n a multiple of the
        block size, at most len - 1); (0, None) on a miss. The KV is a new tensor [L, 2, H, n, D]."""
        if not self.enabled:
            return 0, None
        keys = self._keys(adapter_version, token_ids, len(token_ids) - 1)
        with self._lock:
            hits = []
            for key in keys:
                block = self._blocks.get(key)
                if block is None:
                    break
                hits.append((key, block))
            for key, _ in reversed(hits):  # last block first: the prefix's head stays most recent
                self._blocks.move_to_end(key)
            self.stats.lookups += 1
            self.stats.prompt_tokens += len(token_ids)
            self.stats.hit_tokens += len(hits) * self.block_tokens
        if not hits:
            return 0, None
        return len(hits) * self.block_tokens, torch.cat([block for _, block in hits], dim=3)

    def insert(self, adapter_version: str, token_ids: list[int], kv: torch.Tensor) -> None:
        """Keep the KV [L, 2, H, >= len, D] of a completed prompt's full blocks (those not cached yet)."""
        if not self.enabled:
            return
        keys = self._keys(adapter_version, token_ids, len(token_ids))
        b = self.block_tokens
        with self._lock:
            missing = [i for i, key in enumerate(keys) if key not in self._blocks]
        blocks = {keys[i]: kv[:, :, :, i * b:(i + 1) * b].clone() for i in missing}  # copies outside the lock
        with self._lock:
            for key, block in blocks.items():
                if key in self._blocks:
                    continue
                self._blocks[key] = block
                self.num_bytes += _nbytes(block)
                self.stats.inserted_blocks += 1
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.num_bytes = 0

    def _evict(self) -> None:
        """Drop least recently used blocks until the budget holds (lock held)."""
        while self.num_bytes > self.max_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.num_bytes -= _nbytes(block)
            self.stats.evicted_blocks += 1

    def _keys(self, adapter_version: str, token_ids: list[int], max_tokens: int) -> list[BlockKey]:
        """The keys of the full blocks within the first `max_tokens` tokens, each hash chained over all
        the tokens before it."""
        namespace = f"{self.fingerprint}/{adapter_version}"
        digest = hashlib.blake2b(namespace.encode(), digest_size=16).digest()
        keys = []
        b = self.block_tokens
        for end in range(b, max_tokens + 1, b):
            block = b"".join(t.to_bytes(4, "little") for t in token_ids[end - b:end])
            digest = hashlib.blake2b(digest + block, digest_size=16).digest()
            keys.append((namespace, digest))
        return keys


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
