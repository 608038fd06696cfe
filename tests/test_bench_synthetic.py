"""`hvdtrain bench synthetic` on tiny settings: it runs every row, synthetic.json is well formed and
its numbers are sane; bad arguments are one line and exit 2 before anything is launched.

Not a timed test: img/s depends on the machine and its load; only sanity is checked.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

from hvdtrain.tools import bench_synthetic as B
from hvdtrain.tools.launch import run

NP = 2
ITERS = 3
# Every row but the hand-written Horovod loop under hvdtrain's environment: the same code as the
# stock hand-written row (only the launch environment differs), left out to keep the test short.
SELECTED = [name for name in B.strategy_names() if name != "horovod-hand-env"]
TINY = ["--np", str(NP), "--model", "hvdtrain.examples.digits_cnn:DigitsCNN", "--model-args",
        '{"num_classes": 10}', "--channels", "1", "--image-size", "8", "--batch-size", "8",
        "--num-warmup-batches", "1", "--num-batches-per-iter", "2", "--num-iters", str(ITERS)]


def threads_per_rank() -> int:
    """cores // ranks, written out here: the cores this process may run on (its affinity, which
    the benchmark's ranks inherit), divided among the NP ranks of a row, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // NP)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench-synthetic")
    cmd = [sys.executable, "-m", "hvdtrain", "bench", "synthetic", *TINY, "--strategies", ",".join(SELECTED),
           "--out", str(out)]
    result = run(cmd, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    return json.loads((out / "synthetic.json").read_text()), result.stdout


@pytest.mark.mpi
def test_every_registry_strategy_and_peer_has_a_row(bench: tuple[dict[str, Any], str]) -> None:
    from hvdtrain.strategies import variants
    data, stdout = bench
    labels = [r["strategy"] for r in data["rows"]]
    expected = [v.label for v in variants([1])] + ["horovod (hand-written)", "ddp (hand-written)", "plain torch"]
    assert sorted(labels) == sorted(expected) and not data["failed"]
    assert {r["strategy"]: r["ranks"] for r in data["rows"]}["plain torch"] == 1
    assert all(r["ranks"] == NP for r in data["rows"] if r["strategy"] != "plain torch")
    for header in ("img/s per rank", "img/s total", "vs hand-written hvd", "vs plain"):
        assert header in stdout


@pytest.mark.mpi
def test_numbers_are_sane(bench: tuple[dict[str, Any], str]) -> None:
    """Measured rates can only be finite and positive; everything derived from them is recomputed
    here from the per-iteration values in the JSON and must agree to rounding."""
    by = {r["strategy"]: r for r in bench[0]["rows"]}
    plain, hand = by["plain torch"], by["horovod (hand-written)"]
    for r in bench[0]["rows"]:
        where = r["strategy"]
        mean, ci, total = r["img_per_sec_per_rank_mean"], r["img_per_sec_per_rank_ci95"], r["img_per_sec_total"]
        assert len(r["img_per_sec_by_rank"]) == r["ranks"], where
        assert all(len(v) == ITERS and all(math.isfinite(x) and x > 0 for x in v)
                   for v in r["img_per_sec_by_rank"]), where
        pooled = [x for v in r["img_per_sec_by_rank"] for x in v]  # every rank's iterations
        assert mean == pytest.approx(statistics.fmean(pooled), rel=1e-12), where
        assert ci == pytest.approx(1.96 * statistics.pstdev(pooled), rel=1e-9, abs=1e-9), where
        assert total == pytest.approx(mean * r["ranks"], rel=1e-12), where
        assert r["vs_plain"] == pytest.approx(mean / plain["img_per_sec_per_rank_mean"], rel=1e-12), where
        if r["ranks"] == hand["ranks"]:
            assert r["vs_handwritten_horovod"] == pytest.approx(total / hand["img_per_sec_total"], rel=1e-12), where
        else:  # the one-process loop: no hand-written Horovod row with its rank count
            assert r["vs_handwritten_horovod"] is None, where
        # the rule, on any machine: every rank of every row (the one-process loop too, so rows compare
        # per rank) runs max(1, cores // NP) torch threads, cores being those this process may use
        assert r["threads"] == [threads_per_rank()] * r["ranks"], where
    assert by["plain torch"]["vs_plain"] == 1 and by["horovod (hand-written)"]["vs_handwritten_horovod"] == 1


@pytest.mark.mpi
def test_meta_records_machine_and_settings(bench: tuple[dict[str, Any], str]) -> None:
    meta = bench[0]["meta"]
    assert meta["versions"]["torch"] and meta["versions"]["horovod"] and meta["cores"] >= 1
    assert meta["threads_per_rank"] == threads_per_rank() and meta["settings"]["num_iters"] == ITERS
    assert meta["settings"]["num_classes"] == 10 and "synthetic" in meta["command"]
    assert "OMPI_MCA_mpi_yield_when_idle" in meta["rank_env"]["hvdtrain"]


def test_totals_and_ratios() -> None:
    rec = [{"img_per_sec": [10.0, 30.0], "threads": 1}, {"img_per_sec": [20.0, 20.0], "threads": 1}]
    hand, mine, plain = (B.Job("horovod (hand-written)", "horovod-hand", "horovodrun", 2, "stock", []),
                         B.Job("horovod", "strategy", "horovodrun", 2, "hvdtrain", []),
                         B.Job("plain torch", "plain", "python", 1, "stock", []))
    rows = [B.row_of(hand, [rec]), B.row_of(mine, [rec, rec]),
            B.row_of(plain, [[{"img_per_sec": [40.0], "threads": 2}]])]
    B.add_ratios(rows)
    assert rows[0]["img_per_sec_per_rank_mean"] == 20 and rows[0]["img_per_sec_total"] == 40
    assert rows[0]["img_per_sec_per_rank_ci95"] == pytest.approx(1.96 * math.sqrt(50))
    assert rows[1]["img_per_sec_by_rank"] == [[10, 30, 10, 30], [20, 20, 20, 20]]  # repeats pooled
    assert rows[1]["vs_handwritten_horovod"] == 1 and rows[1]["vs_plain"] == 0.5
    assert rows[2]["vs_handwritten_horovod"] is None and rows[2]["vs_plain"] == 1
    assert "20.0 +- 13.9" in B.format_table(rows)
    # one run each: the paired ratio is the point ratio, an interval of one pair
    assert rows[1]["img_per_sec_per_rank_runs"] == [20.0, 20.0]  # each run's mean over its ranks' iterations
    assert rows[1]["vs_handwritten_horovod_interval"] is None  # 2 runs against 1: no pairs to form
    assert rows[2]["vs_plain_interval"]["ci95"] == [1.0, 1.0] and rows[2]["vs_plain_interval"]["pairs"] == 1


def test_paired_ratios_over_interleaved_runs() -> None:
    hand, mine = (B.Job("horovod (hand-written)", "horovod-hand", "horovodrun", 2, "stock", []),
                  B.Job("horovod", "strategy", "horovodrun", 2, "hvdtrain", []))
    rec = lambda a, b: [{"img_per_sec": [a], "threads": 1}, {"img_per_sec": [b], "threads": 1}]  # noqa: E731
    rows = [B.row_of(hand, [rec(10, 10), rec(20, 20), rec(30, 30)]),
            B.row_of(mine, [rec(9, 11), rec(19, 19), rec(30, 36)])]  # run means 10, 19, 33
    B.add_ratios(rows)
    s = rows[1]["vs_handwritten_horovod_interval"]
    assert s["a"] == [10, 19, 33] and s["b"] == [10, 20, 30] and s["median_ratio"] == pytest.approx(1.0)
    assert 0.95 - 1e-12 <= s["ci95"][0] <= 1.0 <= s["ci95"][1] <= 1.1 + 1e-12
    assert "1.000 [" in B.format_table(rows)


@pytest.mark.parametrize("change, words", [
    ({"--model": "no_such_module:Net"}, "no_such_module"),
    ({"--model": "hvdtrain.examples.digits_cnn:NoSuchNet"}, "NoSuchNet"),
    ({"--model-args": "{bad json"}, "--model-args"),
    ({"--model-args": '{"no_such_arg": 1}'}, "no_such_arg"),
    ({"--channels": "3"}, "--channels"),
    ({"--num-iters": "0"}, "--num-iters"),
    ({"--batch-size": "-1"}, "--batch-size"),
    ({"--num-warmup-batches": "-1"}, "--num-warmup-batches"),
    ({"--np": "0"}, "--np"),
    ({"--strategies": "horovod,nccl"}, "'nccl'"),
])
def test_bad_arguments_are_one_line_before_any_launch(change: dict[str, str], words: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*TINY, "--out", str(tmp_path / "out")]
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    try:
        code = B.main(argv)
    except SystemExit as exc:  # argparse-level errors (bad JSON) exit from the parser
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("hvdtrain: error: ") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "out").exists()  # nothing launched, nothing written


