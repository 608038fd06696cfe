"""Comm: rank layout and small collectives over mpi4py, Horovod or one process.

`make_comm(kind, collective_timeout)` applies hvdtrain's MPI/Horovod settings (comm/env.py), then
starts the library once per process (later calls reuse it, so a script may call `hvdtrain.fit`
several times) and checks its world against the launcher's variables.

Importing this package loads neither torch nor an MPI library (`python -m hvdtrain.comm.env` runs
in job scripts before any rank exists): `Comm`, `pick_device` and `default_threads` come from
comm/base.py on first use.
"""
from __future__ import annotations

import atexit
import os
from typing import TYPE_CHECKING, Any

from hvdtrain.errors import ConfigError
from hvdtrain.layout import detect_layout

if TYPE_CHECKING:
    from hvdtrain.comm.base import Comm

INSTALL_HINT = "run `make install` (mpi_jobs/install.sh) to build it into the virtualenv"
KINDS = ("horovod", "mpi", "ddp", "single")
_started: dict[str, Comm] = {}


def __getattr__(name: str) -> Any:
    if name in ("Comm", "pick_device", "default_threads"):
        from hvdtrain.comm import base
        return getattr(base, name)
    raise AttributeError(f"module 'hvdtrain.comm' has no attribute {name!r}")


def make_comm(kind: str, collective_timeout: float) -> Comm:
    """The `kind` library's Comm; `collective_timeout` is TrainConfig.collective_timeout (seconds
    one synchronisation may wait; 0 = never), which Horovod's stall check and torch.distributed's
    timeout take from here."""
    if kind in _started:
        return _started[kind]
    layout = detect_layout(os.environ)
    if kind != "single":
        from hvdtrain.comm.env import apply_env_defaults
        apply_env_defaults(collective_timeout)
    comm = _start(kind, collective_timeout)
    if layout.launcher != "none" and kind != "single" and (layout.rank, layout.size) != (comm.rank, comm.size):
        raise ConfigError(
            f"{layout.launcher} started this process as rank {layout.rank} of {layout.size} "
            f"({', '.join(layout.variables)}) but the {kind} library sees rank {comm.rank} of "
            f"{comm.size}; launch --backend mpi with mpirun/srun --mpi=pmix (not horovodrun --gloo), "
            f"and use an mpi4py built against the launcher's MPI")
    if kind != "single":  # what Open MPI holds now (MPI_T), for the run's summary; None without MPI
        from hvdtrain.comm.env import effective_settings
        comm.mpi_settings = effective_settings()
    _started[kind] = comm
    if kind in ("horovod", "ddp"):
        atexit.register(comm.shutdown)
    return comm


def _start(kind: str, collective_timeout: float) -> Comm:
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
        return TorchDistComm(collective_timeout)
    if kind == "mpi":
        try:
            from hvdtrain.comm.mpi import MPIComm
        except ImportError as exc:
            raise ConfigError(f"backend 'mpi' needs mpi4py, which cannot be imported ({exc}); "
                              f"{INSTALL_HINT}") from None
        return MPIComm()
    raise ConfigError(f"communication library {kind!r} is unknown; use one of {', '.join(KINDS)}")


__all__ = ["Comm", "make_comm", "pick_device", "default_threads", "KINDS"]
