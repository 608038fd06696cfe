"""The MPI fallback's strategy options inside every rank of a real job: post-local-SGD warm-up,
the outer optimizer (and how it relates to alpha-mixing), exact resume with their state."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from conftest import requires_mpi
from hvdtrain.config import load_config
from hvdtrain.registry import Job
from hvdtrain.strategies import make_strategy
from hvdtrain.strategies.mpi_average import FlatAverager
from hvdtrain.strategies.outer import OuterOptimizer
from hvdtrain.train import Preempted, train

pytestmark = requires_mpi


class Waves(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(11)
        self.x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        self.y = torch.cos(self.x.sum(1, keepdim=True))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def net(seed: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)  # a different start on every rank: the broadcast must fix it
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Dropout(dropout), nn.Linear(12, 1)).double()


def state(model: nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1) for v in model.state_dict().values()])


def fit(comm, out, stop=lambda: False, resume=False, model=None, **sync):
    settings = {"sync": {"backend": "mpi", **sync}, "epochs": 2, "batch_size": 8, "seed": 1, "log_every": 2,
                "threads": 1, "out": str(out), "resume": resume,
                "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.5}}
    cfg = load_config(None, settings)
    model = model or net(comm.rank)
    train(cfg, make_strategy(cfg), stop, job=Job(model=model, train_data=Waves(32 * comm.size)))
    return state(model)


def test_warmup_over_every_step_equals_horovod(comm, shared_dir):
    total = 2 * (32 // 8)  # epochs x steps per epoch
    horovod = load_config(None, {"sync": {"backend": "horovod"}, "epochs": 2, "batch_size": 8, "seed": 1,
                                 "threads": 1, "out": str(shared_dir / "h"),
                                 "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.5}})
    m_hvd = net(comm.rank)
    train(horovod, make_strategy(horovod), job=Job(model=m_hvd, train_data=Waves(32 * comm.size)))
    warm = fit(comm, shared_dir / "w", warmup_allreduce_steps=total, sync_every=1000)
    err = float((warm - state(m_hvd)).abs().max() / state(m_hvd).abs().max())
    print(f"mpi with gradient warm-up over all steps vs horovod: max relative error {err:.3g}")
    assert err < 1e-14  # float64, the same update: only summation order differs (measured <= 1.3e-16)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_warmup_then_local_steps_differs_from_pure_warmup(comm, shared_dir):
    """W = 2 then local SGD (k = 3) against gradient averaging for all 8 steps (W = 8) and against
    no warm-up at all. Runs that differ only in rounding agree to < 1e-12 here (float64: see the
    equivalence tests), so a relative difference above 1e-6 to each shows both that the warm-up
    ran and that the run switched to local steps after it."""
    a = fit(comm, shared_dir / "a", warmup_allreduce_steps=2, sync_every=3)
    b = fit(comm, shared_dir / "b", warmup_allreduce_steps=8, sync_every=3)
    c = fit(comm, shared_dir / "c", sync_every=3)
    print(f"warm-up 2 + k=3 vs warm-up over all steps {rel_diff(a, b):.3g}, vs no warm-up {rel_diff(a, c):.3g}")
    assert rel_diff(a, b) > 1e-6 and rel_diff(a, c) > 1e-6


def test_outer_sgd_lr1_no_momentum_is_plain_averaging(comm, shared_dir):
    plain = fit(comm, shared_dir / "p", sync_every=3)
    outer = fit(comm, shared_dir / "o", sync_every=3, outer_optimizer="sgd", outer_lr=1.0, outer_momentum=0.0)
    assert torch.allclose(plain, outer, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_alpha_mixing_against_outer_sgd(comm, alpha):
    """Outer SGD(lr=alpha, no momentum) = alpha-mixing - (1 - alpha)(theta_i - theta_g): equal at
    alpha = 1 (and without drift); the difference is each rank's kept share of its own drift."""
    size, rank = comm.size, comm.rank
    weights = [(r + 1) / sum(range(1, size + 1)) for r in range(size)]
    theta_g = np.linspace(-1, 1, 7)
    drift = lambda r: np.sin(np.arange(7) * (r + 2.0))  # noqa: E731  each rank's local steps
    theta_bar = sum(w * (theta_g + drift(r)) for r, w in enumerate(weights))  # computed here, by hand
    mixed_p = [torch.from_numpy(theta_g + drift(rank))]
    FlatAverager(comm, mixed_p, weights[rank], alpha, "native").sync()
    outer = OuterOptimizer("sgd", alpha, 0.0)
    outer.reset(theta_g)
    outer_p = [torch.from_numpy(theta_g + drift(rank))]
    FlatAverager(comm, outer_p, weights[rank], 1.0, "native").sync(outer.step)
    mixing = theta_g + drift(rank) + alpha * (theta_bar - theta_g - drift(rank))
    np.testing.assert_allclose(mixed_p[0].numpy(), mixing, rtol=0, atol=1e-12)
    np.testing.assert_allclose(outer_p[0].numpy(), theta_g + alpha * (theta_bar - theta_g), rtol=0, atol=1e-12)
    np.testing.assert_allclose(outer_p[0].numpy(), mixing - (1 - alpha) * drift(rank), rtol=0, atol=1e-12)


