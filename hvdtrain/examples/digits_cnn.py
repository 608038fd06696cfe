"""A small CNN (with BatchNorm and dropout) on the UCI digits images (8x8, 10 classes).

    hvdtrain train --model hvdtrain.examples.digits_cnn:DigitsCNN \
                   --data hvdtrain.examples.digits_cnn:digits_datasets --optimizer adam --lr 0.003
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from hvdtrain.data import _digits_arrays


class DigitsCNN(nn.Module):
    def __init__(self, channels: int = 32, num_classes: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(),
            nn.MaxPool2d(2))                                    # 8x8 -> 4x4
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * channels * 16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DigitsImages(Dataset):
    """The digits as (1, 8, 8) float images and integer labels; `split` is train or eval (80/20)."""
    num_classes = 10

    def __init__(self, split: str = "train", seed: int = 0) -> None:
        X, y = _digits_arrays()
        order = np.random.default_rng(seed).permutation(len(X))
        n_eval = len(X) // 5
        idx = order[n_eval:] if split == "train" else order[:n_eval]
        self.X = torch.from_numpy(X[idx].reshape(-1, 1, 8, 8))
        self.y = torch.from_numpy(y[idx])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X[i], self.y[i]


def digits_datasets() -> tuple[DigitsImages, DigitsImages]:
    """(train, eval) for `--data hvdtrain.examples.digits_cnn:digits_datasets`."""
    return DigitsImages("train"), DigitsImages("eval")
