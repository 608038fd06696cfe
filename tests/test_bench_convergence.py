"""`hvdtrain bench convergence` end to end on --tiny settings (np 2, one host), and its arithmetic.

Not a timed test: only the JSON's shape and sanity are checked, and the derived numbers (gap to
Horovod's final held-out loss, time to reach it) are recomputed here from the evaluations the
JSON itself holds.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from hvdtrain.tools.bench_convergence import TINY, TINY_K, WORKLOADS, strategies, time_to
from hvdtrain.tools.launch import run

NP = 2


def strict_json(text: str) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("bench-convergence")
    # --tiny as it is: fewer epochs (1 or 2) end the outer-Nesterov cells with a NaN held-out loss
    # (BatchNorm running_var extrapolated negative; measured), which the test rightly refuses.
    # 18 runs took 4-9 minutes on the shared 2-core machine: the limit is well above that.
    cmd = [sys.executable, "-m", "hvdtrain", "bench", "convergence", "--tiny", "--np", str(NP), "--out", str(out),
           "--network-label", "ci one host", "--timeout", "300"]
    result = run(cmd, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:]
    return strict_json((out / "convergence.json").read_text()), result.stdout, out


def interpolated_time(evals: list[dict[str, Any]], target: float) -> float | None:
    """The definition, written out again: first row at or below target, linear from the row before."""
    for i, row in enumerate(evals):
        if row["eval_loss"] is not None and row["eval_loss"] <= target:
            if i == 0 or evals[i - 1]["eval_loss"] is None:
                return row["train_seconds"]
            a, b = evals[i - 1], row
            if a["eval_loss"] == b["eval_loss"]:
                return b["train_seconds"]
            return a["train_seconds"] + (b["train_seconds"] - a["train_seconds"]) * \
                (a["eval_loss"] - target) / (a["eval_loss"] - b["eval_loss"])
    return None


@pytest.mark.mpi
def test_every_cell_is_there_with_finite_losses(bench: tuple[dict[str, Any], str, Path]) -> None:
    data, stdout, _ = bench
    meta = data["meta"]
    assert meta["settings"]["tiny"] and meta["settings"]["np"] == NP and meta["settings"]["k"] == TINY_K
    assert meta["network"]["label"] == "ci one host" and meta["network"]["hosts"] == "local"
    assert meta["cores"] >= 1 and meta["versions"]["torch"]
    expected = set()
    for name in WORKLOADS:
        w = meta["workloads"][name]
        assert w["eval_every"] % TINY_K == 0 and w["warmup"] % TINY_K == 0 and 0 < w["warmup"] < w["steps"]
        keys = [key for key, _ in strategies(TINY_K, w["warmup"], hierarchy=False)]
        assert list(w["strategies"]) == keys
        expected |= {(name, lr, key) for lr in TINY[name]["lrs"] for key in keys}
    got = [(c["workload"], c["lr"], c["key"]) for c in data["cells"]]
    assert len(got) == len(set(got)) and set(got) == expected
    for c in data["cells"]:
        where = f"{c['workload']} lr {c['lr']} {c['strategy']}"
        assert "error" not in c, where
        assert c["evals"] and math.isfinite(c["evals"][-1]["eval_loss"]), where
        # NaN (null) evaluations mid-run are tolerated only with an outer optimizer: it extrapolates
        # BatchNorm running_var along with the parameters, which can turn it negative between syncs
        if "--outer-optimizer" not in c["flags"]:
            assert all(e["eval_loss"] is not None and math.isfinite(e["eval_loss"]) for e in c["evals"]), where
        assert c["nan_evals"] == sum(e["eval_loss"] is None for e in c["evals"]), where
        steps = [e["step"] for e in c["evals"]]
        assert steps == sorted(steps) and steps[-1] == meta["workloads"][c["workload"]]["steps"] == c["steps"], where
        every = meta["workloads"][c["workload"]]["eval_every"]
        assert all(s % every == 0 for s in steps[:-1]), where
        assert c["eval_loss"] == c["evals"][-1]["eval_loss"] and c["train_seconds"] > 0, where
        if c["workload"] != "mlp":
            assert 0 <= c["eval_accuracy"] <= 1, where
        assert c["strategy"] in stdout, where


@pytest.mark.mpi
def test_gaps_and_times_follow_from_the_evaluations(bench: tuple[dict[str, Any], str, Path]) -> None:
    cells = bench[0]["cells"]
    for c in cells:
        hvd = next(h for h in cells if (h["workload"], h["lr"], h["key"]) == (c["workload"], c["lr"], "horovod"))
        target = hvd["evals"][-1]["eval_loss"]
        where = f"{c['workload']} lr {c['lr']} {c['strategy']}"
        assert c["target_loss"] == target, where
        assert c["gap"] == pytest.approx((c["evals"][-1]["eval_loss"] - target) / target, rel=1e-12, abs=1e-15), where
        mine, theirs = interpolated_time(c["evals"], target), interpolated_time(hvd["evals"], target)
        if mine is None:
            assert c["time_to_target"] is None and c["time_ratio"] is None, where
        else:
            assert c["time_to_target"] == pytest.approx(mine, rel=1e-12), where
            assert c["time_ratio"] == pytest.approx(mine / theirs, rel=1e-12), where
        if c["key"] == "horovod":
            assert c["gap"] == 0 and c["time_ratio"] == 1.0, where
            assert c["time_to_target"] <= c["evals"][-1]["train_seconds"], where


@pytest.mark.mpi
def test_table_and_plots_are_written(bench: tuple[dict[str, Any], str, Path]) -> None:
    _, stdout, out = bench
    assert "to target s" in stdout and "x horovod" in stdout
    assert "| workload |" in (out / "convergence.md").read_text()
    for name in WORKLOADS:
        png = (out / f"loss_vs_time_{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000, name


def test_time_to_target_interpolates_and_says_never() -> None:
    evals = [{"step": 4, "train_seconds": 1.0, "eval_loss": 2.0},
             {"step": 8, "train_seconds": 2.0, "eval_loss": 1.0},
             {"step": 12, "train_seconds": 3.0, "eval_loss": 0.5}]
    assert time_to(evals, 1.5) == pytest.approx(1.5)
    assert time_to(evals, 0.5) == pytest.approx(3.0)
    assert time_to(evals, 3.0) == pytest.approx(1.0)    # already there at the first evaluation
    assert time_to(evals, 0.1) is None
    nan = {"step": 6, "train_seconds": 1.5, "eval_loss": None}  # a NaN evaluation: no interpolation across it
    assert time_to([*evals[:1], nan, *evals[1:]], 1.5) == pytest.approx(2.0)
    assert time_to([*evals[:1], nan], 1.5) is None


@pytest.mark.parametrize("args", [["--workloads", "cnn,vgg"], ["--lrs", "cnn=fast"], ["--lrs", "-0.1"],
                                  ["--np", "1"], ["--k", "16", "--eval-every", "24"], ["--strategies", "k,ddp"],
                                  ["--hosts-from-env"], ["--workloads", "cnn", "--epochs", "1", "--k", "64"],
                                  ["--tuned-outer", "1.0"], ["--nonsense"], ["--strategies", "seconds"],
                                  ["--sync-seconds", "-1"], ["--slow-rank-factor", "0.5"],
                                  ["--slow-rank-factor", "2", "--workloads", "mlp"]])
def test_bad_arguments_exit_2_with_one_line_before_launching(args: list[str], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from hvdtrain.tools.bench import main
    monkeypatch.delenv("HOSTS", raising=False)
    out = tmp_path / "out"
    try:
        code = main(["convergence", *args, "--out", str(out)])
    except SystemExit as exc:  # argparse's own errors (cli.Parser: one line, exit 2)
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvdtrain: error: "), captured.err
    assert captured.out == "" and not out.exists()


def test_hosts_from_env_spreads_ranks_evenly_and_adds_hierarchy(monkeypatch: pytest.MonkeyPatch) -> None:
    from hvdtrain.tools.bench_convergence import hosts_from_env
    monkeypatch.setenv("HOSTS", "198.18.0.1:1,198.18.0.2:1")  # as mpi_jobs/cluster_local.sh exports it
    assert hosts_from_env(4) == "198.18.0.1:2,198.18.0.2:2"
    with pytest.raises(ValueError, match="--np 2"):
        hosts_from_env(3)
    labels = {key: v.label for key, v in strategies(16, 48, hierarchy=True)}
    assert labels["hier"] == "hier 4,16" and "hier" not in dict(strategies(16, 48, hierarchy=False))


def test_ranks_get_hvdtrain_mpi_settings_at_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m mpi4py` starts MPI before hvdtrain runs: the settings must be in the launch env."""
    from hvdtrain.tools.bench_convergence import rank_env
    monkeypatch.delenv("OMPI_MCA_mpi_yield_when_idle", raising=False)
    monkeypatch.delenv("OMPI_MCA_coll_tuned_allreduce_algorithm", raising=False)
    local, across = rank_env(2, None), rank_env(4, "198.18.0.1:2,198.18.0.2:2")
    assert local["OMPI_MCA_mpi_yield_when_idle"] == "1" and local["OMPI_MCA_coll_tuned_allreduce_algorithm"] == "5"
    assert across["OMPI_MCA_mpi_yield_when_idle"] == "1" and "OMPI_MCA_coll_tuned_allreduce_algorithm" not in across
    monkeypatch.setenv("OMPI_MCA_mpi_yield_when_idle", "0")  # what the user exported wins
    assert "OMPI_MCA_mpi_yield_when_idle" not in rank_env(2, None)


