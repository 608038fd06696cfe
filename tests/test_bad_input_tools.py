"""Bad input to `hvdtrain data make` and `hvdtrain compare`: one line, exit 2, nothing written or launched."""
from __future__ import annotations

import subprocess
import sys

import pytest

from hvdtrain.tools.launch import launcher_env
from support.jobs import run_job


def hvdtrain(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return run_job([sys.executable, "-m", "hvdtrain", *args], timeout=120, env=launcher_env(), cwd=cwd)


def one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvdtrain: error"), result.stderr
    assert needle in lines[0] and "Traceback" not in result.stderr + result.stdout
    assert "mpirun" not in result.stdout + result.stderr.replace("--np", "")  # nothing was launched


@pytest.mark.parametrize("args,needle", [
    (["--rows", "-5"], "--rows -5"),
    (["--rows", "0"], "--rows 0"),
    (["--seed", "-1"], "--seed -1"),
])
def test_data_make_out_of_range(tmp_path, args, needle):
    result = hvdtrain("data", "make", "regression", "--out", str(tmp_path / "d"), *args)
    one_line_error(result, needle)
    assert not (tmp_path / "d").exists()


def test_data_make_refuses_an_existing_folder_unless_overwrite(tmp_path):
    out = tmp_path / "d"
    assert hvdtrain("data", "make", "regression", "--rows", "100", "--out", str(out)).returncode == 0
    before = (out / "X.npy").read_bytes()
    result = hvdtrain("data", "make", "regression", "--rows", "300", "--out", str(out))
    one_line_error(result, "already exists; pass --overwrite")
    assert (out / "X.npy").read_bytes() == before
    assert hvdtrain("data", "make", "regression", "--rows", "300", "--out", str(out), "--overwrite").returncode == 0
    assert (out / "X.npy").read_bytes() != before and len(list(tmp_path.iterdir())) == 1  # no temp left


@pytest.mark.parametrize("args,needle", [
    (["--lr", "-1"], "lr must be > 0"),
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--seed", "-3"], "--seed must be >= 0"),
    (["--rows", "-3"], "--rows must be >= 1"),
    (["--np", "0"], "--np must be >= 1"),
    (["--sync-every", "0,4"], "--sync-every '0,4'"),
    (["--alpha", "2"], "alpha must be in (0, 1]"),
    (["--model", "nosuchmod:Net"], "nosuchmod"),
    (["--data", "/nonexistent"], "/nonexistent"),
    (["--bogus", "1"], "--bogus"),
])
def test_compare_validates_before_launching(tmp_path, args, needle):
    result = hvdtrain("compare", "--out", str(tmp_path / "c"), *args)
    one_line_error(result, needle)
    assert not (tmp_path / "c").exists()
