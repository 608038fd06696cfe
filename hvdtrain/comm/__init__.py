"""Comm: rank layout and small collectives over mpi4py, Horovod or one process.

`make_comm(kind)` starts the library once per process (later calls reuse it, so a script may
call `hvdtrain.fit` several times) and checks its world against the launcher's variables.
"""
from __future__ import annotations

import atexit
import os

from hvdtrain.comm.base import Comm, default_threads, pick_device
from hvdtrain.config import ConfigError
from hvdtrain.layout import detect_layout

INSTALL_HINT = "run `make install` (mpi_jobs/install.sh) to build it into the virtualenv"
KINDS = ("horovod", "mpi", "ddp", "single")
_started: dict[str, Comm] = {}


def env_defaults(collective_timeout: float) -> None:
    """hvdtrain's MPI/Horovod settings, before MPI starts (the user's exported values win)."""
    from hvdtrain.comm.env import horovod_env_defaults
    defaults = horovod_env_defaults()
    if collective_timeout > 0:  # Horovod's own stall check ends a stalled job too
        defaults["HOROVOD_STALL_CHECK_TIME_SECONDS"] = str(max(1, int(min(60, collective_timeout / 2))))
        defaults["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = str(max(2, int(collective_timeout)))
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def make_comm(kind: str, collective_timeout: float = 300.0) -> Comm:
    if kind in _started:
        return _started[kind]
    layout = detect_layout(os.environ)
    if kind != "single":
        env_defaults(collective_timeout)
    comm = _start(kind)
    if layout.launcher != "none" and kind != "single" and (layout.rank, layout.size) != (comm.rank, comm.size):
        raise ConfigError(
            f"{layout.launcher} started this process as rank {layout.rank} of {layout.size} "
            f"({', '.join(layout.variables)}) but the {kind} library sees rank {comm.rank} of "
            f"{comm.size}; launch --backend mpi with mpirun/srun --mpi=pmix (not horovodrun --gloo), "
            f"and use an mpi4py built against the launcher's MPI")
    _started[kind] = comm
    if kind in ("horovod", "ddp"):
        atexit.register(comm.shutdown)
    return comm


def _start(kind: str) -> Comm:
    if kind == "single":
        from hvdtrain.comm.single import SingleComm
        return SingleComm()
    if kind == "horovod":
        try:
            from hvdtrain.comm.horovod import HorovodComm
        except ImportError as exc:
            raise ConfigError(f"backend 'horovod' needs Horovod with PyTorch support, which cannot be "
                              f"imported ({exc}); {INSTALL_HINT}, or use --backend mpi") from None
        return HorovodComm()
    if kind == "ddp":
        from hvdtrain.comm.torchdist import TorchDistComm
        return TorchDistComm()
    if kind == "mpi":
        try:
            from hvdtrain.comm.mpi import MPIComm
        except ImportError as exc:
            raise ConfigError(f"backend 'mpi' needs mpi4py, which cannot be imported ({exc}); "
                              f"{INSTALL_HINT}") from None
        return MPIComm()
    raise ConfigError(f"communication library {kind!r} is unknown; use one of {', '.join(KINDS)}")


__all__ = ["Comm", "make_comm", "pick_device", "default_threads", "KINDS"]
