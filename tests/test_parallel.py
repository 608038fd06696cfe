"""Runs each tests/parallel file inside real multi-rank jobs (mpirun and horovodrun), with a timeout.

Every rank runs pytest on the same file; a failure on any rank ends the job (see
tests/parallel/conftest.py), and a hang is killed by the timeout, so either fails this test.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hvdtrain.tools.launch import horovodrun_cmd, launcher_env, mpirun_cmd, run

HERE = Path(__file__).parent
PYTEST = ["pytest", "-q", "-p", "no:cacheprovider", "-x", "--color=no"]

# (file, launcher, ranks, timeout s): odd and even sizes under mpirun, Horovod also over Gloo.
JOBS = [
    ("test_collectives.py", "mpirun", 2, 180),
    ("test_collectives.py", "mpirun", 3, 180),
    ("test_collectives.py", "horovodrun-gloo", 2, 180),
    ("test_collectives.py", "horovodrun-mpi", 2, 180),
    ("test_training.py", "mpirun", 2, 600),
    ("test_training.py", "mpirun", 3, 600),
    ("test_training.py", "horovodrun-gloo", 2, 600),
    ("test_fit.py", "mpirun", 2, 600),
    ("test_fit.py", "mpirun", 3, 600),
    ("test_fit.py", "horovodrun-gloo", 2, 600),
    ("test_strategies.py", "mpirun", 2, 600),
    ("test_strategies.py", "mpirun", 3, 600),
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
def test_parallel_file(name, launcher, ranks, timeout, tmp_path):
    env = launcher_env({"HVDTRAIN_RANK_TESTS": "1", "PYTHONUNBUFFERED": "1",
                        "HVDTRAIN_RESULT_DIR": str(tmp_path)})
    result = run(command(launcher, ranks, str(HERE / "parallel" / name)), timeout=timeout, env=env,
                 cwd=HERE.parent)
    tail = result.stdout[-6000:]
    assert result.returncode == 0, f"{launcher} -np {ranks} {name} exited {result.returncode}:\n{tail}"
    # Every rank must have reported its own passing pytest session.
    reports = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("rank-*.json")}
    assert sorted(reports) == sorted(f"rank-{r}.json" for r in range(ranks)), f"{reports}\n{tail}"
    for rank_file, rep in reports.items():
        assert rep["exitstatus"] == 0 and rep.get("passed", 0) > 0 and not rep.get("failed"), (rank_file, rep)
        if launcher != "horovodrun-gloo":  # an MPI world: nothing may skip (only Gloo lacks one)
            assert not rep.get("skipped"), (f"{rank_file}: tests skipped under {launcher}, e.g. an MPI world "
                                            f"not detected", rep)
    sys.stdout.write(tail[-1000:])
