"""Models and losses. They know nothing of ranks."""
from __future__ import annotations

import torch
from torch import nn

from hvdtrain.config import ConfigError, ModelConfig


class Net(nn.Module):
    """The default regression model: Linear(10, 20) -> ReLU -> Linear(20, 1)."""

    def __init__(self, n_features: int = 10, n_outputs: int = 1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_features, 20)
        self.fc2 = nn.Linear(20, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class MLP(nn.Module):
    """Fully connected network with configurable widths (make it wide to load the machine)."""

    def __init__(self, n_features: int, n_outputs: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_model(cfg: ModelConfig, n_features: int, n_outputs: int, task: str) -> nn.Module:
    if cfg.name == "net":
        if task != "regression":
            raise ConfigError(f"model 'net' is for regression but the data is {task}; use --model mlp")
        model: nn.Module = Net(n_features, n_outputs)
    else:
        model = MLP(n_features, n_outputs, cfg.hidden)
    return model.to(getattr(torch, cfg.dtype))


def loss_function(task: str) -> nn.Module:
    """Mean loss over the batch: MSE for regression, cross-entropy for classification."""
    return nn.MSELoss() if task == "regression" else nn.CrossEntropyLoss()
