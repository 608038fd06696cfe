"""The outer optimizer of the MPI fallback (DiLoCo's form of periodic averaging).

With theta_g the parameters after the last sync and theta_bar the weighted average of the
replicas, the pseudo-gradient Delta = theta_g - theta_bar is applied to theta_g:
    sgd:       v <- mu v + Delta;  theta_g <- theta_g - lr v
    nesterov:  v <- mu v + Delta;  theta_g <- theta_g - lr (Delta + mu v)
and every replica continues from the new theta_g. Outer SGD with lr = 1 and mu = 0 is plain
averaging. Compared with alpha-mixing (theta_i + alpha (theta_bar - theta_i)), outer SGD with
lr = alpha and mu = 0 gives theta_g + alpha (theta_bar - theta_g): the two agree when alpha = 1
or when no replica has drifted from theta_g, and otherwise differ by exactly
(1 - alpha)(theta_i - theta_g): alpha-mixing keeps that share of each rank's own drift (so
replicas stay different), the outer step discards it (replicas become identical).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

class OuterOptimizer:
    def __init__(self, kind: str, lr: float, momentum: float) -> None:
        self.kind, self.lr, self.momentum = kind, lr, momentum
        self.globals: np.ndarray | None = None   # theta_g, the same on every rank
        self.velocity: np.ndarray | None = None

    def reset(self, params: np.ndarray) -> None:
        """theta_g <- the replicas' common parameters (after the start-up broadcast or a warm-up)."""
        self.globals = params.copy()
        if self.velocity is None:
            self.velocity = np.zeros_like(params)

    def step(self, average: np.ndarray) -> None:
        """`average` holds theta_bar; on return it holds the new theta_g."""
        assert self.globals is not None and self.velocity is not None, "reset() first"
        delta = np.subtract(self.globals, average, out=average)  # Delta, in place of theta_bar
        self.velocity *= self.momentum
        self.velocity += delta
        if self.kind == "nesterov":
            delta += self.momentum * self.velocity
            update = delta
        else:
            update = self.velocity
        self.globals -= self.lr * update
        np.copyto(average, self.globals)

    def state_dict(self) -> dict[str, Any]:
        if self.globals is None or self.velocity is None:
            return {}
        return {"globals": torch.from_numpy(self.globals.copy()), "velocity": torch.from_numpy(self.velocity.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.globals = state["globals"].numpy().copy()
            self.velocity = state["velocity"].numpy().copy()
