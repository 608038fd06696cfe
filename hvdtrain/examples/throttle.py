"""A slowed rank, for trying time-based averaging: wraps any model so that one rank's steps
take `factor` times as long (it sleeps (factor - 1) x its own measured compute time per step).

    mpirun -np 2 hvdtrain train --backend mpi --sync-every-seconds 0.5 \
        --model hvdtrain.examples.throttle:Throttled \
        --model-args '{"model": "hvdtrain.examples.digits_cnn:DigitsCNN", "factor": 2, "rank": 1}' \
        --data hvdtrain.examples.digits_cnn:digits_datasets --optimizer adam --lr 0.003

A step's compute is timed from one forward call to the next, minus the sleep; the sleep is
taken in forward, so evaluation (no_grad) batches are not slowed.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from hvdtrain.layout import detect_layout
from hvdtrain.plugins import call_plugin, load_attr


class Throttled(nn.Module):
    def __init__(self, model: str, factor: float = 2.0, rank: int = 1, args: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not factor >= 1:
            raise ValueError(f"factor must be >= 1, got {factor!r}")
        self.inner = call_plugin(model, "--model-args model", load_attr(model, "--model-args model"), **(args or {}))
        self.factor = float(factor)
        self.slowed = detect_layout(os.environ).rank == rank
        self._last: float | None = None
        self._slept = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slowed and self.training and torch.is_grad_enabled():
            now = time.perf_counter()
            if self._last is not None:
                compute = max(0.0, now - self._last - self._slept)
                self._slept = (self.factor - 1) * compute
                time.sleep(self._slept)
            self._last = now
        return self.inner(x)
