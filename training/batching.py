"""Batch plans over example lengths: pure Python (no torch), so it is unit-tested directly.

Training batches are length-bucketed: shuffle, cut into pools of `batch_size * POOL_BATCHES`, sort
each pool by length and slice it into batches, then shuffle the batches. Rows of similar length
share a batch, so padding to the batch maximum wastes little, while every epoch still mixes examples.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

POOL_BATCHES = 50


def bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch: every index exactly once, in batches of at most batch_size of similar lengths."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool_size = batch_size * POOL_BATCHES
    batches = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start:start + pool_size], key=lambda i: lengths[i])
        batches += [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Deterministic batches for evaluation: indices sorted by length, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batch_stream(lengths: list[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless bucketed batches, a fresh shuffle per epoch."""
    if not lengths:
        raise ValueError("no training examples")
    rng = random.Random(seed)
    while True:
        yield from bucketed_batches(lengths, batch_size, rng)


def num_batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches in one epoch (pools end on partial batches, so this can exceed ceil(n / batch_size))."""
    pool_size = batch_size * POOL_BATCHES
    full, rest = divmod(num_examples, pool_size)
    return full * POOL_BATCHES + -(-rest // batch_size)
