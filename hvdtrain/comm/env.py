"""hvdtrain's MPI and Horovod settings for its ranks: the one definition, applied by every entry
point (the CLI and `fit` inside the rank, just before MPI starts; compare, the benchmarks,
mpi_jobs/ and slurm/ in the launcher's environment, so they are in place before the rank's
interpreter starts). A value the user exported always wins.
"""
from __future__ import annotations

import os


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
