"""hvdtrain.tools.stats: the benchmarks' one definition of a ratio from interleaved repeats,
checked against computations written out here (by hand, or by exhaustive enumeration)."""
from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest

from hvdtrain.tools.stats import (format_ratio, interleaved_order, median, median_index, paired,
                                  ratio_summary)


def test_order_interleaves_whole_rounds() -> None:
    assert interleaved_order(["a", "b"], 3) == [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a"), (2, "b")]
    assert [n for _, n in interleaved_order(["x", "y", "z"], 2)] == ["x", "y", "z", "x", "y", "z"]
    assert interleaved_order(["only"], 1) == [(0, "only")]
    with pytest.raises(ValueError, match="repeats"):
        interleaved_order(["a"], 0)


def test_point_median_and_the_run_shown() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median_index([30.0, 10.0, 20.0]) == 2  # the middle run, 20
    assert median_index([40.0, 10.0, 30.0, 20.0]) == 3  # the lower middle one, 20
    assert median_index([5.0]) == 0
    with pytest.raises(ValueError):
        median([])


def test_median_ratio_by_hand() -> None:
    s = ratio_summary([2.0, 3.0, 5.0], [1.0, 2.0, 4.0])  # ratios 2, 1.5, 1.25
    assert s["median_ratio"] == 1.5 and s["pairs"] == 3
    assert s["a"] == [2.0, 3.0, 5.0] and s["b"] == [1.0, 2.0, 4.0]
    # an even count: the mean of the two middle ratios (1.0 and 3.0), not the ratio of medians
    assert ratio_summary([1.0, 8.0, 3.0, 4.0], [1.0, 2.0, 1.0, 4.0])["median_ratio"] == 2.0
    # the pairs matter: the median of a_i / b_i, not median(a) / median(b)
    s = ratio_summary([10.0, 1.0, 5.0], [5.0, 1.0, 10.0])  # ratios 2, 1, 0.5; median(a)/median(b) = 1
    assert s["median_ratio"] == 1.0
    lo, hi = s["ci95"]
    assert lo <= 1.0 <= hi


def test_equal_values_give_a_zero_width_interval() -> None:
    s = ratio_summary([3.0] * 5, [2.0] * 5)
    assert s["median_ratio"] == 1.5 and s["ci95"] == [1.5, 1.5]
    s = ratio_summary([0.9 * b for b in (1.0, 2.0, 4.0, 8.0, 16.0)], [1.0, 2.0, 4.0, 8.0, 16.0])  # exact: powers of 2
    assert s["ci95"] == [s["median_ratio"]] * 2 == [0.9, 0.9]
    one = ratio_summary([2.0], [4.0])
    assert one["ci95"] == [0.5, 0.5] and one["pairs"] == 1


def exact_bootstrap(ratios: list[float]) -> dict[float, float]:
    """Every one of the n^n equally likely resamples, enumerated: median -> probability."""
    n = len(ratios)
    dist: dict[float, float] = {}
    for pick in itertools.product(range(n), repeat=n):
        m = statistics.median(ratios[i] for i in pick)
        dist[m] = dist.get(m, 0.0) + 1.0 / n ** n
    return dist


@pytest.mark.parametrize("ratios", [[0.8, 0.9, 1.0, 1.3], [1.0, 1.1, 0.95, 0.7, 1.2]])
def test_interval_matches_the_enumerated_bootstrap(ratios: list[float]) -> None:
    """The interval's ends are possible resample medians, and the exact bootstrap distribution
    puts at most 2.5% (+ Monte Carlo slack) below the lower end and above the upper end."""
    s = ratio_summary(ratios, [1.0] * len(ratios), resamples=40_000)
    dist = exact_bootstrap(ratios)
    lo, hi = s["ci95"]
    support = sorted(dist)
    for end in (lo, hi):  # ends lie within the support (between two neighbours when interpolated)
        assert support[0] <= end <= support[-1]
    below = sum(p for m, p in dist.items() if m < lo - 1e-12)
    above = sum(p for m, p in dist.items() if m > hi + 1e-12)
    assert below <= 0.025 + 0.005 and above <= 0.025 + 0.005, (below, above)
    # and not wider than needed: the resample medians at or below the lower end hold about 2.5%
    inner_lo = max(m for m in support if m <= lo + 1e-12)
    assert sum(p for m, p in dist.items() if m <= inner_lo + 1e-12) >= 0.025 - 0.005


def test_interval_covers_a_known_ratio() -> None:
    """Synthetic runs with a true ratio of 0.9 and noise per run (load on B and A alike, plus
    independent jitter): the interval from 9 pairs contains 0.9 in most of 200 draws."""
    true = 0.9
    hits = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        load = rng.lognormal(0.0, 0.3, 9)  # the machine's state, shared by the pair
        b = 100.0 * load * rng.lognormal(0.0, 0.03, 9)
        a = true * 100.0 * load * rng.lognormal(0.0, 0.03, 9)
        lo, hi = ratio_summary(a, b, seed=seed, resamples=2000)["ci95"]
        hits += lo <= true <= hi
    # For 9 pairs the median's interval spans about the 2nd to the 8th ordered ratio: the true
    # median is outside with probability 2 * P(Binomial(9, 1/2) <= 1) ~ 4%.
    assert hits >= 180, hits


def test_seeded_and_validated() -> None:
    a, b = [1.0, 1.2, 0.9, 1.1, 1.05], [1.0, 1.0, 1.0, 1.0, 1.0]
    assert ratio_summary(a, b, seed=3) == ratio_summary(a, b, seed=3)
    with pytest.raises(ValueError, match="as many"):
        ratio_summary([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="as many"):
        ratio_summary([], [])
    with pytest.raises(ValueError, match="nonzero"):
        ratio_summary([1.0], [0.0])
    with pytest.raises(ValueError, match="finite"):
        ratio_summary([math.nan], [1.0])


def test_pairs_by_repeat_and_the_table_cell() -> None:
    assert paired({0: 1.0, 1: 2.0, 3: 4.0}, {1: 20.0, 0: 10.0, 2: 30.0}) == ([1.0, 2.0], [10.0, 20.0])
    s = ratio_summary([0.97, 0.95, 0.99, 0.96, 0.98], [1.0] * 5)
    assert format_ratio(s) == f"0.97 [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"
    assert format_ratio(ratio_summary([1.0], [2.0])) == "0.50 (1 pair)"
    assert format_ratio(None) == ""
