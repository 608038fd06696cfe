"""Built-in models (registered in hvdtrain.registry). They know nothing of ranks."""
from __future__ import annotations

import torch
from torch import nn



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
