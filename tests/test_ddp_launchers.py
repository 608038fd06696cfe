"""The `ddp` strategy under torchrun (its own rendezvous variables) and under mpirun."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from hvdtrain.tools.launch import launcher_env, mpirun_cmd, run

ARGS = ["train", "--backend", "ddp", "--rows", "4000", "--dtype", "float64", "--lr", "0.05", "--seed", "3",
        "--threads", "1", "--batch-size", "16"]


@pytest.mark.mpi
def test_ddp_under_torchrun_and_mpirun_agree(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    a = run([torchrun, "--nproc-per-node", "2", "-m", "hvdtrain", *ARGS, "--out", str(tmp_path / "tr")],
            timeout=240, env=launcher_env())
    assert a.returncode == 0, a.stdout[-3000:]
    b = run(mpirun_cmd(2, ["hvdtrain", *ARGS, "--out", str(tmp_path / "mp")]), timeout=240, env=launcher_env())
    assert b.returncode == 0, b.stdout[-3000:]
    for out in ("tr", "mp"):
        s = json.loads((tmp_path / out / "summary.json").read_text())
        assert s["backend"] == "ddp" and s["world_size"] == 2
    pa, pb = (torch.load(tmp_path / o / "model.pt", weights_only=True) for o in ("tr", "mp"))
    assert all(torch.allclose(pa[k], pb[k], rtol=0, atol=1e-12) for k in pa)
