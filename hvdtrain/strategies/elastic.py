"""`horovod --elastic`: Horovod's gradient allreduce while ranks leave and join the running job,
as Horovod users know it:

    horovodrun --gloo -np 3 --min-np 2 --max-np 3 --host-discovery-script mpi_jobs/discover_hosts.sh \\
        python -m hvdtrain train --backend horovod --elastic --elastic-commit-every 10 ...

The loop is train.py's, like every run's (start-up probe, watchdog, NaN checks, metrics.jsonl,
evaluation, summary); this strategy only changes three things behind the SyncStrategy seam:
- `run(body)` runs the loop's body inside `hvd.elastic.run` with a `hvd.elastic.TorchState`
  (model, optimizer, step, samples, world history). When the discovery script drops or adds a
  host, every rank stops at the next commit, Horovod re-forms the ring and the body starts again
  in the new world: the loop re-partitions the data (each rank reads only its new block), the lr
  is re-scaled to the new size (--scale-lr), and training goes on from the committed step. A rank
  that fails rolls every rank back to the last commit. A new worker receives rank 0's state.
- Checkpoints are commits: `state.commit()` (host memory) every --elastic-commit-every steps,
  where Horovod also checks for host changes. model.pt and summary.json are written at the end.
- The run's own record: OUT/elastic.jsonl (rank 0: a `world` line at every (re)start with each
  rank's host and block rows, a `commit` line at every commit), the summary's `world_sizes`,
  `resets` and `segments`, and OUT/ranks/rank-R.json (every rank of the final world: its host and
  a SHA-256 of its final state, so the replicas can be compared). A write of these files that
  fails (disk full, read-only, ...) stops every worker together with one line (exit 74).

An epoch is a count of global samples: after a resize each rank goes on with its new block's
shuffle from the same fraction of the epoch, so an epoch that spans a resize trains on as many
samples as any other, not exactly each sample once.

What Horovod forbids, and so hvdtrain refuses under --elastic (config.py): collectives outside the
elastic function (a joining worker would wait in them forever), so the set-up that runs before it
(data, model, probe) is local, a built-in data set is written by whichever worker finds it missing,
and errors there end that worker only; --resume (the committed state lives in the workers' memory,
not in files); lr schedules (the scheduler is not part of Horovod's elastic state).
Test-only knob: HVDTRAIN_ELASTIC_STEP_SLEEP=SECONDS sleeps after every step, so a test can change
the hosts while a tiny job still runs.
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
from typing import Any, Callable, Mapping, TypeVar

import horovod.torch as hvd
import torch

from hvdtrain import data as D
from hvdtrain.checkpoint import append_text, atomic_write_text, spread_write_error
from hvdtrain.config import TrainConfig
from hvdtrain.errors import ConfigError, WriteError
from hvdtrain.strategies.horovod_allreduce import HorovodAllreduce

T = TypeVar("T")
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


def local_data(cfg: TrainConfig) -> TrainConfig:
    """cfg with a built-in data set replaced by its folder, written here if missing: no collective
    (data.make_dataset is safe against two workers writing it at once)."""
    if cfg.data.path not in D.BUILTINS:
        return cfg
    folder = D.builtin_folder(cfg.out, cfg.data.path, cfg.data.rows, cfg.seed)
    if not (folder / "meta.json").is_file():
        try:
            D.make_dataset(cfg.data.path, folder, cfg.data.rows, cfg.seed)
        except ConfigError:
            if not (folder / "meta.json").is_file():  # not just another worker's copy arriving first
                raise
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(folder)))


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, by name, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class ElasticHorovod(HorovodAllreduce):
    name = "horovod"
    collectives_before_run = False  # a joining worker meets the others only inside hvd.elastic.run

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_sleep = check_launcher(os.environ)
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # the driver ends removed workers with SIGTERM
            signal.signal(sig, signal.SIG_DFL)
        self.out: Path | None = None
        self.state: Any = None
        self._rows_per_step = self._epochs = self._steps_epoch = 0

    def prepare(self, cfg: TrainConfig) -> TrainConfig:
        self.out = Path(cfg.out)
        self._rows_per_step, self._epochs = cfg.batch_size * self.micro_steps, cfg.epochs
        return local_data(cfg)

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               sizes: list[int]) -> torch.optim.Optimizer:
        optimizer = super().attach(model, optimizer, sizes)
        self._model = model
        # segments: (world size, first step, steps) of every world so far
        # epoch_samples: global samples trained in this epoch (an epoch spanning a resize goes on
        # from the same fraction of it in the new world)
        self.state = hvd.elastic.TorchState(model=model, optimizer=optimizer, step=0, samples=0, epoch=0,
                                            epoch_samples=0, segments=())
        return optimizer

    def run(self, body: Callable[[], T]) -> T:
        @hvd.elastic.run
        def in_world(state: Any) -> T:
            self._new_world()
            return body()
        return in_world(self.state)

    def _new_world(self) -> None:
        """After a (re)start: the new rank and size; collective names restart at 0 on every rank
        (HorovodComm matches collectives by a per-process count, and a joiner's count is 0)."""
        comm = self.comm
        comm.rank, comm.size = self.rank, self.size = hvd.rank(), hvd.size()
        comm.local_rank, comm.local_size = hvd.local_rank(), hvd.local_size()
        self.scale_lr(self.state.optimizer)
        state = self.state  # synced from rank 0 by hvd.elastic.run: the same on every rank
        previous = state.segments[-1][0] if state.segments else None
        state.segments = state.segments + ((self.size, state.step, 0),)
        comm.reset_names(f"w{len(state.segments)}.")
        self._launches, self._pending = 0, None  # the buffer allreduces' names restart too
        self._prefix = f"w{len(state.segments)}."
        self._announce = previous

    def start_step(self) -> int | None:
        return int(self.state.step)

    def position(self, step: int, steps_epoch: int) -> tuple[int, int]:
        state = self.state
        return state.epoch, state.epoch_samples // (self.size * self._rows_per_step)

    def more(self, step: int, total_steps: int) -> bool:
        return self.state.epoch < self._epochs

    def world_started(self, rows: int, steps_epoch: int) -> None:
        """The body opened this rank's block (`rows` training rows): rank 0 records the new world."""
        self._steps_epoch = steps_epoch
        state, previous = self.state, self._announce
        members = self.comm.allgather_object((socket.gethostname(), rows))
        error = None
        if self.rank == 0:
            change = f"world size {previous} -> {self.size}" if previous else f"world size {self.size}"
            print(f"hvdtrain: elastic: {change} at step {state.step} (resets {len(state.segments) - 1}), "
                  f"hosts {' '.join(h for h, _ in members)}", flush=True)
            try:
                if previous is None and state.step == 0:
                    atomic_write_text("", self._log_path())  # a fresh run: no lines of an earlier one
                self._log({"event": "world", "step": state.step, "world_size": self.size,
                           "resets": len(state.segments) - 1, "hosts": [h for h, _ in members],
                           "block_rows": [n for _, n in members]})
            except WriteError as exc:
                error = exc
        spread_write_error(self.comm, error)  # hvdtrain: a failed write stops every worker together

    def after_step(self, step: int, model: torch.nn.Module) -> bool:
        state, rows = self.state, self._rows_per_step * self.size  # hvdtrain: every rank trained its rows
        state.step, state.samples, state.epoch_samples = step, state.samples + rows, state.epoch_samples + rows
        if state.epoch_samples // rows >= self._steps_epoch:  # the loop's batches go on to the next epoch
            state.epoch, state.epoch_samples = state.epoch + 1, 0
        if self.step_sleep:
            time.sleep(self.step_sleep)
        return super().after_step(step, model)

    def checkpoint_due(self, tick: int, every: int) -> bool:
        return tick % self.sync_cfg.elastic_commit_every == 0

    def checkpoint(self, step: int, save: Callable[[], Path | None]) -> None:
        """A commit: the state in host memory; raises HostsUpdatedInterrupt if the hosts changed.
        Horovod's commit() is save() + check_host_updates(); the record is written between them, so
        a `commit` line names a state every worker saved (a rank dying in the collective below
        rolls the others back to this very state, not to the one before)."""
        self._close_segment()
        self.state.save()  # local, no collective: every worker holds this step's state first
        error = None
        if self.rank == 0:
            try:
                self._log({"event": "commit", "step": self.state.step, "world_size": self.size,
                           "samples": self.state.samples, "resets": len(self.state.segments) - 1})
            except WriteError as exc:
                error = exc
        spread_write_error(self.comm, error)  # hvdtrain: a failed record ends every worker
        self.state.check_host_updates()

    def finish(self, model: torch.nn.Module, step: int) -> None:
        super().finish(model, step)
        self._close_segment()
        record = {"rank": self.rank, "world_size": self.size, "host": socket.gethostname(),
                  "horovod_hostname": os.environ.get("HOROVOD_HOSTNAME"), "step": self.state.step,
                  "samples": self.state.samples, "sha256": state_hash(model)}
        error = None
        try:  # every worker writes its own record (atomic_write makes the folder)
            atomic_write_text(json.dumps(record) + "\n", self.out / "ranks" / f"rank-{self.rank}.json")
        except WriteError as exc:
            error = exc
        spread_write_error(self.comm, error)  # hvdtrain: any worker's failed write stops them all

    def broadcast_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to do: hvd.elastic.run's state.sync() gave every rank rank 0's state."""

    def summary(self, summary: dict[str, Any]) -> dict[str, Any]:
        per_step = self._rows_per_step
        segments = [{"world_size": s, "start_step": a, "steps": n, "samples": n * per_step * s}
                    for s, a, n in self.state.segments]
        sizes = [seg["world_size"] for i, seg in enumerate(segments)
                 if i == 0 or seg["world_size"] != segments[i - 1]["world_size"]]
        samples, seconds = self.state.samples, summary["train_seconds"]
        print(f"hvdtrain: elastic: world sizes {' -> '.join(map(str, sizes))}, {len(segments) - 1} resets, "
              f"{samples} samples in {self.state.step} steps", flush=True)
        return {"elastic": True, "epochs": self.state.epoch, "world_sizes": sizes, "resets": len(segments) - 1, "segments": segments,
                "samples": samples, "samples_per_sec": samples / seconds if seconds > 0 else 0.0,
                "sha256": state_hash(self._model)}

    def _close_segment(self) -> None:
        size, start, _ = self.state.segments[-1]
        self.state.segments = self.state.segments[:-1] + ((size, start, self.state.step - start),)

    def _log_path(self) -> Path:
        return self.out / "elastic.jsonl"

    def _log(self, record: dict[str, Any]) -> None:
        append_text(json.dumps(record) + "\n", self._log_path())
