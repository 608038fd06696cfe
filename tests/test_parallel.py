"""Runs each tests/parallel file inside real multi-rank jobs (mpirun and horovodrun), with a timeout.

Every rank runs pytest on the same file; a failure on any rank ends the job (see
tests/parallel/conftest.py), and a hang is killed by the timeout, so either fails this test.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hvdtrain.launch import horovodrun_cmd, launcher_env, mpirun_cmd, run

HERE = Path(__file__).parent
PYTEST = ["pytest", "-q", "-p", "no:cacheprovider", "-x"]

# (file, launcher, ranks, timeout s): odd and even sizes under mpirun, Horovod also over Gloo.
JOBS = [
    ("test_collectives.py", "mpirun", 2, 180),
    ("test_collectives.py", "mpirun", 3, 180),
    ("test_collectives.py", "horovodrun-gloo", 2, 180),
    ("test_collectives.py", "horovodrun-mpi", 2, 180),
    ("test_training.py", "mpirun", 2, 600),
    ("test_training.py", "mpirun", 3, 600),
    ("test_training.py", "horovodrun-gloo", 2, 600),
]
JOBS += [(f, "mpirun", n, 180) for f in ["test_ring.py"] if (HERE / "parallel" / f).exists() for n in (2, 3)]


def command(launcher: str, ranks: int, path: str) -> list[str]:
    argv = PYTEST + [path]
    if launcher == "mpirun":
        return mpirun_cmd(ranks, argv)
    return horovodrun_cmd(ranks, argv, gloo=launcher == "horovodrun-gloo")


@pytest.mark.mpi
@pytest.mark.parametrize("name,launcher,ranks,timeout", JOBS,
                         ids=[f"{f[:-3]}-{l}-np{n}" for f, l, n, _ in JOBS])
def test_parallel_file(name, launcher, ranks, timeout):
    env = launcher_env({"HVDTRAIN_RANK_TESTS": "1", "PYTHONUNBUFFERED": "1"})
    result = run(command(launcher, ranks, str(HERE / "parallel" / name)), timeout=timeout, env=env,
                 cwd=HERE.parent)
    tail = result.stdout[-6000:]
    assert result.returncode == 0, f"{launcher} -np {ranks} {name} exited {result.returncode}:\n{tail}"
    # Every rank must have reported its own passing pytest summary.
    passed = [line for line in result.stdout.splitlines() if " passed" in line and "failed" not in line]
    assert len(passed) >= ranks, f"expected {ranks} pytest summaries, got {len(passed)}:\n{tail}"
    sys.stdout.write(tail[-1000:])
