"""SyncStrategy: how replicas stay in step. The loop calls, in order: `attach` (wrap the optimizer,
build averaging buffers), `broadcast_state` (rank 0's start point to all), then per step `step`
and `after_step`, and `finish` once at the end. It never learns which strategy runs.

Counters `comm_seconds` and `bytes_sent` hold the time spent waiting on training communication
and the bytes this rank sent for it (ring-allreduce model: 2(N-1)/N x payload).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from hvdtrain.comm.base import Comm, pick_device
from hvdtrain.config import OptimConfig, SyncConfig


def ring_bytes(payload: int, size: int) -> int:
    """Bytes one rank sends in a ring allreduce of `payload` bytes (reduce-scatter + allgather)."""
    return 0 if size <= 1 else (2 * (size - 1) * payload) // size


def float_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Floating-point buffers (e.g. BatchNorm running statistics): averaged at each sync."""
    return [b for b in model.buffers() if b.is_floating_point()]


class SyncStrategy(ABC):
    name: str = "base"
    comm_kind: str = "single"
    """Which Comm (`horovod`, `mpi`, `single`) the strategy runs on."""
    lockstep: bool = True
    """True when every rank takes the same steps (False: time-based, ranks meet only at syncs)."""
    replicas_identical: bool = True
    """True when every rank holds the same optimizer state after each step (checkpoint one copy)."""

    def __init__(self, comm: Comm, sync: SyncConfig, optim: OptimConfig) -> None:
        self.comm, self.sync_cfg, self.optim_cfg = comm, sync, optim
        self.rank, self.size = comm.rank, comm.size
        self.device = pick_device(comm.local_rank, comm.local_size)
        self.comm_seconds = 0.0
        self.bytes_sent = 0

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               weights: list[float]) -> torch.optim.Optimizer:
        """Prepare to synchronise `model`; returns the optimizer the loop must use."""
        return optimizer

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loop calls for the forward pass (DDP wraps it; the others use it as is)."""
        return model

    def step(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> None:
        """One optimizer step (through the AMP GradScaler when given)."""
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    def after_step(self, step: int, model: torch.nn.Module) -> bool:
        """Called after every optimizer step (1-based count); True if replicas were synced."""
        return False

    def more(self, step: int, total_steps: int) -> bool:
        """Does this rank take another step? Every rank must get the same answer at a meeting point."""
        return step < total_steps

    def schedule_position(self, synced: bool) -> int | None:
        """Where the lr schedule should stand after a step, or None to just advance it by one.
        Ranks in lockstep advance together; time-based ranks re-align at every sync."""
        return None

    def tick(self, step: int, synced: bool) -> int | None:
        """The count the loop's log/checkpoint/eval intervals use after `step`, or None where the
        ranks do not meet (they must all run the loop's collectives at the same points). Ranks
        that take the same steps meet after every step; time-based ranks only at syncs."""
        return step

    def finish(self, model: torch.nn.Module, step: int) -> None:
        """After the last step (`step`): leave every rank with the same final model."""

    def detach(self) -> None:
        """Undo what attach did to the user's model (hooks); called however the run ends."""

    def state_dict(self) -> dict[str, Any]:
        """What the strategy must carry across a checkpoint (counters, outer-optimizer state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @abstractmethod
    def broadcast_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Overwrite every rank's parameters, buffers and optimizer state with rank 0's."""
