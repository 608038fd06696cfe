"""Comm: the collectives the loop and the strategies need, and nothing else (no training policy).

Implementations: mpi4py (`comm/mpi.py`), Horovod (`comm/horovod.py`), one process
(`comm/single.py`). Only `comm/` and `strategies/` import mpi4py or horovod.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from hvdtrain.layout import Layout, device_index


def pick_device(local_rank: int, local_size: int) -> torch.device:
    """The one device picker: GPU `local_rank` when GPUs are visible (one rank per GPU; more ranks
    than GPUs on a host is a ConfigError naming the fix), CPU otherwise."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device_index(Layout(0, local_size, local_rank, local_size, "none"), count)
    return torch.device("cpu") if index is None else torch.device("cuda", index)


def default_threads(local_size: int) -> int:
    """Cores this process may use divided by ranks on this host, so ranks do not oversubscribe."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_size))


class Comm(ABC):
    """Rank layout plus small collectives (metrics, flags, objects) for every rank of the job."""

    kind: str = "base"
    mpi_settings: dict[str, int] | None = None
    """Open MPI's values of hvdtrain's settings, read back through MPI_T as the comm started
    (comm/env.effective_settings); None where no MPI runs in the process."""

    def __init__(self, rank: int, size: int, local_rank: int, local_size: int) -> None:
        self.rank, self.size = rank, size
        self.local_rank, self.local_size = local_rank, local_size

    @abstractmethod
    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise float64 sum over ranks of a small vector."""

    @abstractmethod
    def broadcast_object(self, obj: Any, root: int = 0) -> Any: ...

    @abstractmethod
    def allgather_object(self, obj: Any) -> list[Any]: ...

    def gather_object(self, obj: Any, root: int = 0) -> list[Any] | None:
        items = self.allgather_object(obj)
        return items if self.rank == root else None

    def barrier(self) -> None:
        self.allreduce_sum(np.zeros(1))

    def abort(self, code: int) -> None:
        """End every rank of the job now (used after an error on one rank)."""
        os._exit(code)

    def shutdown(self) -> None:
        """Release the communication library (once, at process exit)."""
