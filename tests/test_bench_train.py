"""`hvdtrain bench train` end to end on tiny settings: it runs, and train.json is well formed.

Not a timed test: the timings depend on the machine and its load, so a measured time is only
checked to be finite and positive; everything derived from it (samples/s, efficiency, comm share)
is recomputed here from the row's raw fields and must agree to rounding, and what does not depend
on timing (steps, bytes per step, block bytes) must equal the value written out here.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from hvdtrain.tools.bench_train import add_ratios, strategies
from hvdtrain.tools.launch import run

NP = 2
SYNC_EVERY = [4]
ROWS, BATCH, HIDDEN = 2000, 32, 16
PARAMETERS = 10 * HIDDEN + HIDDEN + HIDDEN * 1 + 1  # the mlp 10 -> 16 -> 1


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench-train")
    cmd = [sys.executable, "-m", "hvdtrain", "bench", "train", "--np", str(NP), "--out", str(out),
           "--rows", str(ROWS), "--epochs", "1", "--hidden", str(HIDDEN), "--batch-size", str(BATCH),
           "--sync-every", ",".join(map(str, SYNC_EVERY)), "--memory-rows", "8000", "--memory-base-rows", "2000"]
    result = run(cmd, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:]
    return json.loads((out / "train.json").read_text()), result.stdout


def expected_rows() -> set[tuple[str, int]]:
    multi = {label for label, _, _ in strategies(SYNC_EVERY)}
    return {("plain torch", 1), ("single", 1)} | {(s, n) for s in multi for n in range(1, NP + 1)}


@pytest.mark.mpi
def test_one_row_per_strategy_and_rank_count(bench: tuple[dict[str, Any], str]) -> None:
    data, stdout = bench
    keys = [(r["strategy"], r["ranks"]) for r in data["rows"]]
    assert len(keys) == len(set(keys)) and set(keys) == expected_rows()
    assert "samples/s" in stdout and "efficiency" in stdout


def ring_bytes(payload: int, ranks: int) -> int:
    """What one rank sends in a ring allreduce of `payload` bytes: 2 (N - 1) / N of it."""
    return 2 * (ranks - 1) * payload // ranks


def syncs(strategy: str, steps: int) -> int:
    """Allreduces of the whole model (gradients or parameters) in a run of `steps` steps."""
    if strategy.startswith("mpi k="):  # every k steps, and once more at the end if steps % k
        return math.ceil(steps / int(strategy.split("=")[1]))
    if strategy == "no comm":  # k larger than the run: only the final average
        return 1
    return steps  # horovod, ddp: the gradients, every step


@pytest.mark.mpi
def test_rows_are_sane(bench: tuple[dict[str, Any], str]) -> None:
    rows = bench[0]["rows"]
    one = {r["strategy"]: r for r in rows if r["ranks"] == 1}
    for r in rows:
        where = f"{r['strategy']} x{r['ranks']}"
        n = r["ranks"]
        # not timing: every rank trains full batches of its block of the ROWS training rows, one epoch
        assert r["steps"] == (ROWS // n) // BATCH and r["parameters"] == PARAMETERS, where
        # measured: only sane
        assert math.isfinite(r["train_seconds"]) and r["train_seconds"] > 0, where
        assert len(r["peak_rss_bytes"]) == n and all(b > 0 for b in r["peak_rss_bytes"]), where
        assert math.isfinite(r["final_loss"]), where
        # derived, recomputed from the raw fields: samples/s counts every rank's samples
        assert r["samples_per_sec_runs"] == [r["samples_per_sec"]], where  # --repeat 1: the one run
        assert r["samples_per_sec"] == pytest.approx(r["steps"] * BATCH * n / r["train_seconds"], rel=1e-9), where
        # efficiency = samples/s(N) / (N x samples/s(1)) of the same strategy, from the two rows' steps
        # and times; exactly 1 at one rank. (No bound on it beyond that: it is a ratio of two
        # sub-second timings taken at different moments of a shared machine; the definition is
        # what is checked, to rounding.)
        base = one[r["strategy"]]
        expected = (r["steps"] * BATCH * n / r["train_seconds"]) / (n * base["steps"] * BATCH / base["train_seconds"])
        assert r["efficiency"] == pytest.approx(expected, rel=1e-9), where
        if n == 1:
            assert r["efficiency"] == 1.0, where
            assert r["vs_plain"] == pytest.approx(r["samples_per_sec"] / one["plain torch"]["samples_per_sec"],
                                                  rel=1e-12), where
        else:
            assert r["vs_plain"] is None, where
        # the ring model, exactly: float32 parameters or gradients, no buffers in this mlp; nothing at 1 rank
        expected_bytes = ring_bytes(4 * PARAMETERS, n) * syncs(r["strategy"], r["steps"]) / r["steps"]
        assert r["bytes_per_step"] == pytest.approx(expected_bytes, rel=1e-12, abs=0), where
        # a share of the training time: never negative, never above it (rank 0's loop time against
        # the ranks' mean wait; the ranks leave the loop together, a few ms apart at most)
        if r["strategy"] == "ddp":  # DDP's allreduces run inside backward, untimed: n/a, never 0
            assert r["comm_fraction"] is None, where
        else:
            assert 0 <= r["comm_fraction"] <= 1.05, where
    by = {(r["strategy"], r["ranks"]): r for r in rows}
    hvd, k4, none = by[("horovod", NP)], by[(f"mpi k={SYNC_EVERY[0]}", NP)], by[("no comm", NP)]
    assert hvd["bytes_per_step"] > k4["bytes_per_step"] > none["bytes_per_step"] > 0


@pytest.mark.mpi
def test_meta_and_memory(bench: tuple[dict[str, Any], str]) -> None:
    data = bench[0]
    meta = data["meta"]
    assert meta["cores"] == os.cpu_count() and meta["versions"]["torch"] and meta["settings"]["np"] == NP
    assert len(meta["load_before"]) == 3
    assert {(m["strategy"], m["rank"]) for m in data["memory"]} == {
        (s, r) for s in ("horovod", f"mpi k={max(SYNC_EVERY)}") for r in range(NP)}
    for m in data["memory"]:
        assert m["peak_rss_bytes"] > 0 and m["base_rss_bytes"] > 0  # measured: only sane
        assert m["rows"] == 8000 and m["base_rows"] == 2000
        # a rank's block: 8000 / NP training rows and 10% as many held-out rows, 10 float32 features
        # and 1 float32 target each; the model (the small 10-20-1 `net`): its float32 parameters
        assert m["block_bytes"] == (8000 // NP + 800 // NP) * (10 + 1) * 4, m
        assert m["model_bytes"] == 4 * (10 * 20 + 20 + 20 + 1), m
        assert m["excess_bytes"] == m["peak_rss_bytes"] - m["base_rss_bytes"], m


def test_efficiency_is_relative_to_the_same_strategy_at_one_rank() -> None:
    rows = [{"strategy": "plain torch", "ranks": 1, "samples_per_sec": 100.0},
            {"strategy": "horovod", "ranks": 1, "samples_per_sec": 90.0},
            {"strategy": "horovod", "ranks": 2, "samples_per_sec": 162.0}]
    add_ratios(rows)
    assert rows[1]["efficiency"] == 1.0 and rows[2]["efficiency"] == pytest.approx(0.9)
    assert rows[1]["vs_plain"] == pytest.approx(0.9) and rows[2]["vs_plain"] is None


def test_ratios_of_paired_runs_with_intervals() -> None:
    """With every run kept, run i of a row is paired with run i of its reference: efficiency
    against N x the 1-rank run, vs plain against the plain loop's run."""
    runs = {("plain torch", 1): [100.0, 50.0, 80.0], ("horovod", 1): [90.0, 50.0, 72.0],
            ("horovod", 2): [162.0, 80.0, 144.0]}
    rows = [{"strategy": s, "ranks": n, "samples_per_sec": r[0], "samples_per_sec_runs": r}
            for (s, n), r in runs.items()]
    add_ratios(rows)
    # vs plain: 0.9, 1.0, 0.9 -> 0.9; efficiency: 162/180, 80/100, 144/144 -> 0.9
    assert rows[1]["vs_plain_interval"]["median_ratio"] == pytest.approx(0.9)
    assert rows[2]["efficiency_interval"]["median_ratio"] == pytest.approx(0.9)
    assert rows[2]["efficiency_interval"]["b"] == [180.0, 100.0, 144.0]  # N x the 1-rank runs
    lo, hi = rows[2]["efficiency_interval"]["ci95"]
    assert 0.8 - 1e-12 <= lo <= 0.9 <= hi <= 1.0 + 1e-12
    assert rows[1]["efficiency_interval"]["ci95"] == [1.0, 1.0] and rows[2]["vs_plain_interval"] is None
