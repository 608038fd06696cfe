"""`ddp`: torch's DistributedDataParallel (gloo on CPU, nccl on GPU) — the peer users would pick
instead, in the same loop so the comparison is like for like. DDP averages gradients with
bucketed allreduces overlapped with backward; rank 0's parameters and buffers are broadcast when
the model is wrapped, and buffers again before every forward (DDP's broadcast_buffers)."""
from __future__ import annotations

from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from hvdtrain.strategies.base import SyncStrategy, ring_bytes


class DDPStrategy(SyncStrategy):
    name = "ddp"
    comm_kind = "ddp"
    replicas_identical = True
    scales_lr = True
    comm_measured = False  # DDP's allreduces run inside backward; hvdtrain does not time them

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               sizes: list[int]) -> torch.optim.Optimizer:
        self.scale_lr(optimizer)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # As fast as DDP gets: gradients as views of the buckets (no copy), buckets as DDP defaults.
        self.ddp = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
        self._payload = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return optimizer

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.ddp

    def step(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> None:
        # The allreduce ran inside backward (overlapped); it is not timed (comm_measured).
        self.bytes_sent += ring_bytes(self._payload, self.size)
        super().step(optimizer, scaler)

    def detach(self) -> None:
        # The DDP wrapper holds the process group and gloo's pending work (tensors with Python
        # references): dropped here, while the interpreter is whole, so that the process group's
        # worker threads are joined by shutdown() and not at interpreter exit (where a worker that
        # frees a tensor needs the GIL, is ended by Python's finalization and aborts the process:
        # "terminate called without an active exception").
        self.ddp = None

    def broadcast_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for t in model.state_dict().values():  # after a resume: rank 0's checkpointed state
            torch.distributed.broadcast(t, src=0)
        state = self.comm.broadcast_object(optimizer.state_dict() if self.rank == 0 else None)
        if self.rank != 0:
            optimizer.load_state_dict(state)
