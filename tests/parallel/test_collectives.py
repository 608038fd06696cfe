"""Horovod's collectives checked against values every rank computes from (rank, size), and
against mpi4py's own results when run under mpirun. Passes at any world size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import requires_mpi


def rank_tensor(rank: int, n: int = 17, dtype=torch.float64) -> torch.Tensor:
    return torch.arange(n, dtype=dtype) * (rank + 1) + rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_allreduce_sum_and_average(hvd, dtype):
    size = hvd.size()
    expected_sum = sum(rank_tensor(r, dtype=dtype) for r in range(size))
    got_sum = hvd.allreduce(rank_tensor(hvd.rank(), dtype=dtype), op=hvd.Sum, name=f"sum{dtype}")
    got_avg = hvd.allreduce(rank_tensor(hvd.rank(), dtype=dtype), op=hvd.Average, name=f"avg{dtype}")
    torch.testing.assert_close(got_sum, expected_sum)
    torch.testing.assert_close(got_avg, expected_sum / size)


def test_broadcast_from_every_root(hvd):
    for root in range(hvd.size()):
        got = hvd.broadcast(rank_tensor(hvd.rank()), root_rank=root, name=f"bcast{root}")
        torch.testing.assert_close(got, rank_tensor(root))


def test_allgather_uneven_first_dimension(hvd):
    mine = torch.full((hvd.rank() + 1, 3), float(hvd.rank()))
    got = hvd.allgather(mine, name="gather")
    expected = torch.cat([torch.full((r + 1, 3), float(r)) for r in range(hvd.size())])
    torch.testing.assert_close(got, expected)


def test_object_collectives(hvd):
    assert hvd.allgather_object({"rank": hvd.rank()}) == [{"rank": r} for r in range(hvd.size())]
    assert hvd.broadcast_object(f"from {hvd.rank()}", root_rank=0) == "from 0"


@requires_mpi
def test_world_matches_mpi4py(hvd, comm):
    assert (hvd.rank(), hvd.size()) == (comm.rank, comm.size)
    local = comm.Split_type(__import__("mpi4py").MPI.COMM_TYPE_SHARED)
    assert (hvd.local_rank(), hvd.local_size()) == (local.rank, local.size)


@requires_mpi
def test_horovod_allreduce_equals_mpi4py(hvd, comm):
    from mpi4py import MPI
    data = np.random.default_rng(comm.rank).normal(size=1000)
    mpi_sum = data.copy()
    comm.Allreduce(MPI.IN_PLACE, mpi_sum, op=MPI.SUM)
    hvd_sum = hvd.allreduce(torch.from_numpy(data), op=hvd.Sum, name="vs_mpi").numpy()
    np.testing.assert_allclose(hvd_sum, mpi_sum, rtol=1e-12)
    gathered = comm.allgather(comm.rank)
    assert gathered == hvd.allgather_object(hvd.rank())
