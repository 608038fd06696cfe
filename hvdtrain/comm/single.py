"""One process, no communication: laptop runs and the reference in equivalence tests."""
from __future__ import annotations

from typing import Any

import numpy as np

from hvdtrain.comm.base import Comm


class SingleComm(Comm):
    kind = "single"

    def __init__(self) -> None:
        super().__init__(rank=0, size=1, local_rank=0, local_size=1)

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64).copy()

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]
