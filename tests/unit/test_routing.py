"""Traffic splits between adapter versions: shares match the weights, keys stick, ramps move only what
they must (adapters_store/routing.py)."""

from __future__ import annotations

import math
import random

from adapters_store.routing import choose_version

V7, V8, V9 = "7" * 16, "8" * 16, "9" * 16
KEYS = [f"user-{i}" for i in range(2000)]


def _within_bounds(count: int, n: int, share: float, sigmas: float = 4.5) -> bool:
    """`count` of `n` draws is within `sigmas` standard deviations of a binomial with p = share."""
    return abs(count - n * share) <= sigmas * math.sqrt(n * share * (1 - share))


def _assign(weights: list[tuple[str, int]]) -> dict[str, str]:
    rng = random.Random(0)
    return {key: choose_version(weights, key, rng) or "" for key in KEYS}


def test_keyed_shares_are_within_statistical_bounds_of_the_weights() -> None:
    for weights in ([(V7, 90), (V8, 10)], [(V7, 50), (V8, 50)], [(V7, 20), (V8, 30), (V9, 50)]):
        assigned = list(_assign(weights).values())
        for version, weight in weights:
            assert _within_bounds(assigned.count(version), len(KEYS), weight / 100), (weights, version)


def test_unkeyed_shares_are_within_statistical_bounds_of_the_weights() -> None:
    rng = random.Random(1)
    picks = [choose_version([(V7, 70), (V8, 30)], None, rng) for _ in range(2000)]
    assert _within_bounds(picks.count(V8), 2000, 0.3)


def test_a_key_always_gets_the_same_version_on_every_node() -> None:
    weights = [(V7, 60), (V8, 40)]
    first, second = _assign(weights), _assign(list(reversed(weights)))  # another node, other order
    assert first == second


def test_a_ramp_moves_only_the_new_share_and_only_towards_the_canary() -> None:
    before = _assign([(V7, 90), (V8, 10)])
    after = _assign([(V7, 80), (V8, 20)])
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(before[k] == V7 and after[k] == V8 for k in moved)  # nobody left the canary
    assert _within_bounds(len(moved), len(KEYS), 0.10)


def test_a_version_leaving_the_split_takes_only_its_own_keys() -> None:
    before = _assign([(V7, 40), (V8, 30), (V9, 30)])
    after = _assign([(V7, 40), (V8, 30), (V9, 0)])
    assert all(after[k] == before[k] for k in KEYS if before[k] != V9)


def test_excluded_and_zero_weight_versions_are_never_chosen() -> None:
    rng = random.Random(2)
    weights = [(V7, 0), (V8, 50), (V9, 50)]
    assert {choose_version(weights, k, rng, exclude={V9}) for k in KEYS[:200]} == {V8}
    assert choose_version(weights, "k", rng, exclude={V8, V9}) is None
