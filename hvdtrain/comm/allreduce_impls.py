"""The allreduce implementations `hvdtrain bench allreduce` compares, and hvdtrain's Horovod
environment defaults.

Everything that touches mpi4py, Horovod or torch.distributed is imported inside the function
that needs it (bench-only code): importing this module starts no communication library, so
the Horovod backend can read `horovod_env_defaults()` before `hvd.init()`, and the bench
driver can list implementations without joining an MPI job.

Each implementation is opened as a `BenchGroup`: the rank layout, a barrier and an
elementwise max over ranks (the bench times each iteration between a barrier and the op's
return, then takes the slowest rank), and `make_allreduce(nbytes)`, which preallocates a
float32 buffer and returns a no-argument callable that sums it over all ranks in place.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: name -> how the bench driver starts it: "local" (one process), "mpirun" or "horovodrun".
IMPLS: dict[str, str] = {
    "mpi4py": "mpirun",          # raw comm.Allreduce(IN_PLACE, SUM): the reference
    "mpi4py-tuned": "mpirun",    # the same under hvdtrain's rank environment
    "hvdtrain-mpi": "mpirun",    # FlatAverager.sync(), the MPI fallback's averaging step
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


def horovod_env_defaults() -> dict[str, str]:
    """Environment hvdtrain gives its ranks; apply with os.environ.setdefault semantics (a
    value the user exported wins). Set it before MPI starts: the OMPI_MCA_* values are read
    at MPI_Init (inside hvd.init(), or at the first `from mpi4py import MPI`), while
    THP_MEM_ALLOC_ENABLE is read by PyTorch once, at the process's first tensor allocation,
    so that one only works if it is already in the environment when the rank starts
    (put it in the launcher's / job script's environment too).

    Measured with `hvdtrain bench allreduce --np 2` and single-job probes: 64 MiB float32
    SUM in place, 2 ranks on a 2-core KVM guest (THP mode `madvise`), Open MPI 4.1.4 over
    shared memory (vader, CMA single copy works here), Horovod 0.28.1, torch 2.13 CPU,
    p50 per-iteration slowest-rank time; raw = `comm.Allreduce` on a numpy buffer ~21-25 ms.

    * Stock Horovod: ~28-33 ms (0.69-0.81x raw). Horovod's own overhead is small: on a
      numpy-backed tensor it matches raw (25.6 vs 25.0 ms). The gap is memory: numpy
      advises transparent huge pages for big arrays, torch's allocator does not, and raw
      MPI on a torch-allocated buffer is just as slow (~33-35 ms: 4 KiB pages cost CMA page
      pinning and TLB misses). THP_MEM_ALLOC_ENABLE=1 gives torch huge pages too:
      Horovod ~24.5-28.7 ms (0.8-0.88x).
    * Open MPI's fixed decision picks an allreduce that reduces whole 32 MiB halves from
      main memory: 16 MiB runs at 8.7 GB/s busbw, 64 MiB at 3.1. Its segmented ring with
      256 KiB segments keeps the working set in cache: raw 64 MiB 8.4-9.6 ms (2.3-2.7x),
      Horovod with all settings here 10.4-12.1 ms (1.9-2.0x the default raw MPI, 0.8-0.9x
      raw MPI under the same settings). Cost: +0.3-0.6 us on 16 B-1 KiB messages. The
      forced ring is only given when the job is known to be on one host
      (OMPI_COMM_WORLD_LOCAL_SIZE == OMPI_COMM_WORLD_SIZE, or not launched by Open MPI
      yet), where it was measured; across nodes Open MPI's own choice stays.
    * OMPI_MCA_mpi_yield_when_idle=1: a waiting rank calls sched_yield instead of pure
      spinning. Horovod runs a background thread next to the training thread, so 2 ranks
      already have more threads than this host has cores; without it 19 of 95 measured
      sizes (4 B-1 MiB, 5 runs) had a p50 of 4-20 ms instead of ~1.1 ms, with it 0 of 95.
      Costs raw MPI ~0.2 us on tiny messages.
    * Tried, no gain here: HOROVOD_MPI_THREADS_DISABLE=1 (MPI_THREAD_MULTIPLE costs nothing:
      raw MPI single vs multiple, same), HOROVOD_CACHE_CAPACITY=0, the fusion threshold
      (0.28.1's default is 128 MiB, and a lone tensor is never copied into the fusion
      buffer), OMPI_MCA_btl_vader_single_copy_mechanism=none (CMA works here; turning it off
      is ~1.8x slower), `mpirun --bind-to core` (raw MPI: same as `none`; Horovod: 256 KiB
      takes 4.3 ms instead of 1.1, its two threads share one core), so keep `--bind-to none`.
    * HOROVOD_CYCLE_TIME below 1 ms saves ~1-2 ms per allreduce but keeps every idle rank's
      background thread at ~100% of a core (1 ms: ~2%), which compute cannot spare on a
      small host; Horovod's default 1 ms is kept (it sets Horovod's ~1.1 ms latency floor).
    """
    env = {"THP_MEM_ALLOC_ENABLE": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}
    size = os.environ.get("OMPI_COMM_WORLD_SIZE")
    local = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    if size is None or local is None or size == local:
        env.update({"OMPI_MCA_coll_tuned_use_dynamic_rules": "1",
                    "OMPI_MCA_coll_tuned_allreduce_algorithm": "5",  # segmented ring
                    "OMPI_MCA_coll_tuned_allreduce_algorithm_segmentsize": "262144"})
    return env


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
            from hvdtrain.config import SyncConfig
            # As training uses it: equal weights 1/N, full averaging (alpha = 1), the
            # configured default allreduce.
            param = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
            return FlatAverager(comm, [param], 1.0 / comm.size, 1.0,
                                SyncConfig().mpi_allreduce).sync
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
