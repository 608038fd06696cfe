"""How hvdtrain's benchmarks turn repeated runs into a ratio: the one definition.

On a shared, noisy machine one run of A against one run of B says little. Every bench therefore
runs whole jobs interleaved (A, B, A, B, ...: `interleaved_order`), so slow phases of the machine
fall on both sides alike, pairs the i-th run of A with the i-th run of B, and reports
- the point value: the median (`median`; `median_index` picks the run whose fields are shown),
- the ratio: the median over pairs of a_i / b_i, with a 95% percentile bootstrap interval that
  resamples whole pairs (`ratio_summary`). Pairs keep what the interleaving bought: a load spike
  that slows both A_i and B_i cancels in a_i / b_i.
Pure functions of numbers (numpy only): no run, no file, no clock.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RESAMPLES = 10_000
"""Bootstrap resamples: the interval's ends move by well under 1% of its width between seeds."""
LEVEL = 0.95


def interleaved_order(names: Sequence[Any], repeats: int) -> list[tuple[int, Any]]:
    """The run schedule: (repeat, name) for names[0], names[1], ..., then again, `repeats` times.

    Every name runs once per round, in the same order, so pair i (the i-th run of each name)
    was measured within one round, minutes apart at most."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    return [(rep, name) for rep in range(repeats) for name in names]


def median(values: Sequence[float]) -> float:
    """The point value of repeated runs (the mean of the two middle values for an even count)."""
    if len(values) == 0:
        raise ValueError("median of no values")
    return float(np.median(np.asarray(values, dtype=np.float64)))


def median_index(values: Sequence[float]) -> int:
    """Index of the run to show when a row's fields must all come from one run: the lower
    median (the middle run for an odd count, the lower of the two middle ones otherwise)."""
    if len(values) == 0:
        raise ValueError("median of no values")
    order = np.argsort(np.asarray(values, dtype=np.float64), kind="stable")
    return int(order[(len(values) - 1) // 2])


def ratio_summary(a_values: Sequence[float], b_values: Sequence[float], seed: int = 0,
                  resamples: int = RESAMPLES) -> dict[str, Any]:
    """The ratio of A to B from paired runs: pair i is the i-th run of A and the i-th of B.

    Returns {"median_ratio": median_i(a_i / b_i), "ci95": [lo, hi], "pairs": n, "a": [...],
    "b": [...]}: [lo, hi] is the 2.5th and 97.5th percentile of the median ratio over
    `resamples` bootstrap samples of n pairs drawn with replacement (seeded: the same numbers
    give the same interval). With one pair, or equal ratios, the interval is [r, r]: say so
    rather than read it as certainty (5 pairs or more for a real interval)."""
    a = np.asarray(a_values, dtype=np.float64)
    b = np.asarray(b_values, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"need as many A runs as B runs, at least one, got {a.size} and {b.size}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(b != 0)):
        raise ValueError(f"ratios need finite values and a nonzero B, got A={a.tolist()}, B={b.tolist()}")
    ratios = a / b
    n = ratios.size
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    medians = np.median(ratios[picks], axis=1)
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(medians, [tail, 100 - tail])
    return {"median_ratio": float(np.median(ratios)), "ci95": [float(lo), float(hi)], "pairs": int(n),
            "a": a.tolist(), "b": b.tolist()}


def paired(a_runs: dict[int, float], b_runs: dict[int, float]) -> tuple[list[float], list[float]]:
    """The pairs of two rows measured by repeat: values of the repeats both have, in order."""
    both = sorted(set(a_runs) & set(b_runs))
    return [a_runs[r] for r in both], [b_runs[r] for r in both]


def format_ratio(summary: dict[str, Any] | None, digits: int = 2) -> str:
    """`0.97 [0.93, 1.01]` for a table cell; one pair has no interval: `0.97 (1 pair)`."""
    if summary is None:
        return ""
    r, (lo, hi) = summary["median_ratio"], summary["ci95"]
    if summary["pairs"] < 2:
        return f"{r:.{digits}f} (1 pair)"
    return f"{r:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
