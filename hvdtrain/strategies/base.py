"""SyncStrategy: how replicas stay in step. The loop (train.py) calls, in order: `attach` (wrap the
optimizer, build averaging buffers), then `run(body)`, which calls the body once (Horovod elastic:
once per world, inside `hvd.elastic.run`). The body calls `start_step`, `broadcast_state` (rank 0's
start point to all), then per step `micro_steps` backward passes, `step` and `after_step`,
`checkpoint` where one is due, and `finish` once at the end; `summary` adds the strategy's own
fields to the run summary. The loop never learns which strategy runs, nor reads its settings.

Counters `comm_seconds` and `bytes_sent` hold the time spent waiting on training communication
and the bytes this rank sent for it (ring-allreduce model: 2(N-1)/N x payload).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from hvdtrain.comm.base import Comm, pick_device
from hvdtrain.config import OptimConfig, SyncConfig, TrainConfig
from hvdtrain.errors import ConfigError

T = TypeVar("T")


def ring_bytes(payload: int, size: int) -> int:
    """Bytes one rank sends in a ring allreduce of `payload` bytes (reduce-scatter + allgather)."""
    return 0 if size <= 1 else (2 * (size - 1) * payload) // size


def float_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Floating-point buffers (e.g. BatchNorm running statistics): averaged at each sync."""
    return [b for b in model.buffers() if b.is_floating_point()]


class SyncStrategy(ABC):
    name: str = "base"
    comm_kind: str = "single"
    """Which Comm (`horovod`, `mpi`, `ddp`, `single`) the strategy runs on."""
    lockstep: bool = True
    """True when every rank takes the same steps (False: time-based, ranks meet only at syncs)."""
    replicas_identical: bool = True
    """True when every rank holds the same optimizer state after each step (checkpoint one copy)."""

    comm_measured: bool = True
    """False where the communication overlaps inside the framework and is not timed (DDP's bucket
    allreduces in backward): the run reports its comm time as None (compare: n/a), never 0."""
    takes_accumulation: bool = False
    """Does the strategy take backward_passes_per_step > 1 (Horovod's local accumulation)?"""
    scales_lr: bool = False
    """Does `scale_lr` apply (strategies that average gradients: the global batch grows with N)?"""

    def __init__(self, comm: Comm, sync: SyncConfig, optim: OptimConfig) -> None:
        self.comm, self.sync_cfg, self.optim_cfg = comm, sync, optim
        if sync.backward_passes_per_step != 1 and not self.takes_accumulation:
            raise ConfigError(f"backend {self.name!r} takes backward_passes_per_step 1; use --backend horovod "
                              f"for local gradient accumulation, or drop --backward-passes-per-step")
        self.micro_steps = sync.backward_passes_per_step
        self._base_lrs: list[float] | None = None
        self.rank, self.size = comm.rank, comm.size
        self.device = pick_device(comm.local_rank, comm.local_size)
        self.comm_seconds = 0.0
        self.bytes_sent = 0

    micro_steps: int = 1
    """Backward passes per optimizer step (local gradient accumulation; Horovod's setting)."""

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               sizes: list[int]) -> torch.optim.Optimizer:
        """Prepare to synchronise `model`; `sizes` are every rank's training rows. Returns the
        optimizer the loop must use."""
        return optimizer

    def run(self, body: Callable[[], T]) -> T:
        """Run the loop's body: once here; Horovod elastic runs it again after every reset."""
        return body()

    collectives_before_run: bool = True
    """May the loop's set-up (before `run`) use collectives? Horovod elastic: no."""

    def prepare(self, cfg: TrainConfig) -> TrainConfig:
        """The run's settings as this strategy's loop uses them (elastic: built-in data resolved locally)."""
        return cfg

    def world_started(self, rows: int, steps_epoch: int) -> None:
        """The body has opened this rank's block (`rows` training rows) in the current world."""

    def position(self, step: int, steps_epoch: int) -> tuple[int, int]:
        """(epoch, step within it) where the batches continue after `step`."""
        return divmod(step, steps_epoch)

    def start_step(self) -> int | None:
        """The step the body starts from, or None: from the checkpoint (--resume) or 0."""
        return None

    def checkpoint_due(self, tick: int, every: int) -> bool:
        """Is a checkpoint due at this meeting point (`every` = --checkpoint-every, 0 = never)?"""
        return bool(every) and tick % every == 0

    def checkpoint(self, step: int, save: Callable[[], Path | None]) -> None:
        """A checkpoint is due after `step`: `save()` writes it (rank 0; every rank takes part)."""
        save()

    def layout(self) -> dict[str, Any]:
        """What a checkpoint needs to resume at another world size (the averaging weights)."""
        return {}

    def summary(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The strategy's own fields for the run summary (rank 0), given the loop's."""
        return {}

    def scale_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """--scale-lr: every group's lr is its configured value x the current world size (the
        global batch is N x the per-rank batch). Called at attach, and again when the world changes."""
        if not (self.optim_cfg.scale_lr and self.scales_lr):
            return
        if self._base_lrs is None:
            self._base_lrs = [group["lr"] for group in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, self._base_lrs):
            group["lr"] = lr * self.comm.size

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
