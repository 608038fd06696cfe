"""The one training loop. It talks to a Backend only; lines that differ from a
single-process loop are marked `# hvdtrain:`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hvdtrain import data as D
from hvdtrain.backends.base import Backend, default_threads
from hvdtrain.checkpoint import atomic_torch_save, latest_checkpoint, load_checkpoint, save_checkpoint
from hvdtrain.config import ConfigError, OptimConfig, TrainConfig, to_dict
from hvdtrain.guard import Watchdog, check_agreement
from hvdtrain.metrics import MetricsLog
from hvdtrain.models import build_model, loss_function

EXIT_PREEMPTED = 99
"""Exit code of a run stopped by SIGTERM/SIGUSR1 after writing its checkpoint: resume it."""


class Preempted(Exception):
    def __init__(self, step: int, path: Path | None) -> None:
        super().__init__(f"stopped at step {step} on request; checkpoint {path}; rerun with --resume")
        self.step, self.path = step, path


class NumericalError(Exception):
    """A NaN/Inf loss on some rank; all ranks stop together."""


def make_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)


def resolve_data(cfg: TrainConfig, backend: Backend) -> Path:
    """A folder, or a built-in set that rank 0 writes inside --out before the others read it."""
    if cfg.data.path not in D.BUILTINS:
        return Path(cfg.data.path)
    folder = D.builtin_folder(cfg.out, cfg.data.path, cfg.data.rows, cfg.seed)
    error = None
    if backend.rank == 0 and not (folder / "meta.json").is_file():
        try:
            D.make_dataset(cfg.data.path, folder, cfg.data.rows, cfg.seed)
        except ConfigError as exc:
            error = str(exc)
    _agree(backend, error)  # hvdtrain: the others wait for rank 0's file
    return folder


def fingerprint(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in model.state_dict().items()]


def _rank_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}


def checkpoint(cfg: TrainConfig, backend: Backend, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, step: int) -> Path | None:
    """Rank 0 writes one copy when replicas agree, else every rank's state (gathered)."""
    mine = _rank_state(model, optimizer)
    states = [mine] if backend.replicas_identical else backend.gather_object(mine)
    if backend.rank != 0:
        return None
    payload = {"step": step, "world_size": backend.size, "backend": backend.name,
               "fingerprint": fingerprint(model), "ranks": states}
    return save_checkpoint(Path(cfg.out) / "checkpoints", step, payload)


