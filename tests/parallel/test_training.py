"""Training equivalences and synchronisation invariants, run inside every rank (any world size)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import UNDER_MPI, requires_mpi
from hvdtrain import data as D
from hvdtrain.strategies import make_strategy
from hvdtrain.config import load_config
from hvdtrain.models import Net
from hvdtrain.train import Preempted, train

BACKENDS = ["horovod", "mpi"] if UNDER_MPI else ["horovod"]


def config(out: Path, **sections):
    base = {"out": str(out), "seed": 3, "log_every": 2, "threads": 1}
    for key, value in sections.items():
        base[key] = value
    return load_config(None, base)


def periodic(backend: str, k: int) -> dict:
    """The [sync] table of `backend`, averaging every k steps when it is the MPI fallback (the only
    backend sync_every applies to: config.APPLIES)."""
    return {"backend": backend, **({"sync_every": k} if backend == "mpi" else {})}


def barrier(hvd):
    hvd.allreduce(torch.zeros(1), name="barrier")


def make_data(hvd, folder: Path, name: str = "regression", rows: int = 0) -> Path:
    if hvd.rank() == 0:
        D.make_dataset(name, folder, rows=rows or 48 * hvd.size(), seed=7)
    barrier(hvd)
    return folder


def run(hvd, cfg, **kw):
    summary = train(cfg, make_strategy(cfg), **kw)
    barrier(hvd)
    params = torch.load(Path(cfg.out) / "model.pt", weights_only=True)
    return summary, params


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])


def rel_err(a: dict, b: dict) -> float:
    x, y = flat(a), flat(b)
    return float((x - y).abs().max() / y.abs().max())


def reference_sgd(folder: Path, size: int, batch: int, epochs: int, lr: float, seed: int) -> dict:
    """One process, batch size*batch: each step concatenates every rank's batch (plain torch)."""
    info = D.describe(folder)
    blocks = [D.load_block(folder, D.partition(info.n_train, r, size, "block", seed), dtype="float64")
              for r in range(size)]
    torch.manual_seed(seed)
    model = Net(info.n_features, info.n_outputs).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    steps = D.steps_per_epoch(D.block_sizes(info.n_train, size), batch)
    for epoch in range(epochs):
        orders = [D.epoch_order(len(X), epoch, r, seed) for r, (X, _) in enumerate(blocks)]
        for s in range(steps):
            rows = [o[s * batch:(s + 1) * batch] for o in orders]
            xb = torch.from_numpy(np.concatenate([X[i] for (X, _), i in zip(blocks, rows)]))
            yb = torch.from_numpy(np.concatenate([y[i] for (_, y), i in zip(blocks, rows)]))
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xb), yb).backward()
            opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


SGD64 = dict(model={"dtype": "float64"}, optim={"name": "sgd", "lr": 0.05}, epochs=2, batch_size=8)
#: float64 runs that are the same update in exact arithmetic differ only in summation order: measured
#: <= 5e-16 max relative error at 2 and 3 ranks (mpirun, horovodrun --gloo); README.md quotes this bound.
EQUIV_TOL = 1e-14


def test_equivalence_horovod_equals_one_process_big_batch(hvd, shared_dir):
    folder = make_data(hvd, shared_dir / "data")
    cfg = config(shared_dir / "hvd", data={"path": str(folder)}, sync={"backend": "horovod"}, **SGD64)
    _, params = run(hvd, cfg)
    ref = reference_sgd(folder, hvd.size(), batch=8, epochs=2, lr=0.05, seed=3)
    err = rel_err(params, ref)
    print(f"equivalence 1 (horovod x{hvd.size()} vs 1 process): max relative error {err:.3g}")
    assert err < EQUIV_TOL
    start = reference_sgd(folder, hvd.size(), batch=8, epochs=0, lr=0.05, seed=3)  # the same init, untrained
    print(f"moved from the start: max relative change {rel_err(params, start):.3g}")
    assert rel_err(params, start) > 1e6 * EQUIV_TOL  # it trained: the bound above is not met by standing still


@requires_mpi
def test_equivalence_mpi_k1_equals_horovod(hvd, shared_dir):
    folder = make_data(hvd, shared_dir / "data")
    common = dict(data={"path": str(folder)}, **SGD64)
    _, p_hvd = run(hvd, config(shared_dir / "hvd", sync={"backend": "horovod"}, **common))
    _, p_mpi = run(hvd, config(shared_dir / "mpi", sync={"backend": "mpi", "sync_every": 1, "alpha": 1.0},
                               **common))
    err = rel_err(p_mpi, p_hvd)
    print(f"equivalence 2 (mpi k=1 vs horovod, x{hvd.size()}): max relative error {err:.3g}")
    assert err < EQUIV_TOL


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_replicas_identical_after_every_sync(hvd, backend_name):
    """Parameters *and* buffers (BatchNorm statistics) agree after each sync, differ between syncs."""
    cfg = load_config(None, {"sync": periodic(backend_name, 3), "seed": 1})
    backend = make_strategy(cfg)
    torch.manual_seed(backend.rank)  # different initial weights on every rank: the broadcast must fix it
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1))
    opt = backend.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         D.averaging_weights([1] * backend.size))
    backend.broadcast_state(model, opt)
    gen = torch.Generator().manual_seed(100 + backend.rank)  # every rank sees different data

    def state() -> torch.Tensor:
        return torch.cat([v.detach().double().reshape(-1) for v in model.state_dict().values()])

    for step in range(1, 8):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(torch.randn(16, 10, generator=gen)),
                                     torch.randn(16, 1, generator=gen)).backward()
        backend.step(opt)
        synced = backend.after_step(step, model) or backend.replicas_identical
        copies = backend.comm.allgather_object(state())
        same = all(torch.equal(c, copies[0]) for c in copies)
        assert same == (synced or backend.size == 1), f"step {step}: synced={synced} identical={same}"
    backend.finish(model, 7)
    copies = backend.comm.allgather_object(state())
    assert all(torch.equal(c, copies[0]) for c in copies)


