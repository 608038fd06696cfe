"""Resuming at another world size: a run checkpointed on 3 ranks continues on 2 and on 4."""
from __future__ import annotations

import json

import pytest
import torch

from hvdtrain.checkpoint import combine_states, resume_step
from hvdtrain.tools.launch import horovodrun_cmd, launcher_env, mpirun_cmd, run


def test_combine_states_averages_with_the_weights():
    states = [{"model": {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)},
               "optimizer": {"state": {0: {"momentum_buffer": torch.tensor([r * 1.0, 0.0]), "step": 7}},
                             "param_groups": [{"lr": 0.1, "params": [0]}]},
               "rng": torch.tensor([r], dtype=torch.uint8)} for r in range(3)]
    for r, s in enumerate(states):
        s["model"]["w"] = s["model"]["w"] * (r + 1)
    weights = [0.5, 0.25, 0.25]
    out = combine_states(states, weights)
    expected_w = 0.5 * torch.tensor([1.0, 2.0]) + 0.25 * torch.tensor([2.0, 4.0]) + 0.25 * torch.tensor([3.0, 6.0])
    assert torch.allclose(out["model"]["w"], expected_w)
    assert out["model"]["n"].item() == 5 and out["rng"].item() == 0  # non-float and RNG: rank 0's
    assert torch.allclose(out["optimizer"]["state"][0]["momentum_buffer"], torch.tensor([0.75, 0.0]))
    assert out["optimizer"]["state"][0]["step"] == 7


@pytest.mark.parametrize("step,old,new,expected", [(0, 10, 15, 0), (20, 10, 15, 30), (25, 10, 15, 37),
                                                   (7, 7, 7, 7), (13, 6, 4, 8)])
def test_resume_step_keeps_the_point_in_the_epoch(step, old, new, expected):
    assert resume_step(step, old, new) == expected


def _train(launcher, ranks, backend, out, epochs, resume=False):
    periodic = ["--sync-every", "4"] if backend == "mpi" else []  # the MPI fallback's own setting
    argv = ["hvdtrain", "train", "--backend", backend, *periodic, "--rows", "6000", "--epochs",
            str(epochs), "--batch-size", "32", "--lr", "0.003", "--optimizer", "sgd", "--momentum", "0.9",
            "--threads", "1", "--log-every", "5", "--out", str(out)] + (["--resume"] if resume else [])
    cmd = mpirun_cmd(ranks, argv) if launcher == "mpirun" else horovodrun_cmd(ranks, argv)
    result = run(cmd, timeout=300, env=launcher_env())
    assert result.returncode == 0, result.stdout[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.mpi
@pytest.mark.parametrize("backend,launcher", [("mpi", "mpirun"), ("horovod", "horovodrun")])
def test_checkpoint_on_3_ranks_resumes_on_2_and_on_4(tmp_path, backend, launcher):
    first = _train(launcher, 3, backend, tmp_path / "three", epochs=1)
    for ranks in (2, 4):
        out = tmp_path / f"on{ranks}"
        (out / "checkpoints").mkdir(parents=True)
        ckpt = max((tmp_path / "three" / "checkpoints").glob("ckpt-*.pt"))
        (out / "checkpoints" / ckpt.name).write_bytes(ckpt.read_bytes())
        resumed = _train(launcher, ranks, backend, out, epochs=3, resume=True)
        assert resumed["world_size"] == ranks
        assert resumed["start_step"] == resumed["steps_per_epoch"]  # the same point: end of epoch 1
        # It continued from the trained state, not from scratch, and the loss kept falling.
        assert resumed["first_loss"] < 0.5 * first["first_loss"], (first, resumed)
        assert resumed["eval_loss"] < first["eval_loss"], (first, resumed)
