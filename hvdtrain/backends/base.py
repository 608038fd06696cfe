"""The one seam between the training loop and the communication library.

A Backend knows the rank layout and how replicas are kept in step. The loop calls, in order:
`attach` (wrap the optimizer / build averaging buffers), `broadcast_state` (rank 0's start
point to all), then per step `step` and `after_step`, and `finish` once at the end.
Counters `comm_seconds` and `bytes_sent` hold the time spent waiting on training
communication and the bytes this rank sent for it (ring-allreduce model: 2(N-1)/N x payload).
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch


def ring_bytes(payload: int, size: int) -> int:
    """Bytes one rank sends in a ring allreduce of `payload` bytes (reduce-scatter + allgather)."""
    return 0 if size <= 1 else (2 * (size - 1) * payload) // size


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def default_threads(local_size: int) -> int:
    """Cores this process may use divided by ranks on this host, so ranks do not oversubscribe."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_size))


class Backend(ABC):
    name: str = "base"
    replicas_identical: bool = True
    """True when every rank holds the same optimizer state after each step (checkpoint one copy)."""

    def __init__(self, rank: int, size: int, local_rank: int, local_size: int) -> None:
        self.rank, self.size = rank, size
        self.local_rank, self.local_size = local_rank, local_size
        self.device = pick_device(local_rank)
        self.comm_seconds = 0.0
        self.bytes_sent = 0

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               weights: list[float]) -> torch.optim.Optimizer:
        """Prepare to synchronise `model`; returns the optimizer the loop must use."""
        return optimizer

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def after_step(self, step: int, model: torch.nn.Module) -> bool:
        """Called after every optimizer step (1-based count); True if replicas were synced."""
        return False

    def finish(self, model: torch.nn.Module, step: int) -> None:
        """After the last step (`step`): leave every rank with the same final model."""

    @abstractmethod
    def broadcast_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Overwrite every rank's parameters and optimizer state with rank 0's."""

    @abstractmethod
    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise float64 sum over ranks of a small vector (metrics, flags)."""

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
        """Release the communication library."""
