"""Collectives over mpi4py's COMM_WORLD (`.mpi` is the raw communicator for strategies)."""
from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from hvdtrain.comm.base import Comm


class MPIComm(Comm):
    kind = "mpi"

    def __init__(self) -> None:
        self.mpi = MPI.COMM_WORLD
        local = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.mpi.rank)
        super().__init__(self.mpi.rank, self.mpi.size, local.rank, local.size)
        local.Free()

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        buf = np.array(values, dtype=np.float64)
        self.mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.mpi.bcast(obj, root=root)

    def allgather_object(self, obj: Any) -> list[Any]:
        return self.mpi.allgather(obj)

    def gather_object(self, obj: Any, root: int = 0) -> list[Any] | None:
        return self.mpi.gather(obj, root=root)

    def barrier(self) -> None:
        self.mpi.Barrier()

    def abort(self, code: int) -> None:
        self.mpi.Abort(code)
