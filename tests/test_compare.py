"""`hvdtrain compare` end to end: two ranks, each strategy launched for real on a tiny set.

Checks what the strategies must agree on by construction: Horovod's gradient allreduce and the
MPI fallback averaging every step (k=1, alpha=1, equal blocks, plain SGD) are the same update,
so their losses match to float rounding, and averaging every 4 steps sends a quarter of the
bytes (plus one final average when the step count is not a multiple of 4).
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

from hvdtrain.tools.launch import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("compare")
    cmd = [sys.executable, "-m", "hvdtrain", "compare", "--np", "2", "--out", str(out), "--rows", "2000",
           "--epochs", "1", "--sync-every", "1,4"]
    result = run(cmd, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    return out, result.stdout


@pytest.mark.mpi
def test_one_run_per_strategy(report: tuple[Path, str]) -> None:
    out, stdout = report
    data = json.loads((out / "compare.json").read_text())
    assert data["np"] == 2
    assert [r["label"] for r in data["runs"]] == ["horovod", "mpi k=1", "mpi k=4", "ddp"]
    summaries = [r["summary"] for r in data["runs"]]
    assert [s["backend"] for s in summaries] == ["horovod", "mpi", "mpi", "ddp"]
    assert [s["sync_every"] for s in summaries[1:3]] == [1, 4]
    assert all(s["world_size"] == 2 and s["steps"] >= 1 for s in summaries)
    assert len({s["samples"] for s in summaries}) == 1, "every strategy must see the same number of samples"
    for s in summaries:
        # every rank takes every step with a full batch (default 64 per rank): samples follow from steps
        assert s["samples"] == s["steps"] * 64 * 2 and s["steps_by_rank"] == [s["steps"]] * 2, s
        assert math.isfinite(s["final_loss"]) and s["train_seconds"] > 0  # measured: only sane
        assert s["samples_per_sec"] == pytest.approx(s["samples"] / s["train_seconds"], rel=1e-12)
    for label in ("horovod", "mpi k=1", "mpi k=4"):
        assert label in stdout
    # comm share: measured where hvdtrain times the wait; DDP's allreduces run inside backward,
    # untimed, so its share is n/a (None in the JSON), never 0.0
    assert [s["comm_seconds"] is None for s in summaries] == [False, False, False, True]
    ddp_row = next(line for line in stdout.splitlines() if line.startswith("ddp "))
    assert ddp_row.split()[-1] == "n/a", ddp_row


@pytest.mark.mpi
def test_horovod_equals_mpi_averaging_every_step(report: tuple[Path, str]) -> None:
    runs = {r["label"]: r["summary"] for r in json.loads((report[0] / "compare.json").read_text())["runs"]}
    hvd, mpi, ddp = runs["horovod"], runs["mpi k=1"], runs["ddp"]
    for key in ("final_loss", "eval_loss"):
        assert hvd[key] == pytest.approx(mpi[key], rel=1e-5), key
        assert hvd[key] == pytest.approx(ddp[key], rel=1e-5), key  # DDP: the same gradient average
    # the ring model, written out: each allreduce of P bytes sends 2(N - 1)/N P per rank; Horovod and
    # DDP allreduce the float32 gradients every step, MPI k=1 the float32 parameters (the default
    # 10-20-1 net has no buffers), so all three send the same bytes
    per_step = 2 * (2 - 1) * (hvd["parameters"] * 4) // 2
    assert hvd["parameters"] == 10 * 20 + 20 + 20 * 1 + 1
    for s in (hvd, mpi, ddp):
        assert s["bytes_communicated"] == s["steps"] * per_step, s


@pytest.mark.mpi
def test_averaging_every_4_steps_sends_a_quarter(report: tuple[Path, str]) -> None:
    runs = {r["label"]: r["summary"] for r in json.loads((report[0] / "compare.json").read_text())["runs"]}
    k1, k4 = runs["mpi k=1"], runs["mpi k=4"]
    steps = k1["steps"]
    assert k4["steps"] == steps
    per_sync = k1["bytes_communicated"] / steps  # k=1 averages once per step
    assert k4["bytes_communicated"] == pytest.approx(math.ceil(steps / 4) * per_sync)
    assert abs(k4["bytes_communicated"] / k1["bytes_communicated"] - 1 / 4) <= 1 / steps


@pytest.mark.mpi
def test_report_and_plots(report: tuple[Path, str]) -> None:
    out = report[0]
    text = (out / "report.md").read_text()
    assert "| strategy |" in text
    for label in ("horovod", "mpi k=1", "mpi k=4"):
        assert f"| {label} |" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) >= 3, text
    for name in images:
        path = out / name
        assert path.is_file(), f"report.md links {name}, which is missing"
        assert path.read_bytes()[:8] == PNG_MAGIC, f"{name} is not a PNG file"
        assert path.stat().st_size > 1000


@pytest.mark.parametrize("missing", ["package", "horovodrun"])
def test_without_horovod_compare_says_how_to_get_it_before_writing(missing, tmp_path, monkeypatch, capsys):
    """The core installs without Horovod (`pip install .`); compare, which runs Horovod too, then
    says so in one line with the pip and make routes, exit 2, before any data is written."""
    import importlib.util
    import shutil
    import subprocess

    from hvdtrain.cli import main

    real_find_spec, real_which = importlib.util.find_spec, shutil.which
    if missing == "package":
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "horovod" else real_find_spec(name, *a))
    else:
        monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "horovodrun" else real_which(cmd, *a, **k))

    def no_launch(*args, **kwargs):
        raise AssertionError(f"launched {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    out = tmp_path / "out"
    assert main(["compare", "--np", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--horovod-wheel" in err and "make install" in err, err
    assert ("Horovod is not installed" if missing == "package" else "horovodrun is not beside") in err, err
    assert not out.exists()
