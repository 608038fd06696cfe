"""`horovod`: gradients averaged by Horovod's ring-allreduce every step (NCCL on GPU; MPI or Gloo).

Buffers (BatchNorm running statistics) are averaged over ranks every step in one grouped
allreduce, so every rank holds identical parameters *and* buffers after each step. DDP instead
broadcasts rank 0's buffers before each forward; averaging keeps statistics of every rank's data
(rank 0's alone describe only its block). The buffer allreduce starts as soon as a training
forward has updated them and runs while backward does (Horovod fuses it with the gradient
allreduces); the step waits for both.
"""
from __future__ import annotations

import time
from typing import Any

import torch

import horovod.torch as hvd  # noqa: E402

from hvdtrain.strategies.base import SyncStrategy, float_buffers, ring_bytes


class HorovodAllreduce(SyncStrategy):
    name = "horovod"
    comm_kind = "horovod"
    replicas_identical = True
    takes_accumulation = True
    scales_lr = True

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               sizes: list[int]) -> torch.optim.Optimizer:
        self.scale_lr(optimizer)  # hvdtrain: the global batch is size x larger
        fp16 = self.sync_cfg.fp16
        self._payload = sum(p.numel() * (2 if fp16 and p.is_floating_point() else p.element_size())
                            for p in model.parameters() if p.requires_grad)
        self._buffers = float_buffers(model) if self.size > 1 else []
        self._payload += sum(b.numel() * b.element_size() for b in self._buffers)
        self._launches, self._pending, self._prefix = 0, None, ""
        self._hook = model.register_forward_hook(self._buffers_ready) if self._buffers else None
        return hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(),
            compression=hvd.Compression.fp16 if fp16 else hvd.Compression.none,
            backward_passes_per_step=self.sync_cfg.backward_passes_per_step)

    def _buffers_ready(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        """After a training forward the statistics are final for this step: average them now."""
        if not module.training:  # evaluation forwards differ in count between ranks
            return
        self._wait_buffers()
        self._launches += 1
        self._pending = hvd.grouped_allreduce_async_(self._buffers, op=hvd.Average,
                                                     name=f"hvdtrain.{self._prefix}buffers.{self._launches}")

    def _wait_buffers(self) -> None:
        if self._pending is not None:
            hvd.synchronize(self._pending)
            self._pending = None

    def step(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> None:
        # The allreduces started during backward; waiting for them is the communication time.
        start = time.perf_counter()
        optimizer.synchronize()  # type: ignore[attr-defined]
        self._wait_buffers()
        self.comm_seconds += time.perf_counter() - start
        self.bytes_sent += ring_bytes(self._payload, self.size)
        if scaler is not None:
            scaler.unscale_(optimizer)  # gradients are already averaged: identical inf checks
        with optimizer.skip_synchronize():  # type: ignore[attr-defined]
            super().step(optimizer, scaler)

    def finish(self, model: torch.nn.Module, step: int) -> None:
        self._wait_buffers()
        self.detach()

    def detach(self) -> None:
        hook = getattr(self, "_hook", None)
        if hook is not None:  # the user's model goes back without hvdtrain's hook
            hook.remove()
            self._hook = None

    def broadcast_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
