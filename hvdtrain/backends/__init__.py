"""Backends: how replicas are kept in step. Only this package imports horovod or mpi4py."""
from __future__ import annotations

import os

from hvdtrain.backends.base import Backend
from hvdtrain.config import ConfigError, TrainConfig
from hvdtrain.layout import detect_layout

INSTALL_HINT = "run `make install` (mpi_jobs/install.sh) to build it into the virtualenv"


def make_backend(cfg: TrainConfig) -> Backend:
    """Start the communication library for `cfg.sync.backend` and check it against the launcher."""
    layout = detect_layout(os.environ)
    if cfg.sync.backend != "single":
        _env_defaults(cfg)
    backend = _start(cfg)
    if layout.launcher != "none" and (layout.rank, layout.size) != (backend.rank, backend.size):
        raise ConfigError(
            f"{layout.launcher} started this process as rank {layout.rank} of {layout.size} "
            f"({', '.join(layout.variables)}) but backend '{backend.name}' sees rank {backend.rank} of "
            f"{backend.size}; launch --backend mpi with mpirun/srun --mpi=pmix (not horovodrun --gloo), "
            f"and use an mpi4py built against the launcher's MPI")
    return backend


def _env_defaults(cfg: TrainConfig) -> None:
    """hvdtrain's MPI/Horovod settings, before MPI starts (the user's exported values win)."""
    from hvdtrain.backends.allreduce_impls import horovod_env_defaults
    defaults = horovod_env_defaults()
    if cfg.collective_timeout > 0:  # Horovod's own stall check ends a stalled job too
        defaults["HOROVOD_STALL_CHECK_TIME_SECONDS"] = str(max(1, int(min(60, cfg.collective_timeout / 2))))
        defaults["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = str(max(2, int(cfg.collective_timeout)))
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def _start(cfg: TrainConfig) -> Backend:
    name = cfg.sync.backend
    if name == "single":
        from hvdtrain.backends.single import SingleBackend
        return SingleBackend()
    if name == "horovod":
        try:
            from hvdtrain.backends.horovod import HorovodBackend
        except ImportError as exc:
            raise ConfigError(f"backend 'horovod' needs Horovod with PyTorch support, which cannot be "
                              f"imported ({exc}); {INSTALL_HINT}, or use --backend mpi") from None
        return HorovodBackend(cfg.sync, cfg.optim)
    try:
        from hvdtrain.backends.mpi import MPIBackend
    except ImportError as exc:
        raise ConfigError(f"backend 'mpi' needs mpi4py, which cannot be imported ({exc}); "
                          f"{INSTALL_HINT}") from None
    return MPIBackend(cfg.sync)


__all__ = ["Backend", "make_backend"]
