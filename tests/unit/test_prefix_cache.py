"""The adapter-aware prefix cache: longest cached prefix by whole blocks, keyed by adapter version,
always leaving a token to compute, bounded by bytes with LRU eviction (prefill_service/prefix_cache.py)."""

from __future__ import annotations

import torch

from prefill_service.prefix_cache import PrefixCache

L, H, D, B = 2, 2, 4, 4  # layers, kv heads, head dim, block tokens
BLOCK_BYTES = L * 2 * H * B * D * 4


def _kv(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(L, 2, H, length, D, generator=torch.Generator().manual_seed(seed))


def _cache(max_blocks: int = 100) -> PrefixCache:
    return PrefixCache(max_blocks * BLOCK_BYTES, "fp", block_tokens=B)


def test_a_repeated_prompt_hits_its_whole_blocks_but_leaves_a_token_to_compute() -> None:
    cache, ids, kv = _cache(), list(range(1, 11)), _kv(10)
    assert cache.lookup("v1", ids) == (0, None)
    cache.insert("v1", ids, kv)
    n, hit = cache.lookup("v1", ids)
    assert n == 8 and hit is not None and torch.equal(hit, kv[:, :, :, :8])
    exact = list(range(1, 9))  # two whole blocks: the second cannot be used, one token must be computed
    assert cache.lookup("v1", exact)[0] == 4


def test_a_shared_prefix_hits_up_to_the_first_different_block() -> None:
    cache, kv = _cache(), _kv(12)
    cache.insert("v1", list(range(12)), kv)
    other = [*range(6), 99, 98, 97, 96, 95, 94]  # differs inside block 2
    n, hit = cache.lookup("v1", other)
    assert n == 4 and hit is not None and torch.equal(hit, kv[:, :, :, :4])


def test_another_adapter_version_or_model_never_sees_the_kv() -> None:
    cache, ids = _cache(), list(range(12))
    cache.insert("v1", ids, _kv(12))
    assert cache.lookup("v2", ids) == (0, None)
    assert PrefixCache(100 * BLOCK_BYTES, "other-fp", B).lookup("v1", ids) == (0, None)


def test_the_byte_budget_holds_and_recently_used_prefix_heads_survive() -> None:
    cache = _cache(max_blocks=4)
    shared = list(range(8))
    cache.insert("v1", [*shared, 100], _kv(9, 1))  # blocks s0, s1
    for i in range(3):  # other prompts push blocks in; the shared prefix is looked up in between
        assert cache.lookup("v1", [*shared, 200 + i])[0] == 8
        cache.insert("v1", [1000 + i] * 8 + [5], _kv(9, 2 + i))
        assert cache.num_bytes <= cache.max_bytes
    assert cache.lookup("v1", [*shared, 300])[0] == 8  # still cached: used more recently than the rest
    assert cache.stats.evicted_blocks > 0


def test_a_disabled_cache_stores_nothing() -> None:
    cache = PrefixCache(0, "fp", B)
    cache.insert("v1", list(range(12)), _kv(12))
    assert cache.lookup("v1", list(range(12))) == (0, None) and cache.num_blocks == 0
