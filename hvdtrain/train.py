"""The one training loop, for every strategy (Horovod elastic included). It talks to a SyncStrategy
and its Comm only, and reads no strategy setting; lines that differ from a single-process loop are
marked `# hvdtrain:`.

Shape: local set-up (data block, model, loss, optimizer, the start-up probe), `strategy.attach`,
then `strategy.run(body)`: the body agrees on the start, broadcasts rank 0's state, trains, and
ends with one last sync, evaluation and checkpoint. It runs once, or once per world under Horovod
elastic (a reset re-partitions the data and resumes from the last commit).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from hvdtrain import data as D
from hvdtrain.checkpoint import atomic_torch_save, latest_checkpoint, restore_run, save_run, spread_write_error
from hvdtrain.comm.base import Comm, default_threads
from hvdtrain.config import TrainConfig, to_dict
from hvdtrain.errors import ConfigError
from hvdtrain.guard import Watchdog, check_agreement
from hvdtrain.metrics import MetricsLog, tensorboard_error, write_summary
from hvdtrain.plugins import describe_error
from hvdtrain.registry import Job, build_loss, build_model, build_optimizer, build_scheduler
from hvdtrain.sources import RankData, open_data
from hvdtrain.strategies.base import SyncStrategy



class Preempted(Exception):
    def __init__(self, step: int, path: Path | None) -> None:
        super().__init__(f"stopped at step {step} on request; checkpoint {path}; rerun with --resume")
        self.step, self.path = step, path


class NumericalError(Exception):
    """A NaN/Inf loss on some rank; all ranks stop together."""


@contextlib.contextmanager
def agreed(comm: Comm, enabled: bool = True) -> Iterator[None]:
    """A ConfigError on any rank inside the block is raised on every rank (none is left waiting).
    Disabled where the strategy allows no collective yet (Horovod elastic's set-up): raised here only."""
    error = None
    try:
        yield
    except ConfigError as exc:
        if not enabled:
            raise
        error = str(exc)
    if not enabled:
        return
    errors = comm.allgather_object(error)
    first = next((e for e in errors if e), None)
    if first:
        raise ConfigError(first)


def _check_out(cfg: TrainConfig) -> None:
    """Rank 0: is --out writable, and would a fresh run clobber an earlier run's checkpoints?"""
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".hvdtrain-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output folder {str(out)!r} is not writable ({exc.strerror}); choose another --out") from None
    if not cfg.resume and not cfg.overwrite and latest_checkpoint(out / "checkpoints"):
        raise ConfigError(f"output folder {str(out)!r} holds checkpoints of an earlier run; pass --resume to "
                          f"continue it (fit: resume=True), --overwrite (overwrite=True) to start over, or another --out")


def _model_name(cfg: TrainConfig, job: Job) -> str:
    return cfg.model.name if job.model is None else type(job.model).__name__


def _probe(model: torch.nn.Module, loss_fn: Any, data: RankData, cfg: TrainConfig, what: str,
           autocast: Any) -> None:
    """One eval-mode forward and loss on this rank's first batch: a model that does not fit the data,
    labels out of range or a loss that is not a scalar become one line before training starts."""
    n = min(data.train.n, cfg.batch_size)
    try:
        x, y = next(data.train.batches(np.arange(n), n, partial=True))
    except Exception as exc:
        raise ConfigError(f"reading a batch of data {data.source} failed: {describe_error(exc)}; fix the "
                          f"Dataset") from None
    was_training = model.training
    model.eval()  # no BatchNorm statistics updated, no dropout RNG drawn
    try:
        with torch.no_grad(), autocast:
            try:
                out = model(x)
            except Exception as exc:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ConfigError(f"model {what} failed on a batch of data {data.source} (input {shape}): "
                                  f"{describe_error(exc)}; make the model's input match the data") from None
            if (data.shape.task == "classification" and isinstance(out, torch.Tensor) and out.ndim == 2
                    and isinstance(y, torch.Tensor) and len(y)):
                classes = out.shape[1]
                bad = y[(y < 0) | (y >= classes)]
                if len(bad):
                    raise ConfigError(f"data {data.source} has class label {int(bad[0])}, outside [0, {classes}) "
                                      f"of model {what}'s {classes} outputs; fix the labels or the model's outputs")
            try:
                loss = loss_fn(out, y)
            except Exception as exc:
                raise ConfigError(f"loss {cfg.loss if cfg.loss != 'auto' else data.shape.task} failed on model "
                                  f"{what}'s output: {describe_error(exc)}; match the loss to the output and "
                                  f"targets") from None
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ConfigError(f"the loss returned {type(loss).__name__} "
                                  f"{tuple(getattr(loss, 'shape', ()))}; it must return a scalar tensor")
    finally:
        model.train(was_training)


