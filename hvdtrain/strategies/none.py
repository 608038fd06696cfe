"""`single`: one process, no synchronisation (laptop runs, the plain reference)."""
from __future__ import annotations

import torch

from hvdtrain.strategies.base import SyncStrategy


class NoSync(SyncStrategy):
    name = "single"
    comm_kind = "single"

    def broadcast_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass
