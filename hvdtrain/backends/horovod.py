"""Horovod backend: gradients averaged by ring-allreduce every step (the only horovod import)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from hvdtrain.backends.base import Backend, ring_bytes
from hvdtrain.config import SyncConfig, OptimConfig

import horovod.torch as hvd  # noqa: E402  (import error is turned into a message by make_backend)


class HorovodBackend(Backend):
    name = "horovod"
    replicas_identical = True

    def __init__(self, sync: SyncConfig, optim: OptimConfig) -> None:
        hvd.init()
        super().__init__(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())
        self.sync_cfg, self.optim_cfg = sync, optim
        self._payload = 0
        self._calls = 0

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               weights: list[float]) -> torch.optim.Optimizer:
        if self.optim_cfg.scale_lr:  # hvdtrain: the global batch is size x larger
            for group in optimizer.param_groups:
                group["lr"] *= self.size
        fp16 = self.sync_cfg.fp16
        self._payload = sum(p.numel() * (2 if fp16 and p.is_floating_point() else p.element_size())
                            for p in model.parameters() if p.requires_grad)
        return hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(),
            compression=hvd.Compression.fp16 if fp16 else hvd.Compression.none,
            backward_passes_per_step=self.sync_cfg.backward_passes_per_step)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        # The allreduces started during backward; waiting for them is the communication time.
        start = time.perf_counter()
        optimizer.synchronize()  # type: ignore[attr-defined]
        self.comm_seconds += time.perf_counter() - start
        self.bytes_sent += ring_bytes(self._payload, self.size)
        with optimizer.skip_synchronize():  # type: ignore[attr-defined]
            optimizer.step()

    def broadcast_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        self._calls += 1
        t = torch.as_tensor(np.asarray(values, dtype=np.float64))
        return hvd.allreduce(t, op=hvd.Sum, name=f"hvdtrain.sum.{self._calls}").numpy()

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        self._calls += 1
        return hvd.broadcast_object(obj, root_rank=root, name=f"hvdtrain.bcast.{self._calls}")

    def allgather_object(self, obj: Any) -> list[Any]:
        self._calls += 1
        return hvd.allgather_object(obj, name=f"hvdtrain.gather.{self._calls}")

    def shutdown(self) -> None:
        hvd.shutdown()
