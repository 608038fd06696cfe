"""`hvdtrain.fit` in one plain process (no launcher): the forms each argument may take."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

import hvdtrain
from hvdtrain.registry import warmup_cosine


def blobs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) * 0.3 + nn.functional.one_hot(y, 4).float() * 2
    return x, y


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def test_arrays_callable_model_and_eval_pair(tmp_path):
    summary = hvdtrain.fit(small, blobs(512, 0), blobs(128, 1), optimizer="adam", lr=0.01, epochs=3,
                           batch_size=32, out=str(tmp_path), threads=1)
    assert summary["backend"] == "single" and summary["world_size"] == 1  # no launcher: one process
    assert summary["eval_accuracy"] > 0.95 and summary["steps"] == 3 * (512 // 32)


def test_user_scheduler_is_stepped_once_per_step(tmp_path):
    calls = []

    def scheduler(opt):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: calls.append(s) or 0.5 ** s)
        return sched

    model = small()
    summary = hvdtrain.fit(model, blobs(256, 0), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                           scheduler=scheduler, epochs=2, batch_size=32, out=str(tmp_path), threads=1)
    assert calls == list(range(summary["steps"] + 1))  # once at construction, then once per step


@pytest.mark.parametrize("warmup,total", [(0, 10), (4, 10), (5, 5)])
def test_warmup_cosine_factors(warmup, total):
    f = warmup_cosine(warmup, total, cosine=True)
    for s in range(total + 1):
        if s < warmup:
            expected = (s + 1) / warmup
        else:
            expected = (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup)))) / 2
        assert f(s) == pytest.approx(expected)
    assert warmup_cosine(3, 10, cosine=False)(7) == 1.0


def test_cosine_schedule_reaches_zero_at_the_end(tmp_path):
    model = small()
    seen = []
    hvdtrain.fit(model, blobs(256, 0), optimizer=lambda p: _Recording(p, seen), lr_schedule="cosine",
                 warmup_steps=2, epochs=1, batch_size=32, out=str(tmp_path), threads=1)
    assert seen[:2] == pytest.approx([0.05, 0.1]) and seen[-1] == pytest.approx(
        0.1 * (1 + math.cos(math.pi * 5 / 6)) / 2)


class _Recording(torch.optim.SGD):
    def __init__(self, params, seen):
        super().__init__(params, lr=0.1)
        self.seen = seen

    def step(self, closure=None):
        self.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_builtin_name_and_folder_as_train_data(tmp_path):
    summary = hvdtrain.fit(lambda: nn.Sequential(nn.Linear(64, 10)), "digits", optimizer="adam", lr=0.01,
                           epochs=2, out=str(tmp_path / "a"), threads=1)
    assert summary["eval_accuracy"] > 0.8
    folder = tmp_path / "a" / "data" / "digits-seed0"
    summary = hvdtrain.fit(nn.Linear(64, 10), str(folder), epochs=1, out=str(tmp_path / "b"), threads=1)
    assert summary["data"] == str(folder)


@pytest.mark.parametrize("kwargs,match", [
    (dict(model=3), "got int 3; pass an nn.Module"),
    (dict(model=lambda: 3), "returned int, not a torch.nn.Module"),
    (dict(optimizer=lambda p: "sgd please"), "not a torch.optim.Optimizer"),
    (dict(batchsize=8), r"unknown fit\(\) setting 'batchsize' \(did you mean 'batch_size'\?\)"),
    (dict(loss="hinge"), "loss 'hinge' is unknown"),
    (dict(train_data=[1, 2, 3]), "pass a map-style torch Dataset"),
    (dict(train_data=(np.zeros((8, 4), np.float32), np.zeros(7, np.int64))), "X has 8 rows but y has 7"),
    (dict(scheduler=lambda opt: 5), "not an LR scheduler"),
    (dict(epochs=0), "epochs must be an integer >= 1"),
])
def test_bad_arguments_raise_config_error(tmp_path, kwargs, match):
    args = {"model": small, "train_data": blobs(64, 0), **kwargs}
    model, data = args.pop("model"), args.pop("train_data")
    with pytest.raises(hvdtrain.ConfigError, match=match):
        hvdtrain.fit(model, data, out=str(tmp_path), threads=1, **args)
    assert issubclass(hvdtrain.ConfigError, ValueError)