def restore(cfg: TrainConfig, backend: Backend, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[int, bool]:
    """Rank 0 loads the newest checkpoint and broadcasts it; returns (step, per_rank_state)."""
    ckpt: dict[str, Any] | str | None = None
    if backend.rank == 0:
        path = latest_checkpoint(Path(cfg.out) / "checkpoints")
        try:
            if path is None:
                raise ConfigError(f"--resume found no checkpoint in {cfg.out}/checkpoints; run without "
                                  f"--resume to start fresh")
            ckpt = load_checkpoint(path)
            if [(n, tuple(s)) for n, s in ckpt["fingerprint"]] != fingerprint(model):
                raise ConfigError(f"checkpoint {str(path)!r} was written for another model; resume with "
                                  f"the same --model/--hidden or choose another --out")
            if len(ckpt["ranks"]) > 1 and ckpt["world_size"] != backend.size:
                raise ConfigError(f"checkpoint {str(path)!r} holds {ckpt['world_size']} ranks' state but "
                                  f"{backend.size} ranks were started; use -np {ckpt['world_size']}")
        except ConfigError as exc:
            ckpt = str(exc)
    ckpt = backend.broadcast_object(ckpt)  # hvdtrain: rank 0's checkpoint to every rank
    if isinstance(ckpt, str):
        raise ConfigError(ckpt)
    assert ckpt is not None
    per_rank = len(ckpt["ranks"]) > 1 and not backend.replicas_identical
    state = ckpt["ranks"][backend.rank if per_rank else 0]
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(ckpt["step"]), per_rank


def _agree(backend: Backend, error: str | None) -> None:
    """Rank 0 found `error` (or None); every rank raises it, so none is left waiting."""
    error = backend.broadcast_object(error)
    if error:
        raise ConfigError(error)


def _check_out(cfg: TrainConfig) -> str | None:
    """Rank 0: is --out writable, and would a fresh run clobber an earlier run's checkpoints?"""
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".hvdtrain-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"output folder {str(out)!r} is not writable ({exc.strerror}); choose another --out"
    if not cfg.resume and not cfg.overwrite and latest_checkpoint(out / "checkpoints"):
        return (f"output folder {str(out)!r} holds checkpoints of an earlier run; pass --resume to continue "
                f"it, --overwrite to start over, or another --out")
    return None


def _startup_record(cfg: TrainConfig, model: torch.nn.Module, info: D.DataInfo, n_features: int) -> dict:
    record: dict[str, Any] = {f"config.{k}": v for k, v in _flatten(to_dict(cfg)).items()}
    record["model.parameters"] = fingerprint(model)
    record.update({"data.task": info.task, "data.train_rows": info.n_train, "data.eval_rows": info.n_eval,
                   "data.features": n_features, "data.outputs": info.n_outputs})
    return record


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def train(cfg: TrainConfig, backend: Backend,
          stop_requested: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
    """Run the job on this rank; rank 0 returns the summary (other ranks return None)."""
    wall_start = time.perf_counter()
    rank, size, device = backend.rank, backend.size, backend.device
    threads = cfg.threads or default_threads(backend.local_size)
    torch.set_num_threads(threads)  # hvdtrain: ranks on one host share its cores
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    _agree(backend, _check_out(cfg) if rank == 0 else None)
    dog = Watchdog(cfg.collective_timeout, rank, backend.abort)

    # Data: this rank's block only.
    folder = resolve_data(cfg, backend)
    info = D.describe(folder)
    X, y = D.load_block(folder, D.partition(info.n_train, rank, size, cfg.data.partition, cfg.seed),
                        dtype=cfg.model.dtype)
    eval_X, eval_y = D.load_block(folder, np.arange(*D.block_bounds(info.n_eval, rank, size)),
                                  prefix="eval_", dtype=cfg.model.dtype)
    X, y = torch.from_numpy(X).to(device), torch.from_numpy(y).to(device)
    sizes = D.block_sizes(info.n_train, size)
    micro = cfg.sync.backward_passes_per_step
    steps_epoch = D.steps_per_epoch(sizes, cfg.batch_size * micro)
    total_steps = steps_epoch * cfg.epochs

    model = build_model(cfg.model, info.n_features, info.n_outputs, info.task).to(device)
    loss_fn = loss_function(info.task)
    optimizer = make_optimizer(cfg.optim, model)
    optimizer = backend.attach(model, optimizer, D.averaging_weights(sizes, cfg.sync.weights))
    check_agreement(backend.allgather_object(  # hvdtrain: same config, model and data everywhere
        _startup_record(cfg, model, info, X.shape[1])))
    step, per_rank = restore(cfg, backend, model, optimizer) if cfg.resume else (0, False)
    if not per_rank:
        with dog.guard("the start-up broadcast"):
            backend.broadcast_state(model, optimizer)  # hvdtrain: every rank starts from rank 0's state

    log = MetricsLog(out, rank == 0, total_steps, resume_step=step)
    window: list[tuple[int, int, torch.Tensor, float, int]] = []  # (step, epoch, loss, comm s, bytes)
    losses: list[float] = []
    comm0, bytes0 = backend.comm_seconds, backend.bytes_sent
    loop_start = window_start = time.perf_counter()
    start_step = step
    model.train()
    for epoch in range(step // steps_epoch, cfg.epochs):
        order = torch.from_numpy(D.epoch_order(len(X), epoch, rank, cfg.seed)).to(device)
        for s in range(step - epoch * steps_epoch, steps_epoch):
            optimizer.zero_grad()
            step_loss = torch.zeros((), dtype=X.dtype, device=device)
            for m in range(micro):
                idx = order[(s * micro + m) * cfg.batch_size:(s * micro + m + 1) * cfg.batch_size]
                loss = loss_fn(model(X[idx]), y[idx]) / micro
                loss.backward()
                step_loss += loss.detach()
            c, b = backend.comm_seconds, backend.bytes_sent
            with dog.guard(f"the synchronisation of step {step + 1}"):
                backend.step(optimizer)  # hvdtrain: Horovod waits here for the gradient allreduce
                step += 1
                backend.after_step(step, model)  # hvdtrain: MPI fallback averages parameters every k
            window.append((step, epoch, step_loss, backend.comm_seconds - c, backend.bytes_sent - b))
            if step % cfg.log_every == 0 or step == total_steps:
                with dog.guard(f"the metrics allreduce at step {step}"):
                    stop = _flush(window, backend, log, cfg, window_start, losses, stop_requested())
                window, window_start = [], time.perf_counter()
                if stop:
                    with dog.guard(f"the checkpoint at step {step}"):
                        path = checkpoint(cfg, backend, model, optimizer, step)
                    log.close()
                    dog.close()
                    raise Preempted(step, path)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                with dog.guard(f"the checkpoint at step {step}"):
                    checkpoint(cfg, backend, model, optimizer, step)
    train_seconds = time.perf_counter() - loop_start
    with dog.guard("the final synchronisation"):
        backend.finish(model, step)  # hvdtrain: MPI fallback ends with one last average
        if not cfg.checkpoint_every or step % cfg.checkpoint_every:
            checkpoint(cfg, backend, model, optimizer, step)
        evaluation = evaluate(model, loss_fn, eval_X, eval_y, info.task, backend)
        comm = backend.allreduce_sum(np.array([backend.comm_seconds - comm0])) / size
    dog.close()
    log.close()

    samples = (step - start_step) * cfg.batch_size * micro * size
    if rank != 0:
        return None
    atomic_torch_save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, out / "model.pt")
    summary = {
        "backend": backend.name, "world_size": size, "sync_every": cfg.sync.sync_every,
        "alpha": cfg.sync.alpha, "mpi_allreduce": cfg.sync.mpi_allreduce, "steps": step,
        "start_step": start_step, "steps_per_epoch": steps_epoch, "samples": samples,
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        **evaluation, "wall_seconds": time.perf_counter() - wall_start, "train_seconds": train_seconds,
        "samples_per_sec": samples / train_seconds if train_seconds > 0 else 0.0,
        "comm_seconds": float(comm[0]), "bytes_communicated": backend.bytes_sent - bytes0,
        "bytes_per_step": (backend.bytes_sent - bytes0) / max(1, step - start_step),
        "threads_per_rank": threads, "device": str(device), "data": str(folder),
        "parameters": sum(p.numel() for p in model.parameters()), "config": to_dict(cfg),
    }
    log.summary(summary)
    return summary


def _flush(window: list[tuple[int, int, torch.Tensor, float, int]], backend: Backend, log: MetricsLog,
           cfg: TrainConfig, window_start: float, losses: list[float], stop: bool) -> bool:
    """One small allreduce per window: mean losses, the stop vote and NaN reports of every rank."""
    local = torch.stack([w[2] for w in window]).double().cpu().numpy()
    first_bad = next((w[0] for w, v in zip(window, local) if not np.isfinite(v)), 0)
    bad = np.zeros(backend.size)
    bad[backend.rank] = first_bad
    summed = backend.allreduce_sum(np.concatenate([np.nan_to_num(local), [float(stop)], bad]))
    n = len(window)
    if summed[n + 1:].any():
        where = ", ".join(f"rank {r} at step {int(s)}" for r, s in enumerate(summed[n + 1:]) if s)
        raise NumericalError(f"loss became NaN/Inf on {where}; lower --lr or check the data")
    mean = summed[:n] / backend.size
    elapsed = max(time.perf_counter() - window_start, 1e-9)
    rate = n * cfg.batch_size * cfg.sync.backward_passes_per_step * backend.size / elapsed
    log.steps([{"step": st, "epoch": ep, "loss": float(l), "samples_per_sec": rate,
                "comm_seconds": cs, "bytes_sent": bs}
               for (st, ep, _, cs, bs), l in zip(window, mean)])
    losses.extend(float(l) for l in mean)
    return bool(summed[n] > 0)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loss_fn: torch.nn.Module, X: np.ndarray, y: np.ndarray,
             task: str, backend: Backend) -> dict[str, float]:
    """Held-out loss (and accuracy) over every rank's share of the eval split."""
    model.eval()
    totals = np.zeros(3)
    for start in range(0, len(X), 8192):
        xb = torch.from_numpy(X[start:start + 8192]).to(backend.device)
        yb = torch.from_numpy(y[start:start + 8192]).to(backend.device)
        pred = model(xb)
        totals[0] += float(loss_fn(pred, yb)) * len(xb)
        totals[1] += len(xb)
        if task == "classification":
            totals[2] += float((pred.argmax(1) == yb).sum())
    totals = backend.allreduce_sum(totals)  # hvdtrain: weighted by each rank's eval rows
    result = {"eval_loss": totals[0] / totals[1]}
    if task == "classification":
        result["eval_accuracy"] = totals[2] / totals[1]
    return result