def train(cfg: TrainConfig, strategy: SyncStrategy, stop_requested: Callable[[], bool] = lambda: False,
          job: Job | None = None) -> dict[str, Any] | None:
    """Run the job on this rank; rank 0 returns the summary (other ranks return None)."""
    try:
        return _train(cfg, strategy, stop_requested, job or Job())
    finally:
        strategy.detach()  # however the run ended, the user's model goes back without our hooks


def _train(cfg: TrainConfig, strategy: SyncStrategy, stop_requested: Callable[[], bool],
           job: Job) -> dict[str, Any] | None:
    wall_start = time.perf_counter()
    comm = strategy.comm
    device = strategy.device
    cfg = strategy.prepare(cfg)
    threads = cfg.threads or default_threads(comm.local_size)
    torch.set_num_threads(threads)  # hvdtrain: ranks on one host share its cores
    torch.manual_seed(cfg.seed)
    together = strategy.collectives_before_run  # False under Horovod elastic: set-up is local
    with agreed(comm, together):
        if comm.rank == 0 or not together:
            _check_out(cfg)
            if cfg.tensorboard and (why := tensorboard_error()):
                raise ConfigError(why)
    out = Path(cfg.out)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp fp16 needs a GPU (GradScaler); use --amp bf16 on CPU")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16,
                              enabled=cfg.amp != "none")
    micro = strategy.micro_steps  # hvdtrain: backward passes per step (Horovod's local accumulation)
    per_step = cfg.batch_size * micro

    with agreed(comm, together):  # hvdtrain: an error on any rank stops every rank with the same message
        data = open_data(cfg, job, comm, device)  # this rank's block only
        steps_epoch = D.steps_per_epoch(data.sizes, per_step)
        model = build_model(cfg.model, job, data.shape).to(device)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        data.cast(dtype)
        loss_fn = build_loss(cfg.loss, job, data.shape.task)
        optimizer = build_optimizer(cfg.optim, job, model)
        _probe(model, loss_fn, data, cfg, _model_name(cfg, job), autocast)
    optimizer = strategy.attach(model, optimizer, data.sizes)
    forward = strategy.wrap(model)  # hvdtrain: DDP's wrapper; the model itself for the others
    with agreed(comm, together):
        scheduler = build_scheduler(cfg.optim, job, optimizer, steps_epoch * cfg.epochs)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    extras = {"scheduler": scheduler, "scaler": scaler, "strategy": strategy}
    losses: list[float] = []
    opened = {"data": data, "world": (comm.rank, comm.size)}

    def body() -> tuple[int, int, float, np.ndarray, dict[str, float], int]:
        """Training in the current world: once, or (Horovod elastic) again after every reset."""
        with agreed(comm):  # on every rank, reopened or not: all ranks run the same collectives
            if opened["world"] != (comm.rank, comm.size):  # hvdtrain: a new world's partition
                opened["data"] = open_data(cfg, job, comm, device)
                opened["data"].cast(dtype)
                opened["world"] = (comm.rank, comm.size)
        data = opened["data"]
        steps_epoch = D.steps_per_epoch(data.sizes, per_step)
        total_steps = steps_epoch * cfg.epochs
        strategy.world_started(data.train.n, steps_epoch)
        layout = {"steps_per_epoch": steps_epoch, **strategy.layout()}
        check_agreement(comm.allgather_object(  # hvdtrain: same config, model and data everywhere
            _startup_record(cfg, model, data)))
        dog = Watchdog(cfg.collective_timeout, comm.rank, comm.abort)
        log = None
        try:
            step = strategy.start_step()
            per_rank = False
            if step is None:
                step, per_rank = restore_run(out, comm, strategy, model, optimizer, extras,
                                             steps_epoch) if cfg.resume else (0, False)
            if not per_rank:
                with dog.guard("the start-up broadcast"):
                    strategy.broadcast_state(model, optimizer)  # hvdtrain: every rank starts from rank 0's state
            log = MetricsLog(out, comm.rank == 0, total_steps, resume_step=step, tensorboard=cfg.tensorboard)
            last, evaluation, train_seconds, totals = _loop(
                cfg, strategy, model, forward, optimizer, loss_fn, scheduler, scaler, data, log, dog,
                stop_requested, step, total_steps, steps_epoch, per_step, autocast, extras, layout, losses)
            return step, last, train_seconds, totals, evaluation, total_steps
        finally:
            if log is not None:
                log.close()
            dog.close()

    bytes0 = strategy.bytes_sent
    start_step, step, train_seconds, totals, evaluation, total_steps = strategy.run(body)
    if comm.rank != 0:
        return None
    steps_by_rank = [int(n) for n in totals[1:]]
    samples = sum(steps_by_rank) * per_step
    atomic_torch_save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, out / "model.pt")
    summary = {
        "backend": strategy.name, "world_size": comm.size, "steps": step,
        "start_step": start_step, "steps_per_epoch": total_steps // cfg.epochs, "samples": samples,
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        **evaluation, "wall_seconds": time.perf_counter() - wall_start, "train_seconds": train_seconds,
        "samples_per_sec": samples / train_seconds if train_seconds > 0 else 0.0,
        "comm_seconds": float(totals[0] / comm.size) if strategy.comm_measured else None,
        "steps_by_rank": steps_by_rank,
        "bytes_communicated": strategy.bytes_sent - bytes0,
        "bytes_per_step": (strategy.bytes_sent - bytes0) / max(1, step - start_step),
        "threads_per_rank": threads, "device": str(device), "data": opened["data"].source,
        "mpi_settings": comm.mpi_settings,  # read back from Open MPI (MPI_T) when the comm started
        "parameters": sum(p.numel() for p in model.parameters()), "config": to_dict(cfg),
    }
    summary.update(strategy.summary(summary))  # hvdtrain: the strategy's own fields
    write_summary(out, summary)
    return summary