@requires_mpi
def test_auto_allreduce_picks_shared_memory_on_one_host(comm):
    from hvdtrain.strategies.mpi_average import AUTO_SHARED_BYTES, FlatAverager
    small = FlatAverager(comm, [torch.zeros(AUTO_SHARED_BYTES // 4 - 1)], 1.0 / comm.size, 1.0, "auto")
    large = FlatAverager(comm, [torch.zeros(AUTO_SHARED_BYTES // 4)], 1.0 / comm.size, 1.0, "auto")
    assert (small.allreduce, large.allreduce) == ("native", "shared")  # every rank of these jobs is on one host


@requires_mpi
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_shared_memory_average_equals_native(comm, dtype, alpha):
    """Shared rows vs scale-then-MPI_Allreduce over three syncs with drift in between, unequal
    weights: with 2 ranks the same bits (fl(w0 x0) + fl(w1 x1) either way), otherwise to rounding;
    every rank holds the same parameters after each sync (alpha = 1)."""
    from hvdtrain.strategies.mpi_average import FlatAverager
    size, rank = comm.size, comm.rank
    weights = [(r + 1) / sum(range(1, size + 1)) for r in range(size)]
    gen = torch.Generator().manual_seed(rank)
    values = [torch.randn(70001, generator=gen, dtype=dtype), torch.randn(3, 4, generator=gen, dtype=dtype)]
    shared, native = [v.clone() for v in values], [v.clone() for v in values]
    a = FlatAverager(comm, shared, weights[rank], alpha, "shared")
    b = FlatAverager(comm, native, weights[rank], alpha, "native")
    assert a.allreduce == "shared"
    for _ in range(3):
        a.sync()
        b.sync()
        for x, y in zip(shared, native):
            if size == 2:
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y)
        if alpha == 1.0:
            flat = torch.cat([x.reshape(-1) for x in shared]).numpy().tobytes()
            assert all(f == flat for f in comm.allgather(flat))
        with torch.no_grad():
            for x, y in zip(shared, native):
                drift = torch.randn(x.shape, generator=gen, dtype=dtype)
                x.add_(drift)
                y.add_(drift)


@requires_mpi
@pytest.mark.parametrize("allreduce", ["native", "ring", "shared"])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_weighted_average_with_uneven_blocks(comm, alpha, allreduce):
    from hvdtrain.strategies.mpi_average import FlatAverager
    size, rank = comm.size, comm.rank
    weights = D.averaging_weights(D.block_sizes(10 * size + 1, size))  # rank 0 has one more row
    value = lambda r: torch.arange(5, dtype=torch.float64) * (r + 1) + 10 * r  # noqa: E731
    params = [value(rank).clone().requires_grad_(), torch.full((2, 2), float(rank), dtype=torch.float64)]
    averager = FlatAverager(comm, params, weights[rank], alpha, allreduce)
    averager.sync()
    mean0 = sum(w * value(r) for r, w in enumerate(weights))
    mean1 = sum(w * float(r) for r, w in enumerate(weights))
    torch.testing.assert_close(params[0].detach(), value(rank) + alpha * (mean0 - value(rank)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(params[1].detach(), torch.full((2, 2), rank + alpha * (mean1 - rank),
                                                               dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dataset", ["regression", "digits"])
def test_loss_decreases(hvd, shared_dir, backend_name, dataset):
    folder = make_data(hvd, shared_dir / dataset, dataset, rows=3000)
    model = {"name": "net"} if dataset == "regression" else {"name": "mlp", "hidden": [64]}
    cfg = config(shared_dir / "out", data={"path": str(folder)}, model=model, epochs=3, batch_size=16,
                 optim={"name": "adam", "lr": 0.01}, sync=periodic(backend_name, 4))
    summary, _ = run(hvd, cfg)
    if hvd.rank() == 0:
        assert summary["final_loss"] < 0.5 * summary["first_loss"], summary
        if dataset == "digits":
            assert summary["eval_accuracy"] > 0.8, summary
        assert summary["world_size"] == hvd.size() and summary["backend"] == backend_name


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_resume_is_exact(hvd, shared_dir, backend_name):
    folder = make_data(hvd, shared_dir / "data", rows=64 * hvd.size())
    common = dict(data={"path": str(folder)}, optim={"name": "sgd", "lr": 0.05, "momentum": 0.9},
                  epochs=3, batch_size=8, sync=periodic(backend_name, 3))
    _, straight = run(hvd, config(shared_dir / "straight", **common))

    calls = {"n": 0}

    def stop_after_two_windows() -> bool:  # the loop asks once per log window (every 2 steps)
        calls["n"] += 1
        return calls["n"] == 4  # step 8: mid-epoch, and not a sync step for k=3

    cfg = config(shared_dir / "resumed", **common)
    with pytest.raises(Preempted) as stopped:
        train(cfg, make_strategy(cfg), stop_after_two_windows)
    assert stopped.value.step == 8
    summary, resumed = run(hvd, config(shared_dir / "resumed", resume=True, **common))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), f"{name} differs after resume"
    if hvd.rank() == 0:
        assert summary["start_step"] == 8 and summary["steps"] == 24
