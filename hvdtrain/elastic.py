"""Horovod elastic training (`hvdtrain train --backend horovod --elastic`): ranks leave and join
while the job runs, as Horovod users know it:

    horovodrun --gloo -np 3 --min-np 2 --max-np 3 --host-discovery-script mpi_jobs/discover_hosts.sh \\
        python -m hvdtrain train --backend horovod --elastic --elastic-commit-every 10 ...

The state (model, optimizer, step, epoch, samples trained, world-size history) is a
`hvd.elastic.TorchState`, committed every `--elastic-commit-every` steps, and the training
function runs under `hvd.elastic.run`. When the discovery script drops a host, every rank stops at
the next commit, Horovod re-forms the ring without it and training goes on from the committed
state; when a host comes back, a new worker starts there, receives rank 0's state and joins. A rank
that fails rolls every rank back to the last commit. A worker whose host left the discovery is
ended by Horovod itself: 0.28.1 aborts it inside hvd.init() at the reset ("HOST[SLOT] has been
removed from elastic job", exit 134), and horovodrun ignores the exit of a worker without a slot.

After every reset the data is partitioned again for the new world (each rank reads only its own
block, `data.partition`). An epoch is a count of global samples: after a resize each rank goes on
with its new block's shuffle from the same fraction of the epoch, so an epoch that spans a resize
trains on as many samples as any other, not exactly each sample once. The committed counters
account for every sample: `samples` grows by batch x world size at every step, and the summary
lists each segment of the run (world size, steps, samples) and the number of resets.

Outputs in --out: elastic.jsonl (rank 0: a `world` line at every (re)start with each rank's host
and block rows, a `commit` line at every commit), summary.json and model.pt (rank 0,
at the end), ranks/rank-R.json (every rank of the final world: its host and a SHA-256 of its final
model state, so the replicas can be compared).

Horovod's rule: a joining worker must meet the others in no collective outside the elastic
function. So the set-up here uses none: a built-in data set is written by whichever worker finds it
missing (data.make_dataset is safe against that race) and the state sync gives every rank rank 0's
model. Test-only knob: HVDTRAIN_ELASTIC_STEP_SLEEP=SECONDS sleeps after every step, so a test can
change the hosts while a tiny job still runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from hvdtrain import data as D
from hvdtrain.checkpoint import atomic_torch_save, atomic_write_text
from hvdtrain.comm.base import Comm, default_threads, pick_device
from hvdtrain.config import TrainConfig, to_dict
from hvdtrain.errors import ConfigError
from hvdtrain.registry import Job, build_loss, build_model, build_optimizer
from hvdtrain.sources import open_data
from hvdtrain.train import evaluate

STEP_SLEEP_VAR = "HVDTRAIN_ELASTIC_STEP_SLEEP"


def check_launcher(env: Mapping[str, str]) -> float:
    """--elastic needs a worker that horovodrun started in elastic mode; returns the step sleep."""
    if env.get("HOROVOD_ELASTIC") != "1" or not env.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"):
        raise ConfigError("--elastic needs horovodrun's elastic mode, which did not start this process; launch "
                          "`horovodrun --gloo -np N --min-np A --max-np B --host-discovery-script SCRIPT python -m "
                          "hvdtrain train --backend horovod --elastic ...` (mpi_jobs/discover_hosts.sh), or drop "
                          "--elastic")
    text = env.get(STEP_SLEEP_VAR, "0")
    try:
        sleep = float(text)
    except ValueError:
        sleep = -1.0
    if not 0 <= sleep < 60:
        raise ConfigError(f"{STEP_SLEEP_VAR}={text!r} is not a number of seconds in [0, 60); unset it or use e.g. 0.02")
    return sleep


def train_elastic(cfg: TrainConfig, comm: Comm, job: Job | None = None) -> dict[str, Any] | None:
    """Run the elastic job on this worker; rank 0 of the final world returns the summary."""
    import horovod.torch as hvd  # hvdtrain: elastic is Horovod's own machinery (hvd.elastic)

    for sig in (signal.SIGTERM, signal.SIGUSR1):  # the driver ends workers with SIGTERM; nothing to save
        signal.signal(sig, signal.SIG_DFL)
    sleep = check_launcher(os.environ)
    job = job or Job()
    wall_start = time.perf_counter()
    torch.set_num_threads(cfg.threads or default_threads(comm.local_size))  # hvdtrain: ranks share a host's cores
    torch.manual_seed(cfg.seed)
    device = pick_device(comm.local_rank, comm.local_size)
    cfg = _local_data(cfg, job)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)

    # Model, loss and optimizer once per worker, from the first data it sees (shapes only: the state
    # sync gives every rank rank 0's parameters).
    data = open_data(cfg, job, comm, device)
    model = build_model(cfg.model, job, data.shape).to(device)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    loss_fn = build_loss(cfg.loss, job, data.shape.task)
    base = build_optimizer(cfg.optim, job, model)
    base_lrs = [group["lr"] for group in base.param_groups]
    micro = cfg.sync.backward_passes_per_step
    optimizer = hvd.DistributedOptimizer(  # hvdtrain: gradients averaged over the current world
        base, named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if cfg.sync.fp16 else hvd.Compression.none,
        backward_passes_per_step=micro)
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    per_step = cfg.batch_size * micro
    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, step=0, epoch=0, epoch_samples=0,
                                   samples=0, segments=(), first_loss=None, last_loss=None)
    # segments: (world size, first step, steps) of every world so far
    log_path = Path(cfg.out) / "elastic.jsonl"
    result: dict[str, Any] = {}

    def commit(state: Any, window: list[torch.Tensor]) -> None:
        size, start, _ = state.segments[-1]
        state.segments = state.segments[:-1] + ((size, start, state.step - start),)
        total = comm.allreduce_sum(np.array([float(sum(float(w) for w in window)), float(len(window))]))
        state.last_loss = float(total[0] / max(1.0, total[1]))  # mean over ranks and steps since the last commit
        state.first_loss = state.last_loss if state.first_loss is None else state.first_loss
        if comm.rank == 0:
            with log_path.open("a") as f:
                f.write(json.dumps({"event": "commit", "step": state.step, "epoch": state.epoch, "world_size": size,
                                    "samples": state.samples, "resets": len(state.segments) - 1,
                                    "loss": state.last_loss}) + "\n")
        state.commit()  # hvdtrain: saved in host memory; raises HostsUpdatedInterrupt if the hosts changed

    @hvd.elastic.run
    def run(state: Any) -> None:
        """Train in the world of this (re)start until the end or the next reset."""
        _refresh(comm, hvd)
        rank, size = comm.rank, comm.size
        # hvdtrain: the new world's partition: this rank's block only
        data = open_data(cfg, job, comm, device)
        data.cast(dtype)
        steps_epoch = D.steps_per_epoch(data.sizes, per_step)
        if cfg.optim.scale_lr:  # hvdtrain: the global batch is size x the per-rank batch
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * size
        previous = state.segments[-1][0] if state.segments else None
        if previous is None and rank == 0:
            atomic_write_text("", log_path)  # a fresh run: no lines of an earlier one
        state.segments = state.segments + ((size, state.step, 0),)
        members = comm.allgather_object((socket.gethostname(), data.train.n))  # who reads which block size
        if rank == 0:
            change = f"world size {previous} -> {size}" if previous else f"world size {size}"
            print(f"hvdtrain: elastic: {change} at step {state.step} (resets {len(state.segments) - 1}), "
                  f"hosts {' '.join(h for h, _ in members)}", flush=True)
            with log_path.open("a") as f:
                f.write(json.dumps({"event": "world", "step": state.step, "world_size": size,
                                    "resets": len(state.segments) - 1, "hosts": [h for h, _ in members],
                                    "block_rows": [n for _, n in members]}) + "\n")
        window: list[torch.Tensor] = []
        model.train()
        while state.epoch < cfg.epochs:
            first = state.epoch_samples // (size * per_step)  # where this epoch stands, in this world's steps
            order = D.epoch_order(data.train.n, state.epoch, rank, cfg.seed)[first * per_step:steps_epoch * per_step]
            batches = data.train.batches(order, cfg.batch_size)
            for _ in range(first, steps_epoch):
                optimizer.zero_grad()
                step_loss = torch.zeros((), dtype=torch.float64, device=device)
                for _m in range(micro):
                    x, y = next(batches)
                    with autocast:
                        loss = loss_fn(model(x), y) / micro
                    loss.backward()
                    step_loss += loss.detach()
                optimizer.step()  # hvdtrain: waits for the gradient allreduce
                if buffers:  # hvdtrain: BatchNorm statistics averaged too: identical replicas
                    hvd.grouped_allreduce_(buffers, op=hvd.Average, name="hvdtrain.elastic.buffers")
                state.step += 1
                state.samples += per_step * size  # hvdtrain: every rank trained per_step samples
                state.epoch_samples += per_step * size
                window.append(step_loss)
                if sleep:
                    time.sleep(sleep)
                if state.step % cfg.sync.elastic_commit_every == 0:
                    commit(state, window)
                    window = []
            state.epoch, state.epoch_samples = state.epoch + 1, 0
        if window:  # the steps since the last commit (none when the run ended on one)
            commit(state, window)
        result["evaluation"] = evaluate(model, loss_fn, data, comm, cfg.batch_size * 4, autocast)
        _write_rank(cfg, comm, model, state)

    run(state)
    if comm.rank != 0:
        return None
    return _summary(cfg, comm, model, state, per_step, result["evaluation"], data.source,
                    time.perf_counter() - wall_start)


def _local_data(cfg: TrainConfig, job: Job) -> TrainConfig:
    """cfg with a built-in data set replaced by its folder, written here if missing (no collective)."""
    if job.train_data is not None or cfg.data.path not in D.BUILTINS:
        return cfg
    folder = D.builtin_folder(cfg.out, cfg.data.path, cfg.data.rows, cfg.seed)
    if not (folder / "meta.json").is_file():
        try:
            D.make_dataset(cfg.data.path, folder, cfg.data.rows, cfg.seed)
        except ConfigError:
            if not (folder / "meta.json").is_file():  # not just another worker's copy arriving first
                raise
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(folder)))


def _refresh(comm: Comm, hvd: Any) -> None:
    """The world after a (re)start: new rank and size; collective names restart at 0 on every rank
    (HorovodComm matches collectives by a per-process count, and a joiner's count is 0)."""
    comm.rank, comm.size = hvd.rank(), hvd.size()
    comm.local_rank, comm.local_size = hvd.local_rank(), hvd.local_size()
    comm._calls = 0  # type: ignore[attr-defined]


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, by name, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _write_rank(cfg: TrainConfig, comm: Comm, model: torch.nn.Module, state: Any) -> None:
    folder = Path(cfg.out) / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    record = {"rank": comm.rank, "world_size": comm.size, "host": socket.gethostname(),
              "horovod_hostname": os.environ.get("HOROVOD_HOSTNAME"), "step": state.step,
              "samples": state.samples, "sha256": state_hash(model)}
    atomic_write_text(json.dumps(record) + "\n", folder / f"rank-{comm.rank}.json")


def _summary(cfg: TrainConfig, comm: Comm, model: torch.nn.Module, state: Any, per_step: int,
             evaluation: dict[str, float], source: str, wall: float) -> dict[str, Any]:
    out = Path(cfg.out)
    atomic_torch_save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, out / "model.pt")
    segments = [{"world_size": s, "start_step": a, "steps": n, "samples": n * per_step * s}
                for s, a, n in state.segments]
    sizes = [seg["world_size"] for i, seg in enumerate(segments)
             if i == 0 or seg["world_size"] != segments[i - 1]["world_size"]]
    summary = {
        "backend": "horovod", "elastic": True, "world_size": comm.size, "world_sizes": sizes,
        "resets": len(segments) - 1, "segments": segments, "steps": state.step, "epochs": state.epoch,
        "samples": state.samples, "samples_per_rank_step": per_step,
        "first_loss": state.first_loss, "final_loss": state.last_loss,
        **evaluation, "wall_seconds": wall, "samples_per_sec": state.samples / wall if wall > 0 else 0.0,
        "data": source, "parameters": sum(p.numel() for p in model.parameters()),
        "sha256": state_hash(model), "config": to_dict(cfg),
    }
    atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    print(f"hvdtrain: elastic: world sizes {' -> '.join(map(str, sizes))}, {summary['resets']} resets, "
          f"{state.samples} samples in {state.step} steps", flush=True)
    return summary