def _loop(cfg: TrainConfig, strategy: SyncStrategy, model: torch.nn.Module, forward: torch.nn.Module,
          optimizer: torch.optim.Optimizer, loss_fn: Any, scheduler: Any, scaler: Any, data: RankData,
          log: MetricsLog, dog: Watchdog, stop_requested: Callable[[], bool], step: int, total_steps: int,
          steps_epoch: int, per_step: int, autocast: Any, extras: dict[str, Any], layout: dict[str, Any],
          losses: list[float]) -> tuple[int, dict[str, float], float, np.ndarray]:
    """The training loop from `step` to the end; returns (last step, final evaluation, training
    seconds, [mean comm seconds, steps of each rank])."""
    comm, device, out = strategy.comm, strategy.device, Path(cfg.out)
    window: list[tuple[int, int, torch.Tensor, float, int]] = []  # (step, epoch, loss, comm s, bytes)
    comm0 = strategy.comm_seconds
    loop_start = window_start = time.perf_counter()
    start_step = step
    saved_step = -1
    eval_seconds = 0.0

    def save() -> Path | None:
        return save_run(out, comm, strategy, model, optimizer, step, extras, layout)

    model.train()
    batches = _batches(data, cfg, comm.rank, *strategy.position(step, steps_epoch), steps_epoch, per_step)
    while strategy.more(step, total_steps):  # hvdtrain: step < total_steps unless ranks run on time
        optimizer.zero_grad()
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for _m in range(strategy.micro_steps):
            epoch, (x, y) = next(batches)
            with autocast:
                loss = loss_fn(forward(x), y) / strategy.micro_steps
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.detach()
        c, b = strategy.comm_seconds, strategy.bytes_sent
        with dog.guard(f"the synchronisation of step {step + 1}"):
            strategy.step(optimizer, scaler)  # hvdtrain: Horovod waits here for the gradient allreduce
            step += 1
            synced = strategy.after_step(step, model)  # hvdtrain: MPI fallback averages parameters every k
        if scheduler is not None:
            scheduler.step()
            if (position := strategy.schedule_position(synced)) is not None:
                scheduler.last_epoch = position - 1  # hvdtrain: time-based ranks follow the job's progress
                scheduler.step()
        window.append((step, epoch, step_loss, strategy.comm_seconds - c if strategy.comm_measured else None,
                       strategy.bytes_sent - b))
        tick = strategy.tick(step, synced)  # hvdtrain: where all ranks meet (every step, or at syncs)
        if tick is None:
            continue
        last = not strategy.more(step, total_steps)
        due = strategy.checkpoint_due(tick, cfg.checkpoint_every)  # elastic: a commit
        if tick % cfg.log_every == 0 or last or due:  # a checkpoint has its metrics on disk
            with dog.guard(f"the metrics allreduce at step {step}"):
                stop = _flush(window, comm, log, cfg.log_every, window_start, losses, stop_requested(),
                              strategy.lockstep, per_step)
            window, window_start = [], time.perf_counter()
            if stop:
                with dog.guard(f"the checkpoint at step {step}"):
                    path = save()
                raise Preempted(step, path)  # the body's `finally` closes the log and the watchdog
        if due:
            with dog.guard(f"the checkpoint at step {step}"):
                strategy.checkpoint(step, save)
            saved_step = step
        if cfg.eval_every and tick % cfg.eval_every == 0 and not last:
            eval_start = time.perf_counter()  # time-to-accuracy: training time only
            with dog.guard(f"the evaluation at step {step}"):
                log.evaluation(step, eval_start - loop_start - eval_seconds,
                               evaluate(model, loss_fn, data, comm, cfg.batch_size * 4, autocast))
            eval_seconds += time.perf_counter() - eval_start
    train_seconds = time.perf_counter() - loop_start - eval_seconds
    with dog.guard("the final synchronisation"):
        strategy.finish(model, step)  # hvdtrain: MPI fallback ends with one last average
        if saved_step != step:
            strategy.checkpoint(step, save)
        evaluation = evaluate(model, loss_fn, data, comm, cfg.batch_size * 4, autocast)
        log.evaluation(step, train_seconds, evaluation)
        spread_write_error(comm, log.error)  # hvdtrain: rank 0's last metrics/evals writes, agreed
        mine = np.zeros(comm.size + 1)
        mine[0], mine[1 + comm.rank] = strategy.comm_seconds - comm0, step - start_step
        totals = comm.allreduce_sum(mine)  # mean comm time; steps by rank (time-based ranks differ)
    return step, evaluation, train_seconds, totals


