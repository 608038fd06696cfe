"""A generated image set for torchvision-style models (3 x S x S images, 10 classes).

Each class is a fixed random pattern; an image is its class pattern plus noise, shifted by a
random offset, so a CNN must learn it (a linear probe on pixels does poorly). Deterministic in
(seed, index): every rank builds the same set without reading anything.

    hvdtrain train --model torchvision.models:resnet18 --model-args '{"num_classes": 10}' \
                   --data hvdtrain.examples.images:image_datasets
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset


class PatternImages(Dataset):
    num_classes = 10

    def __init__(self, n: int = 2048, size: int = 32, seed: int = 0, noise: float = 0.8) -> None:
        self.n, self.size, self.seed, self.noise = n, size, seed, noise
        gen = torch.Generator().manual_seed(1234)  # the class patterns: the same for every split
        self.patterns = torch.randn(self.num_classes, 3, size, size, generator=gen)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(self.num_classes, (1,), generator=gen))
        shift = [int(s) for s in torch.randint(-2, 3, (2,), generator=gen)]
        image = torch.roll(self.patterns[label], shifts=shift, dims=(1, 2))
        return image + self.noise * torch.randn(image.shape, generator=gen), label


def image_datasets() -> tuple[PatternImages, PatternImages]:
    """(train, eval); sizes from HVDTRAIN_IMAGES (train rows, default 2048) and HVDTRAIN_IMAGE_SIZE (32)."""
    n = int(os.environ.get("HVDTRAIN_IMAGES", "2048"))
    size = int(os.environ.get("HVDTRAIN_IMAGE_SIZE", "32"))
    return PatternImages(n, size, seed=0), PatternImages(max(1, n // 4), size, seed=1)
