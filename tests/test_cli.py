"""The command line, run for real in subprocesses."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import hvdtrain
from support.jobs import run_job


def hvdtrain_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return run_job([sys.executable, "-m", "hvdtrain", *args], timeout=timeout)


def test_package_imports_with_version():
    assert hvdtrain.__version__.count(".") == 2


def test_version_from_console_script_and_module():
    import platform
    from importlib import metadata
    expected = [f"hvdtrain {hvdtrain.__version__} (Python {platform.python_version()})",
                *(f"{dist} {metadata.version(dist)}" for dist in ("torch", "horovod", "mpi4py"))]
    mpi = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30).stdout
    version = mpi.split("\n")[0].split()[-1]  # "mpirun (Open MPI) 4.1.4"
    script = run_job([str(__import__("pathlib").Path(sys.executable).parent / "hvdtrain"), "--version"], timeout=60)
    for result in (script, hvdtrain_cli("--version")):
        assert result.returncode == 0 and result.stdout.splitlines() == [*expected, f"MPI Open MPI v{version}"], \
            result.stdout


def test_single_process_training_writes_outputs(tmp_path):
    out = tmp_path / "run"
    result = hvdtrain_cli("train", "--backend", "single", "--rows", "4000", "--epochs", "2", "--lr", "0.05",
                          "--out", str(out), "--checkpoint-every", "50")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, summary["steps"] + 1))
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["samples"] == summary["steps"] * 64
    assert (out / "model.pt").is_file() and list((out / "checkpoints").glob("ckpt-*.pt"))
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("args,needle", [
    (["train", "--lr", "-1"], "lr must be > 0"),
    (["train", "--backend", "nccl"], "backend 'nccl' is unknown"),
    (["train", "--epochs", "x"], "invalid int value"),
    (["train", "--config", "/nonexistent.toml"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    result = hvdtrain_cli(*args)
    assert result.returncode == 2
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_data_make_writes_a_readable_set(tmp_path):
    result = hvdtrain_cli("data", "make", "regression", "--rows", "500", "--out", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["rows"] == 500 and meta["task"] == "regression"
