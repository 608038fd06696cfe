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


class Items(torch.utils.data.Dataset):
    """Good 3-class items, except the one at `at`, which `bad(x, y)` replaces."""
    num_classes = 3

    def __init__(self, bad=None, at: int = 0, n: int = 64):
        self.x, self.y = blobs(n, 0)
        self.bad, self.at = bad, at

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x, y = self.x[i], int(self.y[i])
        return self.bad(x, y) if self.bad is not None and i == self.at else (x, y)


# id, the bad item (from a good (x, y)), its index, what the one-line error must say
BAD_ITEMS = [
    ("label-str", lambda x, y: (x, "cat"), 0, "index 0: label is str 'cat'; labels must be numbers"),
    ("label-none", lambda x, y: (x, None), 5, "index 5: label is None; labels must be numbers"),
    ("features-str", lambda x, y: ("abc", y), 2, "index 2: features are str 'abc'; features must be"),
    ("features-list", lambda x, y: (x.tolist(), y), 0, "index 0: features are list"),
    ("features-dict", lambda x, y: ({"x": x}, y), 0, "index 0: features are dict"),
    ("not-a-pair", lambda x, y: x, 3, "index 3: the item is Tensor; a sample must be an (input, target) pair"),
    ("triple", lambda x, y: (x, y, 0), 1, "index 1: the item is a tuple of 3"),
    ("shape", lambda x, y: (x[:3], y), 3, "index 3: features are Tensor of shape (3,) but index 0 had Tensor of shape (4,)"),
    ("shape-first", lambda x, y: (torch.zeros(9), y), 0, "index 1: features are Tensor of shape (4,) but index 0 had Tensor of shape (9,)"),
    ("type-mix", lambda x, y: (x.numpy(), y), 4, "index 4: features are ndarray of shape (4,) but index 0 had Tensor"),
    ("float-label", lambda x, y: (x, 0.5), 6, "index 6: label is float 0.5 but index 0 had int"),
    ("float-label-declared", lambda x, y: (x, 1.0), 0, "index 0: label is float 1.0 but the data declares num_classes 3"),
    ("nan-features", lambda x, y: (torch.full((4,), float("nan")), y), 7, "index 7: features hold NaN"),
    ("inf-features", lambda x, y: (x / 0, y), 0, "index 0: features hold Inf"),
    ("label-negative", lambda x, y: (x, -1), 2, "index 2: class label -1 is negative"),
    ("label-too-big", lambda x, y: (x, 3), 1, "index 1: class label 3, but the training data has 3 classes"),
]


@pytest.mark.parametrize("case,bad,at,needle", BAD_ITEMS, ids=[c[0] for c in BAD_ITEMS])
def test_first_batch_items_are_checked(tmp_path, case, bad, at, needle):
    with pytest.raises(hvdtrain.ConfigError) as info:
        hvdtrain.fit(small, Items(bad, at), out=str(tmp_path), threads=1, batch_size=8, epochs=1)
    assert needle in str(info.value) and str(info.value).startswith("training data Items "), str(info.value)
    assert "\n" not in str(info.value) and ";" in str(info.value)
    assert not (tmp_path / "summary.json").exists()


def test_eval_items_are_checked_before_training(tmp_path):
    """A bad eval item would otherwise surface at the first evaluation, after training."""
    with pytest.raises(hvdtrain.ConfigError, match=r"^eval data index 2: label is str 'dog'"):
        hvdtrain.fit(small, Items(), Items(lambda x, y: (x, "dog"), 2), out=str(tmp_path), threads=1, batch_size=8)
    with pytest.raises(hvdtrain.ConfigError, match=r"eval data index 0: features of shape \(5,\) but training data "
                                                   r"Items index 0 had \(4,\)"):
        hvdtrain.fit(small, Items(), (torch.zeros(16, 5), torch.zeros(16, dtype=torch.long)), out=str(tmp_path),
                     threads=1, batch_size=8)


def test_array_pairs_of_text_are_config_errors(tmp_path):
    X = np.zeros((16, 4), np.float32)
    with pytest.raises(hvdtrain.ConfigError, match=r"labels y is an array of dtype <U3 .*y.astype\(np.int64\)"):
        hvdtrain.fit(small, (X, np.array(["cat"] * 16)), out=str(tmp_path), threads=1, batch_size=8)
    y = np.zeros(16, np.int64)
    with pytest.raises(hvdtrain.ConfigError, match=r"features X is an array of dtype object"):
        hvdtrain.fit(small, (np.array([None] * 16), y), out=str(tmp_path), threads=1, batch_size=8)
    X[3, 1] = np.nan
    with pytest.raises(hvdtrain.ConfigError, match=r"index 3: features hold NaN"):
        hvdtrain.fit(small, (X, y), out=str(tmp_path), threads=1, batch_size=8)


