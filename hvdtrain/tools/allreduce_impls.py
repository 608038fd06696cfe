"""The allreduce implementations `hvdtrain bench allreduce` compares (bench code; hvdtrain's
MPI/Horovod environment settings themselves live in hvdtrain.comm.env).

Everything that touches mpi4py, Horovod or torch.distributed is imported inside the function
that needs it: importing this module starts no communication library, so the bench driver can
list implementations without joining an MPI job.

Each implementation is opened as a `BenchGroup`: the rank layout, a barrier and an
elementwise max over ranks (the bench times each iteration between a barrier and the op's
return, then takes the slowest rank), and `make_allreduce(nbytes)`, which preallocates a
float32 buffer and returns a no-argument callable that sums it over all ranks in place; a
callable may carry `path`, the code path it runs (hvdtrain-mpi: what `--mpi-allreduce auto`
chose at that size), which the bench records with the row.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from hvdtrain.comm.env import horovod_env_defaults

import numpy as np

#: name -> how the bench driver starts it: "local" (one process), "mpirun" or "horovodrun".
IMPLS: dict[str, str] = {
    "mpi4py": "mpirun",          # raw comm.Allreduce(IN_PLACE, SUM): the reference
    "mpi4py-tuned": "mpirun",    # the same under hvdtrain's rank environment
    "hvdtrain-mpi": "mpirun",    # FlatAverager.sync(), the MPI fallback's averaging step (its `path`)
    "hvdtrain-ring": "mpirun",   # hvdtrain's own chunked ring (comm/ring.py)
    "horovod-mpi": "mpirun",     # hvd.allreduce_ with hvdtrain's Horovod settings
    "horovod-gloo": "horovodrun",  # the same under `horovodrun --gloo`
    "torch-gloo": "mpirun",      # torch.distributed all_reduce, gloo over 127.0.0.1
    "memcpy": "local",           # np.copyto of the same bytes: the memory ceiling, 1 rank
    # Not in the default set: Horovod exactly as shipped, to show what the defaults change.
    "horovod-mpi-stock": "mpirun",
}
DEFAULT_IMPLS = [name for name in IMPLS if not name.endswith("-stock")]
#: The ones hvdtrain itself runs: they get hvdtrain's rank environment (horovod_env_defaults).
HVDTRAIN_CONFIGURED = frozenset({"mpi4py-tuned", "hvdtrain-mpi", "hvdtrain-ring", "horovod-mpi",
                                 "horovod-gloo"})


@dataclass
class BenchGroup:
    """One implementation, opened inside a worker process of the bench."""

    rank: int
    size: int
    barrier: Callable[[], None]
    max_over_ranks: Callable[[np.ndarray], np.ndarray]
    make_allreduce: Callable[[int], Callable[[], None]]
    close: Callable[[], None]


def _floats(nbytes: int) -> np.ndarray:
    """A float32 buffer of `nbytes` (rounded down to whole floats), touched so that page
    faults happen here and not in the first timed iteration."""
    return np.ones(max(1, nbytes // 4), dtype=np.float32)


def _open_memcpy() -> BenchGroup:
    def make(nbytes: int) -> Callable[[], None]:
        src, dst = _floats(nbytes), np.zeros(max(1, nbytes // 4), dtype=np.float32)
        return lambda: np.copyto(dst, src)
    return BenchGroup(0, 1, lambda: None, lambda x: x, make, lambda: None)


def _open_mpi(name: str, chunk_bytes: int) -> BenchGroup:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD

    def max_over_ranks(x: np.ndarray) -> np.ndarray:
        out = np.array(x, dtype=np.float64)
        comm.Allreduce(MPI.IN_PLACE, out, op=MPI.MAX)
        return out

    def make(nbytes: int) -> Callable[[], None]:
        if name == "hvdtrain-mpi":
            import torch

            from hvdtrain.strategies.mpi_average import FlatAverager
            from hvdtrain.config import BY_KWARG, field_default
            # As training uses it: equal weights 1/N, full averaging (alpha = 1), the
            # default of --mpi-allreduce.
            param = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
            averager = FlatAverager(comm, [param], 1.0 / comm.size, 1.0,
                                    field_default(BY_KWARG["mpi_allreduce"]))

            def sync() -> None:
                averager.sync()
            sync.path = averager.allreduce  # type: ignore[attr-defined]
            return sync
        buf = _floats(nbytes)
        if name == "hvdtrain-ring":
            from hvdtrain.comm.ring import ring_allreduce_

            def ring() -> None:
                ring_allreduce_(comm, buf, chunk_bytes)
            return ring
        return lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    return BenchGroup(comm.rank, comm.size, comm.Barrier, max_over_ranks, make, lambda: None)


def _open_horovod(stock: bool) -> BenchGroup:
    if not stock:
        for key, value in horovod_env_defaults().items():
            os.environ.setdefault(key, value)
    import horovod.torch as hvd
    import torch
    hvd.init()

    def max_over_ranks(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.array(x, dtype=np.float64))
        return hvd.allreduce(t, op=hvd.Max, name="bench.max").numpy()

    def make(nbytes: int) -> Callable[[], None]:
        t = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        # A stable name per tensor, as DistributedOptimizer gives, lets the response cache hit.
        name = f"bench.allreduce.{nbytes}"
        return lambda: hvd.allreduce_(t, op=hvd.Sum, name=name)

    return BenchGroup(hvd.rank(), hvd.size(), hvd.barrier, max_over_ranks, make, hvd.shutdown)


def _open_torch_gloo(port: int) -> BenchGroup:
    import torch
    import torch.distributed as dist
    from mpi4py import MPI
    comm = MPI.COMM_WORLD  # rank and size come from the MPI launch
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=comm.rank, world_size=comm.size)

    def max_over_ranks(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.array(x, dtype=np.float64))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.numpy()

    def make(nbytes: int) -> Callable[[], None]:
        t = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        return lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM)

    return BenchGroup(comm.rank, comm.size, dist.barrier, max_over_ranks, make,
                      dist.destroy_process_group)


def open_impl(name: str, chunk_bytes: int = 1 << 20, port: int = 0) -> BenchGroup:
    """Start implementation `name` in this (worker) process; `port` is torch-gloo's rendezvous."""
    if name not in IMPLS:
        raise ValueError(f"unknown allreduce implementation {name!r}; choose from {list(IMPLS)}")
    if name == "memcpy":
        return _open_memcpy()
    if name in ("mpi4py", "mpi4py-tuned", "hvdtrain-mpi", "hvdtrain-ring"):
        return _open_mpi(name, chunk_bytes)
    if name.startswith("horovod-"):
        return _open_horovod(stock=name.endswith("-stock"))
    return _open_torch_gloo(port)
