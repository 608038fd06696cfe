"""A model whose training steps take at least `delay` seconds (tests/test_interrupt.py): a window of
--log-every steps then lasts longer than Open MPI's default time between SIGTERM and SIGKILL, as
the steps of a large model do. `--model support.slow_model:SlowNet --model-args '{"delay": 0.02}'`
with tests/ on PYTHONPATH; built for the built-in regression set (10 features, 1 output)."""
from __future__ import annotations

import time

import torch
from torch import nn


class SlowNet(nn.Module):
    def __init__(self, delay: float = 0.02, features: int = 10, outputs: int = 1) -> None:
        super().__init__()
        self.delay = float(delay)
        self.net = nn.Sequential(nn.Linear(features, 20), nn.Tanh(), nn.Linear(20, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            time.sleep(self.delay)
        return self.net(x)
