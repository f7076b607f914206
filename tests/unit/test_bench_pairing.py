"""bench/decode.py's pairing: the interleaving order is balanced, and the paired ratio and its
interval are what they claim to be."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from bench.decode import median_ci95, paired_ratio, step_fractions, step_order


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_each_condition_follows_each_other_once_per_period_across_step_boundaries(n: int) -> None:
    conditions = [f"c{i}" for i in range(n)]
    period = n - 1
    orders = [step_order(conditions, s) for s in range(period)]
    assert all(sorted(o) == conditions for o in orders)
    timeline = [c for o in orders for c in o]
    follows = Counter(itertools.pairwise(timeline + timeline[:1]))  # the next period starts over
    assert set(follows) == set(itertools.permutations(conditions, 2))
    assert set(follows.values()) == {1}
    assert step_order(conditions, period) == orders[0]


def test_paired_ratio_is_the_median_of_per_step_speed_ratios() -> None:
    seconds = {"base": [1.0, 2.0, 4.0], "tasks": [1.0, 2.5, 2.0]}  # tasks/base speed: 1.0, 0.8, 2.0
    assert paired_ratio(seconds) == pytest.approx(1.0)
    assert paired_ratio(seconds, "base", "tasks") == pytest.approx(1.0)  # 1.0, 1.25, 0.5


def test_median_interval_contains_the_median_and_narrows_with_more_samples() -> None:
    few = [0.9 + 0.01 * i for i in range(21)]  # median 1.0
    many = few * 16
    lo_few, hi_few = median_ci95(few)
    lo_many, hi_many = median_ci95(many)
    assert lo_few <= 1.0 <= hi_few and lo_many <= 1.0 <= hi_many
    assert hi_many - lo_many < hi_few - lo_few
    assert median_ci95([3.0]) == (3.0, 3.0)


def test_step_fractions_pair_each_step_with_the_reference_sampled_next_to_it() -> None:
    flops = [10.0, 20.0]  # one round of two steps; two rounds timed
    base_seconds = [1.0, 2.0, 0.5, 1.0]  # achieved: 10, 10, 20, 20 FLOP/s
    rates = [20.0, 10.0, 40.0, 20.0]  # the machine ran twice as fast in the second round, both alike
    assert step_fractions(flops, base_seconds, rates) == [0.5, 1.0, 0.5, 1.0]
    with pytest.raises(ValueError):
        step_fractions(flops, base_seconds, rates[:3])  # one sample per timed step
