"""hvdtrain's ring allreduce against MPI's own Allreduce, at any world size.

Run every rank under pytest, e.g.
    mpirun -np 3 python -m mpi4py -m pytest -q tests/parallel/test_ring.py
(`-m mpi4py` makes an exception on one rank abort all of them instead of hanging the rest).
Every rank fills its buffer from values any rank can compute from (rank, size), so the
expected sum is also checked directly, not only against MPI.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI  # always installed: a missing mpi4py fails this file, it never skips it

from hvdtrain.comm.ring import ring_allreduce_

COMM = MPI.COMM_WORLD
SIZE = COMM.Get_size()
LENGTHS = sorted({0, 1, 2, SIZE - 1, SIZE, SIZE + 1, 3 * SIZE, 3 * SIZE + 2, 1000, 4099,
                  (1 << 18) + 5})
CHUNKS = [1, 12, 4096, 1 << 20]
DTYPES = [np.float32, np.float64]
#: Tiny chunks on big buffers mean hundreds of thousands of messages and test nothing new.
MAX_MESSAGES = 2000
CASES = [(n, c) for n in LENGTHS for c in CHUNKS if n * 8 // c <= MAX_MESSAGES]


def rank_values(rank: int, n: int, dtype: type) -> np.ndarray:
    """Rank-dependent integers (exact in float32 for these sizes), so any summation order
    gives the same bits."""
    i = np.arange(n, dtype=np.int64)
    return ((i * (rank + 1) + 7 * rank) % 1013 - 500).astype(dtype)


def expected_sum(n: int, dtype: type) -> np.ndarray:
    return np.sum([rank_values(r, n, dtype) for r in range(SIZE)], axis=0, dtype=dtype) \
        if n else np.zeros(0, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,chunk_bytes", CASES)
def test_ring_equals_mpi_allreduce(n: int, chunk_bytes: int, dtype: type) -> None:
    mine = rank_values(COMM.Get_rank(), n, dtype)
    ref = mine.copy()
    COMM.Allreduce(MPI.IN_PLACE, ref, op=MPI.SUM)
    out = ring_allreduce_(COMM, mine, chunk_bytes=chunk_bytes)
    assert out is mine  # in place
    np.testing.assert_array_equal(mine, ref)
    np.testing.assert_array_equal(mine, expected_sum(n, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_floats_agree_with_mpi_to_rounding(dtype: type) -> None:
    """Non-integer data: the ring adds in a different order than MPI, so compare to rounding;
    every rank must still end with bit-identical results (they all copy the same sums)."""
    n = 10007
    mine = np.random.default_rng(COMM.Get_rank()).standard_normal(n).astype(dtype)
    ref = mine.copy()
    COMM.Allreduce(MPI.IN_PLACE, ref, op=MPI.SUM)
    ring_allreduce_(COMM, mine, chunk_bytes=1000)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(mine, ref, rtol=rtol, atol=rtol * SIZE)
    gathered = COMM.allgather(mine.tobytes())
    for r in range(SIZE):
        assert gathered[r] == gathered[0], f"rank {r} differs from rank 0"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, SIZE + 1, 4099])
def test_scale_gives_each_rank_its_weight(n: int, dtype: type) -> None:
    """scale = w_rank: the result is sum_j w_j x_j (weights 2^-k keep it exact)."""
    rank = COMM.Get_rank()
    weights = [2.0 ** -(r % 3) for r in range(SIZE)]
    mine = rank_values(rank, n, dtype)
    ring_allreduce_(COMM, mine, chunk_bytes=256, scale=weights[rank])
    want = sum(weights[r] * rank_values(r, n, np.float64) for r in range(SIZE)) if n \
        else np.zeros(0)
    np.testing.assert_array_equal(mine, np.asarray(want, dtype=dtype))


def test_scale_on_integers_is_refused() -> None:
    with pytest.raises(TypeError, match="floating"):
        ring_allreduce_(COMM, np.ones(4, dtype=np.int64), scale=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_tensor_in_place(dtype: torch.dtype) -> None:
    rank = COMM.Get_rank()
    t = torch.full((17, 5), float(rank + 1), dtype=dtype)
    out = ring_allreduce_(COMM, t, chunk_bytes=64)
    assert out is t
    assert torch.equal(t, torch.full((17, 5), SIZE * (SIZE + 1) / 2, dtype=dtype))


def test_non_contiguous_tensor_is_rejected_on_every_rank() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        ring_allreduce_(COMM, torch.zeros(4, 6).t())