def test_int32_and_numpy_labels_of_a_dataset_train(tmp_path):
    """Class ids as numpy int32 (cross-entropy takes int64 only) are widened, as the (X, y) path does."""
    class Numpy(Items):
        def __getitem__(self, i):
            return self.x[i].numpy(), np.int32(self.y[i])

    summary = hvdtrain.fit(small, Numpy(), out=str(tmp_path), threads=1, batch_size=8, epochs=1)
    assert summary["steps"] == 8


# a keyword hvdtrain passes the optimizer itself, also in optimizer_args: an error naming both, never a
# silent choice (fit's own objects replacing settings: tests/test_applicability.py)
COLLISIONS = [
    (dict(optimizer="adamw", optimizer_args={"lr": 0.003}),
     '--optimizer-args sets "lr" and so does --lr (its default 0.01); give it once: use --lr 0.003 (fit: lr=0.003)'),
    (dict(optimizer="sgd", lr=0.1, momentum=0.5, optimizer_args={"momentum": 0.9}),
     '--optimizer-args sets "momentum" and so does --momentum (0.5); give it once: use --momentum 0.9'),
    (dict(optimizer_args={"params": []}), '--optimizer-args sets "params", which hvdtrain passes itself'),
    (dict(optimizer=3), "fit(optimizer=...) got int 3"),
]


@pytest.mark.parametrize("kwargs,needle", COLLISIONS, ids=["lr", "momentum", "params", "not-callable"])
def test_optimizer_keyword_collisions_are_errors(tmp_path, kwargs, needle):
    with pytest.raises(hvdtrain.ConfigError) as info:
        hvdtrain.fit(small, blobs(64, 0), out=str(tmp_path), threads=1, batch_size=8, **kwargs)
    assert needle in str(info.value), str(info.value)


def test_optimizer_args_without_a_collision_reach_the_optimizer(tmp_path):
    made = []

    def record(params, **kw):
        made.append(kw)
        return torch.optim.AdamW(params, **kw)

    import sys
    import types
    sys.modules["_hvdtrain_test_opt"] = types.SimpleNamespace(make=record)
    try:
        hvdtrain.fit(small, blobs(64, 0), optimizer="_hvdtrain_test_opt:make", optimizer_args={"weight_decay": 0.1},
                     lr=0.003, out=str(tmp_path), threads=1, batch_size=8, epochs=1)
    finally:
        del sys.modules["_hvdtrain_test_opt"]
    assert made == [{"lr": 0.003, "weight_decay": 0.1}]


BAD_ON_RANK_1 = '''
import sys, torch, hvdtrain
from torch import nn

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 32
    def __getitem__(self, i):
        return torch.ones(4) * i, ("cat" if i == 18 else i % 3)  # 18: in rank 1's block (16..31) only

try:
    hvdtrain.fit(nn.Linear(4, 3), Data(), backend="mpi", batch_size=4, out=sys.argv[1], threads=1)
except hvdtrain.ConfigError as exc:
    sys.stdout.write(f"rank error: {exc}\\n")  # one write: the two ranks' lines do not interleave
    sys.stdout.flush()
    sys.exit(2)
'''


@pytest.mark.mpi
def test_a_bad_item_in_one_ranks_block_is_the_same_error_on_every_rank(tmp_path):
    import sys

    from hvdtrain.tools.launch import launcher_env, mpirun_args
    from support.jobs import run_job
    script = tmp_path / "bad_on_rank_1.py"
    script.write_text(BAD_ON_RANK_1)
    cmd = mpirun_args(2) + [sys.executable, str(script), str(tmp_path / "out")]
    result = run_job(cmd, timeout=180, env=launcher_env(), merge_stderr=True)
    errors = [line for line in result.stdout.splitlines() if line.startswith("rank error:")]
    assert result.returncode == 2 and len(errors) == 2, result.stdout[-3000:]
    assert errors[0] == errors[1] == ("rank error: training data Data index 18: label is str 'cat'; labels must "
                                      "be numbers (int class ids or float targets)"), errors
    assert "Traceback" not in result.stdout