def test_outer_nesterov_two_syncs_by_hand(comm):
    size, rank = comm.size, comm.rank
    w = [1 / size] * size
    lr, mu = 0.7, 0.9
    g0 = np.arange(4.0)
    outer = OuterOptimizer("nesterov", lr, mu)
    outer.reset(g0)
    g, v = g0.copy(), np.zeros(4)
    for round_ in range(2):
        local = g + (rank + 1) * (round_ + 1) * np.array([0.1, -0.2, 0.3, 0.05])
        avg = sum(g + (r + 1) * (round_ + 1) * np.array([0.1, -0.2, 0.3, 0.05]) for r in range(size)) / size
        delta = g - avg
        v = mu * v + delta
        g = g - lr * (delta + mu * v)
        p = [torch.from_numpy(local.copy())]
        FlatAverager(comm, p, w[rank], 1.0, "native").sync(outer.step)
        np.testing.assert_allclose(p[0].numpy(), g, rtol=0, atol=1e-12)
        assert np.abs(g - avg).max() > 1e3 * 1e-12  # plain averaging would fail the assert above


OUTER_TOL = 1e-12  # float64 values of order 1, a handful of operations: rounding is ~1e-15


@pytest.mark.parametrize("kind", ["sgd", "nesterov"])
def test_outer_step_through_the_strategy_by_hand(comm, kind):
    """The `mpi` strategy with an outer optimizer, driven step by step: every rank starts from
    theta_g, drifts by its own local steps, and at each sync (every 2 steps) every rank must hold
    the outer optimizer's result, written out here from DESIGN.md's rule with unequal weights
    w_r = (r + 1) / sum: theta_bar = sum_r w_r theta_r, Delta = theta_g - theta_bar,
    v <- mu v + Delta, theta_g <- theta_g - lr v (sgd) or theta_g - lr (Delta + mu v) (nesterov).
    Plain averaging (theta_bar) and the same step without momentum both differ from it by far
    more than the tolerance, so neither passes for it."""
    size, rank = comm.size, comm.rank
    lr, mu, k = 0.7, 0.9, 2
    cfg = load_config(None, {"sync": {"backend": "mpi", "sync_every": k, "outer_optimizer": kind, "outer_lr": lr,
                                      "outer_momentum": mu}, "threads": 1})
    strategy = make_strategy(cfg)
    model = nn.Linear(3, 2).double()  # 8 parameters: W (6) and b (2)
    theta_g = np.linspace(-1.0, 1.0, 8)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.from_numpy(theta_g + rank), model.parameters())
    sizes = [r + 1 for r in range(size)]
    weights = [n / sum(sizes) for n in sizes]
    optimizer = strategy.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), sizes)
    strategy.broadcast_state(model, optimizer)  # every rank: rank 0's theta_g, the outer start point

    def params() -> np.ndarray:
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy().copy()

    def local_step(new: np.ndarray) -> None:  # in place, as an optimizer's step updates parameters
        offset = 0
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.from_numpy(new[offset:offset + p.numel()]).view_as(p))
                offset += p.numel()

    np.testing.assert_array_equal(params(), theta_g)
    drift = lambda r, t: np.cos(np.arange(8) * (r + 1.0) + t) * (r + 1) / 4  # noqa: E731  rank r, step t
    g, v = theta_g.copy(), np.zeros(8)
    for step in range(1, 2 * k + 1):
        local_step(params() + drift(rank, step))
        assert strategy.after_step(step, model) == (step % k == 0)
        if step % k:
            continue
        # every rank's replica before this sync, written out: theta_g plus its drifts since the last one
        local = [g + sum(drift(r, t) for t in range(step - k + 1, step + 1)) for r in range(size)]
        theta_bar = sum(w * x for w, x in zip(weights, local))
        delta = g - theta_bar
        no_momentum = g - lr * delta
        v = mu * v + delta
        g = g - lr * v if kind == "sgd" else g - lr * (delta + mu * v)
        np.testing.assert_allclose(params(), g, rtol=0, atol=OUTER_TOL)
        assert np.abs(g - theta_bar).max() > 1e3 * OUTER_TOL, "expected equals plain averaging: test is blind"
        if step > k:  # from the second sync on, momentum carries the first sync's Delta
            assert np.abs(g - no_momentum).max() > 1e3 * OUTER_TOL, "momentum has no effect: test is blind"


def test_outer_optimizer_leaves_replicas_identical(comm, shared_dir):
    final = fit(comm, shared_dir / "n", sync_every=3, outer_optimizer="nesterov")
    copies = comm.allgather(final)
    assert all(torch.equal(c, copies[0]) for c in copies)
    # and train() really took the outer steps: plain averaging ends elsewhere, far beyond rounding
    plain = fit(comm, shared_dir / "plain", sync_every=3)
    print(f"outer nesterov vs plain averaging, k=3: max relative difference {rel_diff(final, plain):.3g}")
    assert rel_diff(final, plain) > 1e-6