def test_cli_dispatches_synthetic(tmp_path: Path) -> None:
    result = run([sys.executable, "-m", "hvdtrain", "bench", "synthetic", "--num-iters", "0", "--out",
                  str(tmp_path)], timeout=120)
    assert result.returncode == 2 and result.stdout.startswith("hvdtrain: error: --num-iters"), result.stdout


def test_ratio_against_the_hand_written_loop_in_hvdtrains_environment() -> None:
    """`--strategies horovod,horovod-hand-env`: the like-for-like ratio (same rank environment) is
    its own column, paired run by run; without the stock-environment loop the other stays empty."""
    env = B.Job(B.HAND_HOROVOD_ENV, "horovod-hand", "horovodrun", 2, "hvdtrain", [])
    mine = B.Job("horovod", "strategy", "horovodrun", 2, "hvdtrain", [])
    rec = lambda a: [{"img_per_sec": [a], "threads": 1}, {"img_per_sec": [a], "threads": 1}]  # noqa: E731
    rows = [B.row_of(mine, [rec(9), rec(18), rec(33)]), B.row_of(env, [rec(10), rec(20), rec(30)])]
    B.add_ratios(rows)
    s = rows[0]["vs_handwritten_horovod_env_interval"]
    assert s["a"] == [9, 18, 33] and s["b"] == [10, 20, 30] and s["median_ratio"] == pytest.approx(0.9)
    assert rows[0]["vs_handwritten_horovod_env"] == pytest.approx(60 / 60)
    assert rows[0]["vs_handwritten_horovod"] is None and rows[1]["vs_handwritten_horovod_env"] == 1
    assert "0.900 [" in B.format_table(rows)
