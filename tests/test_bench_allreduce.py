"""`hvdtrain bench allreduce` runs for real (tiny sizes) and writes well-formed JSON and a PNG.

Benchmarks are not timed tests: nothing here depends on how fast anything is.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from hvdtrain.comm.env import horovod_env_defaults
from hvdtrain.tools.allreduce_impls import DEFAULT_IMPLS, HVDTRAIN_CONFIGURED
from hvdtrain.tools.bench_allreduce import add_ratios, byte_sizes, combine_runs, iterations, make_row, raw_reference
from support.jobs import run_job

ROOT = Path(__file__).resolve().parents[1]
NP = 2
REPEAT = 2  # whole runs of every implementation, interleaved


def available_impls() -> list[str]:
    """Every default implementation, Horovod's included: `make install` always builds Horovod, so
    a missing one is a failure to report, not a row to leave out quietly."""
    return list(DEFAULT_IMPLS)


def test_sizes_iterations_and_row_arithmetic() -> None:
    assert byte_sizes(4, 256 << 20, 4)[-1] == 256 << 20 and 64 << 20 in byte_sizes(4, 256 << 20, 4)
    assert byte_sizes(4, 65536, 2) == [4 << k for k in range(15)]
    with pytest.raises(ValueError, match="min-bytes"):
        byte_sizes(2, 100, 4)
    assert iterations(4, 3, 5) == (3, 3)
    warm, timed = iterations(256 << 20, 200, 5)
    assert 10 <= timed < 200 and warm == 5
    row = make_row("mpi4py", 4, 1 << 20, 1e-3)
    assert math.isclose(row["busbw_gbps"], row["algbw_gbps"] * 2 * 3 / 4)
    copy = make_row("memcpy", 1, 64, 1e-6)
    assert copy["busbw_gbps"] == copy["algbw_gbps"]


def test_repeats_combine_into_medians_and_paired_ratios() -> None:
    """Run i of an implementation is paired with run i of raw MPI under the same environment."""
    us = {("mpi4py-tuned", 0): 100.0, ("mpi4py-tuned", 1): 200.0, ("mpi4py-tuned", 2): 120.0,
          ("hvdtrain-mpi", 0): 125.0, ("hvdtrain-mpi", 1): 200.0, ("hvdtrain-mpi", 2): 100.0,
          ("mpi4py", 0): 400.0, ("mpi4py", 1): 400.0, ("mpi4py", 2): 400.0}
    lines = [{**make_row(impl, 2, 1 << 20, t * 1e-6), "repeat": rep} for (impl, rep), t in us.items()]
    rows = combine_runs(lines[::-1])  # any order in the file
    add_ratios(rows)
    by = {r["impl"]: r for r in rows}
    mine, tuned = by["hvdtrain-mpi"], by["mpi4py-tuned"]
    assert mine["repeats"] == [0, 1, 2] and mine["p50_us_runs"] == pytest.approx([125.0, 200.0, 100.0])
    assert mine["p50_us"] == pytest.approx(125.0) and tuned["p50_us"] == pytest.approx(120.0)  # medians
    assert mine["vs_raw_impl"] == "mpi4py-tuned" and mine["vs_raw"] == pytest.approx(120 / 125)
    # busbw ratios per pair: 100/125, 200/200, 120/100 -> median 1.0 (not the ratio of the medians)
    assert mine["vs_raw_interval"]["median_ratio"] == pytest.approx(1.0)
    assert mine["vs_raw_interval"]["pairs"] == 3
    lo, hi = mine["vs_raw_interval"]["ci95"]
    assert 0.8 - 1e-9 <= lo <= 1.0 <= hi <= 1.2 + 1e-9
    assert tuned["vs_raw_impl"] == "mpi4py" and tuned["vs_raw_interval"]["median_ratio"] == pytest.approx(400 / 120)
    assert by["mpi4py"]["vs_raw"] is None and by["mpi4py"]["vs_raw_interval"] is None
    assert raw_reference("hvdtrain-ring", {"mpi4py"}) == "mpi4py"  # only stock raw MPI ran
    assert raw_reference("horovod-mpi-stock", {"mpi4py", "mpi4py-tuned"}) == "mpi4py"
    assert raw_reference("memcpy", {"mpi4py"}) is None and raw_reference("horovod-mpi", set()) is None


def test_horovod_env_defaults_are_environment_strings() -> None:
    env = horovod_env_defaults()
    assert env and all(k.replace("_", "").isalnum() and isinstance(v, str) for k, v in env.items())


def test_collective_tuning_only_when_known_single_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"):  # a rank, as mpirun starts it
        monkeypatch.setenv(key, "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    assert any(k.startswith("OMPI_MCA_coll_tuned") for k in horovod_env_defaults())
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")  # two hosts: leave Open MPI's choice
    env = horovod_env_defaults()
    assert not any(k.startswith("OMPI_MCA_coll_tuned") for k in env)
    assert env["THP_MEM_ALLOC_ENABLE"] == "1"


def test_bench_jobs_get_hvdtrain_env_but_user_values_win(monkeypatch: pytest.MonkeyPatch) -> None:
    from hvdtrain.tools.bench_allreduce import job_env
    key = next(iter(horovod_env_defaults()))
    monkeypatch.delenv(key, raising=False)
    assert job_env("horovod-mpi")[key] == horovod_env_defaults()[key]
    assert key not in job_env("horovod-mpi-stock") and key not in job_env("mpi4py")
    monkeypatch.setenv(key, "user-value")
    assert job_env("horovod-mpi")[key] == "user-value"


@pytest.mark.mpi
def test_bench_writes_json_table_and_png(tmp_path: Path) -> None:
    impls = available_impls()
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "hvdtrain.tools.bench_allreduce", "--np", str(NP), "--out", str(out),
           "--max-bytes", "65536", "--iters", "3", "--timeout", "240", "--impls", ",".join(impls),
           "--repeat", str(REPEAT)]
    result = run_job(cmd, timeout=900, cwd=ROOT)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"

    doc = json.loads((out / "allreduce.json").read_text())
    meta, rows = doc["meta"], doc["rows"]
    assert meta["failed"] == {} and meta["settings"]["np"] == NP and meta["settings"]["repeat"] == REPEAT
    for key in ("host", "cores", "torch", "horovod", "mpi", "mpi4py"):
        assert meta[key], key
    sizes = byte_sizes(4, 65536, meta["settings"]["factor"])
    for impl in impls:
        mine = [r for r in rows if r["impl"] == impl]
        assert [r["bytes"] for r in mine] == sizes, impl  # every size, increasing
        n = 1 if impl == "memcpy" else NP
        for r in mine:
            assert r["np"] == n
            assert math.isfinite(r["p50_us"]) and r["p50_us"] > 0, r
            algbw = r["bytes"] / (r["p50_us"] * 1e-6) / 1e9
            assert math.isclose(r["algbw_gbps"], algbw, rel_tol=1e-9), r
            factor = 1.0 if impl == "memcpy" else 2 * (n - 1) / n
            assert math.isclose(r["busbw_gbps"], r["algbw_gbps"] * factor, rel_tol=1e-9), r
            # every round ran every implementation; the row's p50 is the median of the runs' p50s
            assert r["repeats"] == list(range(REPEAT)) and len(r["p50_us_runs"]) == REPEAT, r
            assert math.isclose(r["p50_us"], sorted(r["p50_us_runs"])[0] / 2 + sorted(r["p50_us_runs"])[1] / 2,
                                rel_tol=1e-9), r
            # raw MPI under the same rank environment: tuned for what hvdtrain configures
            ref = {"mpi4py": None, "memcpy": None, "mpi4py-tuned": "mpi4py"}.get(
                impl, "mpi4py-tuned" if impl in HVDTRAIN_CONFIGURED else "mpi4py")
            assert r["vs_raw_impl"] == ref, r
            if ref is None:
                assert r["vs_raw_interval"] is None, r
                continue
            raw = next(x for x in rows if x["impl"] == ref and x["bytes"] == r["bytes"])
            ratios = sorted(p / q for p, q in zip(raw["p50_us_runs"], r["p50_us_runs"]))  # busbw ratio = time ratio
            interval = r["vs_raw_interval"]
            assert interval["pairs"] == REPEAT and math.isclose(interval["median_ratio"], sum(ratios) / 2,
                                                                 rel_tol=1e-9), r
            assert ratios[0] - 1e-12 <= interval["ci95"][0] <= interval["ci95"][1] <= ratios[1] + 1e-12, r
    assert {r["impl"] for r in rows} == set(impls)
    lines = result.stdout.splitlines()
    for impl in impls:  # the printed table has one line per row
        assert sum(line.startswith(f"{impl} ") for line in lines) == len(sizes), impl
    assert "x raw [95% CI]" in result.stdout

    png = (out / "allreduce.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_bad_arguments_fail_with_a_message(tmp_path: Path) -> None:
    from hvdtrain.tools.bench_allreduce import main
    assert main(["--out", str(tmp_path), "--max-bytes", "2"]) == 2
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--repeat", "0"])
    with pytest.raises(SystemExit):
        main(["--impls", "nccl"])
