"""hvdtrain's MPI settings (hvdtrain/comm/env.py) reach Open MPI inside the ranks, under every way a
user starts a job, and a value the user exported wins.

The proof is what Open MPI itself holds: each run's summary.json records, as `mpi_settings`, the
control variables rank 0 reads back through MPI_T (comm.env.effective_settings). The jobs run in an
environment without any of hvdtrain's settings, as a user's shell would be, so what is read back
was applied by hvdtrain in the rank. Under srun the same check runs in tests/test_slurm.py.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from hvdtrain.comm import env as E
from hvdtrain.tools.launch import horovodrun_cmd, mpirun_cmd, run

pytestmark = pytest.mark.mpi

ALGORITHM = "coll_tuned_allreduce_algorithm"
HVDTRAIN_ALGORITHM = int(E.ONE_HOST["OMPI_MCA_" + ALGORITHM])  # 5, the segmented ring
TRAIN = ["train", "--rows", "512", "--epochs", "1", "--batch-size", "64", "--overwrite"]
BIN = Path(sys.executable).parent
TIMEOUT = 300


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: none of hvdtrain's settings, no launcher variables."""
    ours = {*E.EVERY_JOB, *E.ONE_HOST, *E.STALL_KEYS}
    env = {k: v for k, v in os.environ.items()
           if k not in ours and not k.startswith(("OMPI_COMM_WORLD_", "PMI_", "PMIX_", "SLURM_", "HOROVOD_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.update(extra)
    return env


def mpi_settings(out: Path, result) -> dict[str, int]:  # noqa: ANN001
    assert result.returncode == 0, result.stdout[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert "mpi_settings" in summary, ("summary.json has no mpi_settings: train.py must record "
                                       "hvdtrain.comm.env.effective_settings() on rank 0")
    assert summary["mpi_settings"] is not None, f"no MPI_T read-back under {summary['backend']}"
    return summary["mpi_settings"]


def launch(how: str, out: Path, env: dict[str, str]):  # noqa: ANN201
    if how == "mpirun python -m mpi4py -m hvdtrain":
        cmd = mpirun_cmd(2, ["hvdtrain", *TRAIN, "--backend", "mpi", "--out", str(out)])
    elif how == "mpirun hvdtrain":
        cmd = mpirun_cmd(2, [str(BIN / "hvdtrain"), *TRAIN, "--backend", "mpi", "--out", str(out)],
                         python_module=False)
    else:  # horovodrun over MPI: Horovod starts MPI inside hvd.init()
        pytest.importorskip("horovod.torch")
        cmd = horovodrun_cmd(2, ["hvdtrain", *TRAIN, "--backend", "horovod", "--out", str(out)])
    return run(cmd, timeout=TIMEOUT, env=env)


@pytest.mark.parametrize("how", ["mpirun python -m mpi4py -m hvdtrain", "mpirun hvdtrain", "horovodrun"])
def test_open_mpi_holds_hvdtrains_settings(how: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    got = mpi_settings(out, launch(how, out, user_env()))
    want = {k[len(E.MCA_PREFIX):]: int(v) for k, v in E.job_env_defaults(2).items() if k.startswith(E.MCA_PREFIX)}
    assert got == want and got[ALGORITHM] == HVDTRAIN_ALGORITHM, got


def test_reader_reports_what_open_mpi_holds_and_nothing_without_mpi() -> None:
    """One process (MPI's singleton start): None before MPI runs, then Open MPI's own values."""
    code = ("import json; from hvdtrain.comm.env import effective_settings as read; before = read()\n"
            "from mpi4py import MPI\nprint('READ', json.dumps([before, read()]))")
    env = user_env(OMPI_MCA_coll_tuned_use_dynamic_rules="1", **{"OMPI_MCA_" + ALGORITHM: "3"})
    result = run([sys.executable, "-c", code], timeout=120, env=env)
    assert result.returncode == 0, result.stdout[-3000:]
    before, after = json.loads(next(ln for ln in result.stdout.splitlines() if ln.startswith("READ "))[5:])
    assert before is None and after[ALGORITHM] == 3 and after["coll_tuned_allreduce_algorithm_segmentsize"] == 0


def test_the_users_exported_value_wins(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = user_env(**{"OMPI_MCA_" + ALGORITHM: "2"})
    got = mpi_settings(out, launch("mpirun python -m mpi4py -m hvdtrain", out, env))
    assert got[ALGORITHM] == 2 and got["coll_tuned_use_dynamic_rules"] == 1, got


USER_SCRIPT = """\
import json, sys
from mpi4py import MPI  # the user's script starts MPI before hvdtrain can set anything
import torch
import hvdtrain
from hvdtrain.comm.env import effective_settings
hvdtrain.fit(torch.nn.Linear(10, 1), "regression", backend="mpi", rows=256, epochs=1, batch_size=64,
             out=sys.argv[1], overwrite=True)
if MPI.COMM_WORLD.rank == 0:
    print("READBACK " + json.dumps(effective_settings()), flush=True)
"""
WARNING = "hvdtrain: MPI was started before hvdtrain could apply its MPI/Horovod settings"


def test_fit_after_the_user_started_mpi_says_what_to_export(tmp_path: Path) -> None:
    script = tmp_path / "user_train.py"
    script.write_text(USER_SCRIPT)
    cmd = mpirun_cmd(2, [sys.executable, str(script), str(tmp_path / "run")], python_module=False)
    first = run(cmd, timeout=TIMEOUT, env=user_env())
    assert first.returncode == 0, first.stdout[-4000:]
    warnings = [line for line in first.stdout.splitlines() if WARNING in line]
    assert len(warnings) == 1, first.stdout[-4000:]  # once, rank 0 only
    readback = json.loads(next(ln for ln in first.stdout.splitlines() if ln.startswith("READBACK "))[9:])
    assert readback[ALGORITHM] != HVDTRAIN_ALGORITHM, readback  # the warning is true: not applied
    exports = dict(kv.split("=", 1) for kv in warnings[0].split(": export ", 1)[1].split())
    assert exports["OMPI_MCA_" + ALGORITHM] == str(HVDTRAIN_ALGORITHM) and "THP_MEM_ALLOC_ENABLE" in exports

    # Following the advice: exported at launch, the settings take effect and nothing is printed.
    second = run(cmd, timeout=TIMEOUT, env=user_env(**exports))
    assert second.returncode == 0, second.stdout[-4000:]
    assert WARNING not in second.stdout, second.stdout[-4000:]
    readback = json.loads(next(ln for ln in second.stdout.splitlines() if ln.startswith("READBACK "))[9:])
    assert readback[ALGORITHM] == HVDTRAIN_ALGORITHM, readback
