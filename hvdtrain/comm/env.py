"""hvdtrain's MPI and Horovod settings for its ranks: the one definition, applied the same way
by every entry point. A value the user exported always wins (os.environ.setdefault semantics).

* Inside the rank, just before MPI/Horovod starts: `make_comm` (the CLI and `fit`) calls
  `apply_env_defaults(collective_timeout)`. When the user's script started MPI or Horovod first,
  it is too late: `apply_env_defaults` prints once, on rank 0, which `export K=V` to use instead.
* In the launcher's environment, so the values are in place before the rank's interpreter starts
  (THP_MEM_ALLOC_ENABLE is read at torch's first allocation, OMPI_MCA_* at MPI_Init, which
  `python -m mpi4py` of mpi4py < 4 runs before hvdtrain): `hvdtrain.tools.launch.launcher_env`
  (compare, the benchmarks, the tests) uses `job_env_defaults(np, hosts)`; mpi_jobs/common.sh
  and slurm/common.sh eval `python -m hvdtrain.comm.env --sh --np N [--local-size L]`.
* `effective_settings()` reads back, inside a rank, the values Open MPI actually holds (MPI_T,
  comm/mpit.py): a run's summary records them as `mpi_settings`.

This module imports neither torch nor MPI: the job scripts run it before any rank exists.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from hvdtrain.errors import ConfigError
from hvdtrain.layout import detect_layout

EVERY_JOB = {"THP_MEM_ALLOC_ENABLE": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}
"""Given to every job (why: `horovod_env_defaults`)."""
ONE_HOST = {"OMPI_MCA_coll_tuned_use_dynamic_rules": "1",
            "OMPI_MCA_coll_tuned_allreduce_algorithm": "5",  # segmented ring
            "OMPI_MCA_coll_tuned_allreduce_algorithm_segmentsize": "262144"}
"""Given only when every rank is on one host, where they were measured (`horovod_env_defaults`)."""
MPIRUN = {"OMPI_MCA_odls_base_sigkill_timeout": "5"}
"""Read by mpirun and its orted daemons, not by the ranks (so not in the ranks' MPI_T read-back):
given by the launcher-side entry points only (launcher_env; `--sh --mpirun` for mpi_jobs/).
On Ctrl-C (SIGINT) or SIGTERM, Open MPI 4.1's mpirun sends its ranks SIGCONT, waits this many
seconds, sends SIGTERM, waits as long again, then SIGKILLs them. The SIGTERM is the ranks' stop
request (hvdtrain.cli.StopFlag): they need the second wait to reach the next metrics flush
(--log-every), agree to stop, write a checkpoint and exit 99. Open MPI's default, 1 s, is too short
for that (measured: with --log-every 3000 the ranks were killed mid-run, no checkpoint); 5 s gives
a clean stop of a job whose --log-every steps take up to a few seconds, and mpirun returns 10 s
after Ctrl-C (it waits both times in full). Slower steps: export a larger value, or lower --log-every."""
STALL_KEYS = ("HOROVOD_STALL_CHECK_TIME_SECONDS", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS")
"""Horovod's own stall check, derived from --collective-timeout (`stall_defaults`)."""
MCA_PREFIX = "OMPI_MCA_"


def horovod_env_defaults(size: int | None = None, local_size: int | None = None) -> dict[str, str]:
    """Environment hvdtrain gives its ranks, for a job of `size` ranks with `local_size` of them
    on its first host (default: this process's own layout from the launcher's variables,
    detect_layout; one process when no launcher started it). Apply it with setdefault semantics
    before MPI starts: the OMPI_MCA_* values are read at MPI_Init (inside hvd.init(), or at the
    first `from mpi4py import MPI`), while THP_MEM_ALLOC_ENABLE is read by PyTorch once, at the
    process's first tensor allocation, so that one only works if it is already in the
    environment when the rank starts (hence the launcher-side entry points above).

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
      forced ring is only given when the job is known to be on one host (local_size ==
      size: mpirun's, srun's or horovodrun's variables, or the launcher's --np/--hosts),
      where it was measured; across nodes, or when unknown, Open MPI's own choice stays.
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
    if size is None or local_size is None:
        try:
            layout = detect_layout(os.environ)
            size, local_size = layout.size, layout.local_size
        except ConfigError:  # malformed launcher variables: make_comm reports them; assume nothing
            size = local_size = None
    return _settings(one_host=size is not None and size == local_size)


def _settings(one_host: bool) -> dict[str, str]:
    return {**EVERY_JOB, **(ONE_HOST if one_host else {})}


def first_host_slots(hosts: str) -> int:
    """Slots of the first host in "H1:slots,H2:slots" (a host without ":slots" has one)."""
    name, _, slots = hosts.split(",")[0].strip().partition(":")
    return int(slots) if slots.strip().isdigit() else 1


def job_env_defaults(np: int | None = None, hosts: str | None = None,
                     local_size: int | None = None) -> dict[str, str]:
    """horovod_env_defaults() for a job a launcher is about to start: `np` ranks, all on this host
    unless `hosts` ("H1:slots,H2:slots", filled in order) or `local_size` (ranks on the first
    host) says otherwise. With `np` unknown only the layout-independent settings go in; each rank
    then adds the rest from its own layout (make_comm)."""
    if np is None:
        return _settings(one_host=False)
    if local_size is None:
        local_size = np if hosts is None else min(np, first_host_slots(hosts))
    return horovod_env_defaults(size=np, local_size=local_size)


def stall_defaults(collective_timeout: float) -> dict[str, str]:
    """Horovod's own stall check, so a stalled Horovod job ends too (0 = never: none)."""
    if collective_timeout <= 0:
        return {}
    check, shutdown = STALL_KEYS
    return {check: str(max(1, int(min(60, collective_timeout / 2)))),
            shutdown: str(max(2, int(collective_timeout)))}


def env_defaults(collective_timeout: float) -> dict[str, str]:
    """Everything a rank gets before MPI/Horovod starts: horovod_env_defaults() for this process's
    layout and the stall settings for `collective_timeout` (TrainConfig.collective_timeout)."""
    return {**horovod_env_defaults(), **stall_defaults(collective_timeout)}


def library_started() -> str | None:
    """Which communication library this process already started, if any ("MPI" or "Horovod"):
    then settings put into os.environ now come too late for it."""
    hvd = sys.modules.get("horovod.torch")
    if hvd is not None:
        try:
            if hvd.is_initialized():
                return "Horovod"
        except Exception:  # noqa: BLE001  (an old or broken Horovod: no claim either way)
            pass
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return "MPI"
    return None


def _started_rank() -> int:
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return int(mpi.COMM_WORLD.Get_rank())
    try:
        return detect_layout(os.environ).rank
    except ConfigError:
        return 0


_warned = False


def apply_env_defaults(collective_timeout: float) -> dict[str, str]:
    """Put env_defaults(collective_timeout) into os.environ where the user has not set a value;
    returns the ones it added. If MPI or Horovod is already running in this process (the user's
    script imported mpi4py.MPI or called hvd.init() first), they cannot take effect: rank 0 says
    so once on stderr, with the `export K=V` lines to put in the launch environment instead."""
    global _warned
    defaults = env_defaults(collective_timeout)
    missing = {k: v for k, v in defaults.items() if k not in os.environ}
    started = library_started()
    if started and missing and not _warned:
        _warned = True
        if _started_rank() == 0:
            exports = " ".join(f"{k}={v}" for k, v in missing.items())
            sys.stderr.write(f"hvdtrain: {started} was started before hvdtrain could apply its MPI/Horovod "
                             f"settings, so they do not take effect in this run; set them where the job "
                             f"is launched instead: export {exports}\n")
            sys.stderr.flush()
    for key, value in missing.items():
        os.environ[key] = value
    return missing


def mca_names() -> list[str]:
    """Open MPI's names (MPI_T control variables) of every MCA parameter hvdtrain may set."""
    return [k[len(MCA_PREFIX):] for k in {**EVERY_JOB, **ONE_HOST} if k.startswith(MCA_PREFIX)]


def effective_settings() -> dict[str, int] | None:
    """The values Open MPI holds, in this rank, for hvdtrain's MCA settings, read back through the
    MPI_T interface of the already loaded libmpi: e.g. {"coll_tuned_allreduce_algorithm": 5,
    "mpi_yield_when_idle": 1, ...}. Call it after MPI started (make_comm), before it ends. None
    where MPI is not running in this process (single, ddp, Horovod over Gloo) or has no MPI_T; a
    parameter Open MPI does not know (its component is not built) is left out."""
    from hvdtrain.comm.mpit import read_cvars
    return read_cvars(mca_names())


_SAFE = re.compile(r"[A-Za-z0-9_./:-]*")


def shell_exports(env: dict[str, str]) -> str:
    """`export K="${K:-V}"` lines: the value the user exported wins, as everywhere else."""
    lines = []
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or not _SAFE.fullmatch(value):
            raise ValueError(f"{key}={value!r} cannot be written as a shell default")
        lines.append(f'export {key}="${{{key}:-{value}}}"')
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvdtrain.comm.env",
                                description="Print hvdtrain's MPI/Horovod settings for a job about to be "
                                            "launched (mpi_jobs/common.sh and slurm/common.sh eval it).")
    p.add_argument("--sh", action="store_true", help="as `export K=\"${K:-V}\"` lines (default: K=V lines)")
    p.add_argument("--np", type=int, default=None, help="ranks in the job (unknown: only the "
                                                         "layout-independent settings; each rank adds the rest)")
    p.add_argument("--hosts", default=None, help="H1:slots,H2:slots when the ranks span hosts")
    p.add_argument("--local-size", type=int, default=None, help="ranks on the first host (default: --np, "
                                                                "or from --hosts)")
    p.add_argument("--mpirun", action="store_true", help="the job is started by mpirun: also mpirun's own "
                                                         "settings (how long ranks get to stop on Ctrl-C)")
    args = p.parse_args(argv)
    env = {**job_env_defaults(args.np, args.hosts, args.local_size), **(MPIRUN if args.mpirun else {})}
    print(shell_exports(env) if args.sh else "\n".join(f"{k}={v}" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