def _batches(data: RankData, cfg: TrainConfig, rank: int, epoch: int, first: int, steps_epoch: int,
             per_step: int) -> Iterator[tuple[int, Any]]:
    """(epoch, batch) of this rank's block from step `first` of `epoch` on, epoch after epoch: a
    fresh seeded order per epoch, whole steps only (ranks running on time may go past the last epoch)."""
    while True:
        order = D.epoch_order(data.train.n, epoch, rank, cfg.seed)[first * per_step:steps_epoch * per_step]
        for batch in data.train.batches(order, cfg.batch_size):
            yield epoch, batch
        epoch, first = epoch + 1, 0


def _startup_record(cfg: TrainConfig, model: torch.nn.Module, data: RankData) -> dict:
    from hvdtrain.checkpoint import fingerprint
    record: dict[str, Any] = {f"config.{k}": v for k, v in _flatten(to_dict(cfg)).items()}
    record["model.parameters"] = fingerprint(model)
    record.update({f"data.{k}": v for k, v in data.record.items()})
    return record


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return flat


def _flush(window: list[tuple[int, int, torch.Tensor, float, int]], comm: Comm, log: MetricsLog,
           log_every: int, window_start: float, losses: list[float], stop: bool,
           lockstep: bool, per_step: int) -> bool:
    """One small allreduce per window: mean losses, the stop vote, NaN reports of every rank and
    whether rank 0 failed to write (metrics.py keeps the error until this point).
    Ranks in lockstep log every step; time-based ranks took different steps, so they log one
    row per window (the loss over all ranks' steps)."""
    local = torch.stack([w[2] for w in window]).double().cpu().numpy()
    first_bad = next((w[0] for w, v in zip(window, local) if not np.isfinite(v)), 0)
    bad = np.zeros(comm.size)
    bad[comm.rank] = first_bad
    rows, sums = (window, local) if lockstep else (window[-1:], local.sum(keepdims=True))
    n = len(rows)
    summed = comm.allreduce_sum(np.concatenate([np.nan_to_num(sums), [float(stop), len(window), log.failed],
                                                bad]))
    if summed[n + 3:].any():
        where = ", ".join(f"rank {r} at step {int(s)}" for r, s in enumerate(summed[n + 3:]) if s)
        raise NumericalError(f"loss became NaN/Inf on {where}; lower --lr or check the data")
    if summed[n + 2]:  # hvdtrain: rank 0 failed to write metrics, evals or TensorBoard: all stop here
        spread_write_error(comm, log.error)
    steps = summed[n + 1]  # by all ranks in this window
    mean = summed[:n] / (comm.size if lockstep else steps)
    elapsed = max(time.perf_counter() - window_start, 1e-9)
    rate = steps * per_step / elapsed
    log.steps([{"step": st, "epoch": ep, "loss": float(l), "samples_per_sec": rate,
                "comm_seconds": cs, "bytes_sent": bs}
               for (st, ep, _, cs, bs), l in zip(rows, mean)])
    losses.extend(float(l) for l in mean)
    return bool(summed[n] > 0)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loss_fn: Any, data: RankData, comm: Comm, batch: int,
             autocast: Any = contextlib.nullcontext()) -> dict[str, float]:
    """Held-out loss (and accuracy) over every rank's share of the eval split."""
    was_training = model.training
    model.eval()
    totals = np.zeros(3)
    block = data.eval
    if block is not None:
        for x, y in block.batches(np.arange(block.n), batch, partial=True):
            with autocast:
                pred = model(x)
                totals[0] += float(loss_fn(pred, y)) * len(y)
            totals[1] += len(y)
            if data.shape.task == "classification" and pred.ndim == 2:
                totals[2] += float((pred.argmax(1) == y).sum())
    model.train(was_training)
    totals = comm.allreduce_sum(totals)  # hvdtrain: weighted by each rank's eval rows
    if totals[1] == 0:
        return {}
    result = {"eval_loss": totals[0] / totals[1]}
    if data.shape.task == "classification":
        result["eval_accuracy"] = totals[2] / totals[1]
    return result