@pytest.mark.parametrize("options", [dict(outer_optimizer="nesterov", warmup_allreduce_steps=3),
                                     dict(outer_optimizer="sgd", outer_lr=0.5, outer_momentum=0.8)])
def test_resume_is_exact_with_outer_state(comm, shared_dir, options):
    straight = fit(comm, shared_dir / "s", sync_every=3, model=net(comm.rank, 0.2), **options)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] == 3  # step 6: mid-run, after syncs with outer momentum

    with pytest.raises(Preempted):
        fit(comm, shared_dir / "r", stop, sync_every=3, model=net(comm.rank, 0.2), **options)
    resumed = fit(comm, shared_dir / "r", resume=True, sync_every=3, model=net(comm.rank, 0.2), **options)
    assert torch.equal(straight, resumed)


def test_hierarchy_on_one_host_equals_plain_averaging(comm, shared_dir):
    """One host: every rank is in the same group, so K,K is plain averaging every K."""
    plain = fit(comm, shared_dir / "p", sync_every=4)
    hier = fit(comm, shared_dir / "h", hierarchy=(4, 4))
    assert torch.allclose(plain, hier, rtol=0, atol=1e-12)
    local_often = fit(comm, shared_dir / "l", hierarchy=(2, 4))  # on one host: averaging every 2
    assert torch.allclose(local_often, fit(comm, shared_dir / "k2", sync_every=2), rtol=0, atol=1e-12)


class Throttled(nn.Module):
    """A user's model whose forward sleeps: how the tests make one rank slower than the others."""

    def __init__(self, inner: nn.Module, seconds: float) -> None:
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x)


def test_time_based_weights_are_the_steps_since_the_last_sync(comm):
    """Rank r takes r + 1 steps, then all sync: theta = sum_r (r + 1) theta_r / sum_r (r + 1)."""
    size, rank = comm.size, comm.rank
    cfg = load_config(None, {"sync": {"backend": "mpi", "sync_every_seconds": 3600.0}, "threads": 1})
    strategy = make_strategy(cfg)
    model = nn.Linear(3, 2).double()
    values = lambda r: np.arange(8.0) * (r + 1) + r ** 2  # noqa: E731  W (6) and b (2), rank r's
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.from_numpy(values(rank)), model.parameters())
    strategy.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), [1 / size] * size)
    for step in range(1, rank + 2):
        if step == rank + 1:
            strategy._round_start = time.perf_counter() - 7200  # this rank's T seconds are over
        assert strategy.after_step(step, model) == (step == rank + 1)
    expected = sum((r + 1) * values(r) for r in range(size)) / sum(r + 1 for r in range(size))
    got = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert strategy.global_steps == sum(r + 1 for r in range(size)) and strategy.syncs == 1


def test_time_based_slow_rank_does_not_hold_the_others_back(comm, shared_dir):
    """The last rank sleeps 4x longer per step: it takes fewer steps, the others do not wait
    for it between syncs; the run ends at the first sync past the budget, replicas identical,
    with logs, checkpoints and evaluations (all collectives) only where the ranks meet, and the
    lr schedule at its end on every rank."""
    size, rank = comm.size, comm.rank
    slow = rank == size - 1
    model = Throttled(net(rank), 0.02 if slow else 0.005)
    cfg = load_config(None, {"sync": {"backend": "mpi", "sync_every_seconds": 0.12}, "epochs": 4,
                             "batch_size": 8, "seed": 1, "log_every": 1, "checkpoint_every": 2,
                             "eval_every": 2, "threads": 1, "out": str(shared_dir / "t"),
                             "optim": {"name": "sgd", "lr": 0.05, "lr_schedule": "cosine"}})
    data = Waves(128 * size)
    made = []
    optimizer = lambda params: made.append(torch.optim.SGD(params, lr=0.05)) or made[-1]  # noqa: E731
    summary = train(cfg, make_strategy(cfg), job=Job(model=model, train_data=data, eval_data=Waves(16 * size),
                                                     optimizer=optimizer))
    # The schedule follows the job's progress, not the rank's own steps: when all ranks together
    # have trained the budget, every rank's cosine is at its end (a slow rank's own count is not).
    assert made[0].param_groups[0]["lr"] == 0.0
    copies = comm.allgather(state(model))
    assert all(torch.equal(c, copies[0]) for c in copies)
    steps = comm.bcast(summary["steps_by_rank"] if rank == 0 else None)
    budget = 4 * (128 // 8) * size  # epochs x steps per epoch x ranks
    print(f"time-based, rank {size - 1} slowed 4x: steps by rank {steps}, budget {budget}")
    assert sum(steps) >= budget
    assert all(steps[-1] * 2 < s for s in steps[:-1])  # fast ranks took > 2x the slow rank's steps
    if rank == 0:
        assert summary["samples"] == sum(steps) * 8
        assert summary["steps"] == steps[0]