def test_slowed_rank_wraps_the_workload_model_and_seconds_is_a_strategy() -> None:
    from hvdtrain.tools.bench_convergence import throttled
    flags = WORKLOADS["resnet"].flags
    out = throttled(flags, 2.0, 1)
    assert out[:3] == ("--model", "hvdtrain.examples.throttle:Throttled", "--model-args")
    assert json.loads(out[3]) == {"model": "hvdtrain.examples.resnet:resnet18", "factor": 2.0, "rank": 1,
                                  "args": {"num_classes": 10}}
    rest = [f for i, f in enumerate(flags) if f not in ("--model", "--model-args")
            and (i == 0 or flags[i - 1] not in ("--model", "--model-args"))]
    assert list(out[4:]) == rest
    timed = dict(strategies(16, 48, hierarchy=False, seconds=0.5, eval_syncs=3))["seconds"]
    nesterov = dict(strategies(16, 48, hierarchy=False, seconds=0.5))["seconds_nesterov"]
    assert nesterov.flags[:6] == ["--backend", "mpi", "--sync-every-seconds", "0.5", "--eval-every", "1"]
    assert "--outer-optimizer" in nesterov.flags
    assert timed.flags == ["--backend", "mpi", "--sync-every-seconds", "0.5", "--eval-every", "3"]
    assert "seconds" not in dict(strategies(16, 48, hierarchy=False))
