"""Collectives over Horovod (MPI or Gloo controller): the only `horovod.torch` import in comm/."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

import horovod.torch as hvd  # noqa: E402  (an import error becomes a message in make_comm)

from hvdtrain.comm.base import Comm


class HorovodComm(Comm):
    kind = "horovod"

    def __init__(self) -> None:
        hvd.init()
        super().__init__(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())
        self._calls = 0

    def reset_names(self, world: str) -> None:
        """Horovod elastic: after a reset every rank (a joiner's count is 0) restarts the count, under
        a name of the new world that all ranks agree on (names of an earlier world are never reused:
        Horovod returned an earlier world's result for a reused name)."""
        self._calls, self._world = 0, world

    def _name(self, what: str) -> str:
        self._calls += 1  # Horovod matches collectives across ranks by name
        return f"hvdtrain.{getattr(self, '_world', '')}{what}.{self._calls}"

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(values, dtype=np.float64))
        return hvd.allreduce(t, op=hvd.Sum, name=self._name("sum")).numpy()

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return hvd.broadcast_object(obj, root_rank=root, name=self._name("bcast"))

    def allgather_object(self, obj: Any) -> list[Any]:
        return hvd.allgather_object(obj, name=self._name("gather"))

    def shutdown(self) -> None:
        hvd.shutdown()
