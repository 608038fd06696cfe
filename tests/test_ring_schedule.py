"""The ring allreduce schedule, checked without MPI by simulating `size` virtual ranks."""
from __future__ import annotations

import numpy as np
import pytest

from hvdtrain.comm.ring import (RingStep, as_flat_array, chunk_bounds, chunk_elems_for,
                                    ring_schedule, ring_step, segment_bounds)

SIZES = [1, 2, 3, 4, 5, 7, 8]
LENGTHS = [0, 1, 2, 3, 5, 7, 8, 10, 31, 64, 100, 1001]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n", LENGTHS)
def test_segments_cover_every_element_once(n: int, size: int) -> None:
    bounds = segment_bounds(n, size)
    assert len(bounds) == size
    covered = np.zeros(n, dtype=int)
    for a, b in bounds:
        assert 0 <= a <= b <= n
        covered[a:b] += 1
    assert (covered == 1).all()
    lengths = [b - a for a, b in bounds]
    assert max(lengths) - min(lengths) <= 1  # balanced: no rank carries more than one extra


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("start,stop", [(0, 0), (5, 5), (0, 1), (3, 10), (0, 64), (7, 1007)])
def test_chunks_tile_the_segment(start: int, stop: int, chunk: int) -> None:
    chunks = chunk_bounds(start, stop, chunk)
    assert sum(b - a for a, b in chunks) == stop - start
    assert all(0 < b - a <= chunk for a, b in chunks)
    assert all(chunks[i][1] == chunks[i + 1][0] for i in range(len(chunks) - 1))
    if chunks:
        assert chunks[0][0] == start and chunks[-1][1] == stop


@pytest.mark.parametrize("size", SIZES)
def test_each_step_matches_sender_and_receiver(size: int) -> None:
    """What rank r receives at step t is exactly what rank r-1 sends at step t."""
    for rank in range(size):
        sched = ring_schedule(rank, size)
        assert len(sched) == 2 * (size - 1)
        for t, step in enumerate(sched):
            assert step == ring_step(t, rank, size)
            assert step.send != step.recv or size == 1
            assert step.reduce == (t < size - 1)
            assert step.recv == ring_schedule((rank - 1) % size, size)[t].send


def simulate_ring(data: list[np.ndarray], chunk: int,
                  scales: list[float] | None = None) -> list[np.ndarray]:
    """Run the schedule on virtual ranks: at each step every rank sends, then every rank
    receives (copies taken first, as messages are), chunk by chunk. `scales` mirrors
    ring_allreduce_'s per-rank scale: own data is scaled into the message sent at step 0 (the
    segment itself keeps its unscaled values until the allgather overwrites it) and when an
    incoming chunk is first added to it."""
    size, n = len(data), data[0].size
    scales = scales or [1.0] * size
    out = [d.copy() for d in data]
    segments = segment_bounds(n, size)
    for t in range(2 * (size - 1)):
        steps = [ring_step(t, r, size) for r in range(size)]
        msgs = [[out[r][a:b] * (scales[r] if t == 0 else 1.0) for a, b in chunk_bounds(*segments[s.send], chunk)]
                for r, s in enumerate(steps)]
        for r, s in enumerate(steps):
            incoming = msgs[(r - 1) % size]
            recvs = chunk_bounds(*segments[s.recv], chunk)
            assert len(incoming) == len(recvs)
            for (a, b), msg in zip(recvs, incoming, strict=True):
                assert msg.size == b - a
                if s.reduce:
                    out[r][a:b] = out[r][a:b] * scales[r] + msg
                else:
                    out[r][a:b] = msg
    return out


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("chunk", [1, 3, 1 << 18])
def test_simulated_ring_gives_every_rank_the_sum(n: int, size: int, chunk: int) -> None:
    rng = np.random.default_rng(1000 * n + size)
    # Integers make the sum exact, whatever order the ring adds in.
    data = [rng.integers(-1000, 1000, n).astype(np.float64) for _ in range(size)]
    expected = np.sum(data, axis=0) if n else np.zeros(0)
    for r, got in enumerate(simulate_ring(data, chunk)):
        np.testing.assert_array_equal(got, expected, err_msg=f"rank {r} of {size}, n={n}")


@pytest.mark.parametrize("size", [2, 3, 5, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 64, 1001])
def test_per_rank_scale_gives_the_weighted_sum(n: int, size: int) -> None:
    """Each rank's data is scaled exactly once on its way into the sum (weights 2^-k keep
    the products exact)."""
    rng = np.random.default_rng(n + size)
    data = [rng.integers(-1000, 1000, n).astype(np.float64) for _ in range(size)]
    scales = [2.0 ** -(r % 4) for r in range(size)]
    expected = sum(w * d for w, d in zip(scales, data, strict=True)) if n else np.zeros(0)
    for r, got in enumerate(simulate_ring(data, 5, scales)):
        np.testing.assert_array_equal(got, expected, err_msg=f"rank {r} of {size}, n={n}")


@pytest.mark.parametrize("size", [2, 3, 5, 8])
def test_the_segment_sent_scaled_at_step_0_is_overwritten_in_the_allgather(size: int) -> None:
    """ring_allreduce_ scales its first send into a scratch copy and leaves the segment itself
    unscaled: correct only because no later reduce step reads it and the allgather replaces it."""
    for rank in range(size):
        sched = ring_schedule(rank, size)
        first = sched[0].send
        assert all(step.recv != first for step in sched[:size - 1])  # never added to again
        assert sum(step.recv == first for step in sched[size - 1:]) == 1  # overwritten once


@pytest.mark.parametrize("size", [2, 3, 5])
def test_reduce_scatter_leaves_rank_owning_segment_r_plus_1(size: int) -> None:
    """After the N-1 reduce steps, rank r's segment (r+1) mod N is complete: it is the first
    segment rank r forwards in the allgather."""
    for rank in range(size):
        assert ring_step(size - 1, rank, size).send == (rank + 1) % size


def test_bad_arguments_are_rejected_with_the_values() -> None:
    with pytest.raises(ValueError, match="size=0"):
        segment_bounds(3, 0)
    with pytest.raises(ValueError, match="step=2"):
        ring_step(2, 0, 2)
    with pytest.raises(ValueError):
        chunk_bounds(0, 4, 0)
    assert chunk_elems_for(1, 8) == 1 and chunk_elems_for(1 << 20, 4) == 1 << 18
    assert ring_schedule(0, 1) == []
    assert isinstance(ring_step(0, 0, 2), RingStep)


def test_flat_view_shares_memory_and_rejects_copies() -> None:
    a = np.zeros((3, 4), dtype=np.float32)
    assert np.shares_memory(as_flat_array(a), a)
    with pytest.raises(ValueError, match="C-contiguous"):
        as_flat_array(a[:, ::2])
    with pytest.raises(TypeError, match="float16"):
        as_flat_array(np.zeros(3, dtype=np.float16))
    import torch  # a dependency of hvdtrain: always installed, never a reason to skip
    t = torch.zeros(5, dtype=torch.float64)
    as_flat_array(t)[:] = 2.0
    assert float(t.sum()) == 10.0
    with pytest.raises(ValueError, match="contiguous"):
        as_flat_array(torch.zeros(4, 4).t())
