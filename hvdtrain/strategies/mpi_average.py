"""`mpi`: the MPI fallback. Broadcast from rank 0, local steps, weighted parameter averaging every k.

The averaging rule (DESIGN.md): theta_i <- theta_i + alpha (sum_j w_j theta_j - theta_i), done
on one flat buffer per rank (FlatAverager): on one host as one pass over shared memory that
weights and sums every rank's buffer (comm.mpi.SharedRows), otherwise as one in-place SUM
allreduce of the buffer each rank pre-scales by its own w_i.
Floating-point buffers (BatchNorm statistics) live in the same flat buffer, so they are averaged
with the same weights at every sync. Options (SyncConfig):
- warmup_allreduce_steps W (post-local SGD): the first W steps average gradients as Horovod does
  (equal weights, one allreduce per step), then parameters every k steps, counted from W;
- outer_optimizer sgd|nesterov (DiLoCo): each sync applies the pseudo-gradient to the last
  global parameters with an outer optimizer (strategies/outer.py) instead of plain averaging;
- hierarchy K_LOCAL,K_GLOBAL: average within each host every K_LOCAL steps and across hosts
  every K_GLOBAL (class Hierarchy), instead of every sync_every;
- sync_every_seconds T (time-based): each rank takes local steps until T seconds have passed
  since the last sync, then all average with w_i = samples rank i trained since that sync / all
  of them, so a slow rank never holds the fast ones back. Ranks then take different numbers of
  steps: they meet only at syncs (`tick`), and the run ends at the first sync where the samples
  trained by all ranks reach the run's budget (epochs x data set).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from hvdtrain.comm.mpi import SharedRows, on_one_host
from hvdtrain.data import averaging_weights
from hvdtrain.strategies.base import SyncStrategy, float_buffers, ring_bytes
from hvdtrain.strategies.outer import OuterOptimizer


AUTO_SHARED_BYTES = 8 * 2 ** 10
"""`auto` averages through shared memory (comm.mpi.SharedRows) from here when all ranks share one
host, and uses `native` below it and across hosts. Measured with `hvdtrain bench allreduce --np 2
--repeat 5` (one host, hvdtrain's MPI settings, raw = `mpi4py-tuned`): native's separate weighting
pass (read and write the whole buffer once more) made it 0.72-0.75x raw at 4-16 MiB, and the ring
(which `auto` took from 32 MiB) 0.58x at 64 MiB, where MPI's tuned segmented ring beats hvdtrain's
Python-driven one; shared memory folds the weight into the one pass that reduces. Across 2 hosts
at 1 Gbit/s native was 1.00x raw (the weighting pass hides behind the network)."""


class FlatAverager:
    """Keeps `params` as views into one flat buffer so a sync is: scale, allreduce, (mix).

    On CPU the buffer is shared with the parameters (no copies); on a GPU the flat device
    tensor is staged through a host buffer. `allreduce` (SyncConfig.mpi_allreduce): `native`
    scales by the weight, then MPI_Allreduce; `ring` is hvdtrain's ring with the weight folded
    into its first send; `shared` keeps the host buffer in a row of shared memory and sums the
    weighted rows in one pass (comm.mpi.SharedRows; all ranks on one host); `auto` is `shared`
    from AUTO_SHARED_BYTES on one host, `native` otherwise. `self.allreduce` is what runs
    (`shared` falls back to `native` where shared memory cannot be had).
    """

    def __init__(self, comm: Any, params: list[torch.Tensor], weight: float, alpha: float,
                 allreduce: str) -> None:  # no defaults: SyncConfig's alpha and mpi_allreduce are the one definition
        self.comm, self.weight, self.alpha, self.allreduce = comm, weight, alpha, allreduce
        params = [p for p in params]
        dtype = params[0].dtype
        device = params[0].device
        total = sum(p.numel() for p in params)
        np_dtype = np.dtype(str(dtype).removeprefix("torch."))
        self.shared: SharedRows | None = None
        if allreduce in ("auto", "shared"):  # collective: every rank builds its averager in attach
            large = allreduce == "shared" or total * np_dtype.itemsize >= AUTO_SHARED_BYTES
            if large and on_one_host(comm):
                self.shared = SharedRows.create(comm, total, np_dtype)
            self.allreduce = "shared" if self.shared is not None else "native"
        host = self.shared.mine if self.shared is not None else None
        if device.type == "cpu":  # numpy's allocator asks for huge pages: faster shared-memory MPI
            self.flat = torch.from_numpy(host if host is not None else np.empty(total, dtype=np_dtype))
        else:
            self.flat = torch.empty(total, dtype=dtype, device=device)
        offset = 0
        for p in params:  # hvdtrain: parameters become views of the flat buffer
            n = p.numel()
            self.flat[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.flat[offset:offset + n].view_as(p)
            offset += n
        self.host = self.flat.numpy() if device.type == "cpu" else host if host is not None else \
            np.empty(total, np_dtype)
        self.prev = np.empty_like(self.host) if alpha < 1 else None
        self.nbytes = self.host.nbytes

    def _weighted_sum(self, comm: Any, weight: float) -> None:
        """host <- sum_j w_j host_j: shared memory and the ring fold w_i into the pass that sums;
        MPI_Allreduce needs a pass of its own. The shared rows belong to the averager's own
        communicator; a sync over another (Hierarchy's) runs native on this rank's row."""
        if self.shared is not None and comm is self.comm:
            self.shared.weighted_sum_(weight)
            return
        if self.allreduce == "ring":
            from hvdtrain.comm.ring import ring_allreduce_
            ring_allreduce_(comm, self.host, scale=weight)
            return
        if weight != 1.0:
            np.multiply(self.host, weight, out=self.host)
        comm.Allreduce(MPI.IN_PLACE, self.host, op=MPI.SUM)

    def sync(self, post: Any = None, comm: Any = None, weight: float | None = None) -> None:
        """Average (and mix) over `comm` (default: all ranks) with this rank's `weight`; then
        `post(host)` may rewrite the result in place before it is used."""
        on_host = self.flat.device.type == "cpu"
        if not on_host:
            self.host[...] = self.flat.cpu().numpy()
        if self.prev is not None:
            np.copyto(self.prev, self.host)
        self._weighted_sum(comm or self.comm, self.weight if weight is None else weight)
        if self.prev is not None:  # theta + alpha (theta_bar - theta)
            np.subtract(self.host, self.prev, out=self.host)
            np.multiply(self.host, self.alpha, out=self.host)
            np.add(self.host, self.prev, out=self.host)
        if post is not None:
            post(self.host)
        if not on_host:
            self.flat.copy_(torch.from_numpy(self.host))

    def params(self) -> np.ndarray:
        """The replica's current flat parameters (a host copy on GPU, the live buffer on CPU)."""
        if self.flat.device.type != "cpu":
            self.host[...] = self.flat.cpu().numpy()
        return self.host

    def broadcast(self, root: int = 0, comm: Any = None) -> None:
        if self.flat.device.type != "cpu":
            self.host[...] = self.flat.cpu().numpy()
        (comm or self.comm).Bcast(self.host, root=root)
        if self.flat.device.type != "cpu":
            self.flat.copy_(torch.from_numpy(self.host))


class Hierarchy:
    """Averaging in two levels: among the ranks of each host (shared memory) every K_LOCAL steps,
    across hosts every K_GLOBAL (host leaders, then a broadcast within the host). Hosts are told
    apart by processor name. Weights are preserved: within host h rank i uses w_i / W_h, leaders
    use W_h = sum of their host's w_i, so a global sync gives sum_i w_i theta_i exactly."""

    def __init__(self, mpi: Any, weight: float) -> None:
        names = mpi.allgather(MPI.Get_processor_name())
        color = sorted(set(names)).index(names[mpi.rank])
        self.local = mpi.Split(color, key=mpi.rank)
        host_weight = self.local.allreduce(weight, op=MPI.SUM)
        self.local_weight = weight / host_weight if host_weight > 0 else 0.0
        self.leaders = mpi.Split(0 if self.local.rank == 0 else MPI.UNDEFINED, key=mpi.rank)
        self.host_weight = host_weight
        self.hosts = len(set(names))

    def sync(self, averager: "FlatAverager", scope: str) -> int:
        """One host-level or global average; returns the bytes this rank sent (ring model)."""
        sent = 0
        if self.local.size > 1:
            averager.sync(comm=self.local, weight=self.local_weight)
            sent += ring_bytes(averager.nbytes, self.local.size)
        if scope == "global" and self.hosts > 1:
            if self.leaders != MPI.COMM_NULL:
                averager.sync(comm=self.leaders, weight=self.host_weight)
                sent += ring_bytes(averager.nbytes, self.leaders.size)
            if self.local.size > 1:
                averager.broadcast(0, comm=self.local)
                sent += averager.nbytes if self.local.rank == 0 else 0
        return sent


class MPIAverage(SyncStrategy):
    name = "mpi"
    comm_kind = "mpi"
    replicas_identical = False  # between syncs, and always for optimizer state

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               sizes: list[int]) -> torch.optim.Optimizer:
        params = list(model.parameters())
        params += [b for b in float_buffers(model) if b.dtype == params[0].dtype]
        self._in_flat = {id(t) for t in params}  # broadcast with the flat buffer itself
        cfg = self.sync_cfg
        self.weights = weights = averaging_weights(sizes, cfg.weights)  # w_j: rows share, or --weights
        self.averager = FlatAverager(self.comm.mpi, params, weights[self.rank], cfg.alpha, cfg.mpi_allreduce)
        self.outer = OuterOptimizer(cfg.outer_optimizer, cfg.outer_lr, cfg.outer_momentum) \
            if cfg.outer_optimizer != "none" else None
        self.warmup = cfg.warmup_allreduce_steps
        self.hierarchy = Hierarchy(self.comm.mpi, weights[self.rank]) if cfg.hierarchy else None
        self._steps = 0       # optimizer steps taken (the warm-up counts them)
        self._last_sync = 0
        self.period = cfg.sync_every_seconds
        self.lockstep = not self.period
        self.syncs = 0             # time-based: syncs so far (the loop's tick)
        self.global_steps = 0      # time-based: steps all ranks took up to the last sync
        self._round_steps = 0      # time-based: this rank's steps since the last sync
        self._round_start = time.perf_counter()
        return optimizer

    def _allreduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Warm-up: gradients averaged over ranks (equal weights, as Horovod), one allreduce."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        flat = torch.cat([g.detach().reshape(-1) for g in grads]).cpu().numpy()
        start = time.perf_counter()
        self.comm.mpi.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        self.comm_seconds += time.perf_counter() - start
        self.bytes_sent += ring_bytes(flat.nbytes, self.size)
        flat /= self.size
        offset = 0
        for g in grads:
            g.copy_(torch.from_numpy(flat[offset:offset + g.numel()]).view_as(g))
            offset += g.numel()

    def step(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> None:
        if self._steps < self.warmup:
            if scaler is not None:
                scaler.unscale_(optimizer)
            self._allreduce_gradients(optimizer)
        self._steps += 1
        super().step(optimizer, scaler)

    def _sync(self, scope: str = "global") -> None:
        start = time.perf_counter()
        if self.hierarchy is not None:
            self.bytes_sent += self.hierarchy.sync(self.averager, scope)
        else:
            self.averager.sync(self.outer.step if self.outer is not None else None)
            self.bytes_sent += ring_bytes(self.averager.nbytes, self.size)
        self.comm_seconds += time.perf_counter() - start

    def _timed_sync(self, step: int) -> bool:
        """Time-based: after T seconds of local steps, average weighted by the steps (equal-size
        batches, so samples) each rank took since the last sync; one small allreduce first."""
        self._round_steps += 1
        if time.perf_counter() - self._round_start < self.period:
            return False
        start = time.perf_counter()
        counts = np.zeros(self.size)
        counts[self.rank] = self._round_steps
        self.comm.mpi.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
        self.averager.sync(self.outer.step if self.outer is not None else None,
                           weight=counts[self.rank] / counts.sum())
        self.bytes_sent += ring_bytes(self.averager.nbytes + counts.nbytes, self.size)
        self.comm_seconds += time.perf_counter() - start
        self.global_steps += int(counts.sum())
        self.syncs += 1
        self._last_sync, self._round_steps = step, 0
        self._round_start = time.perf_counter()
        return True

    def more(self, step: int, total_steps: int) -> bool:
        if not self.period:
            return step < total_steps
        return self.global_steps < total_steps * self.size  # the same on every rank after a sync

    def schedule_position(self, synced: bool) -> int | None:
        """Time-based: at each sync every rank's lr schedule moves to the ranks' mean step count, so
        a fast rank's schedule does not run ahead of the job's progress (nor a slow rank's lag)."""
        return self.global_steps // self.size if self.period and synced else None

    def tick(self, step: int, synced: bool) -> int | None:
        if not self.period:
            return step
        return self.syncs if synced else None

    def after_step(self, step: int, model: torch.nn.Module) -> bool:
        if self.period:
            return self._timed_sync(step)
        if step <= self.warmup:  # replicas moved together this step
            if step == self.warmup and self.outer is not None:
                self.outer.reset(self.averager.params())
            self._last_sync = step
            return True
        local_k, global_k = self.sync_cfg.hierarchy or (self.sync_cfg.sync_every,) * 2
        if (step - self.warmup) % global_k == 0:
            self._sync("global")
            self._last_sync = step
            return True
        if (step - self.warmup) % local_k == 0:
            self._sync("host")  # replicas agree within each host only
        return False

    def finish(self, model: torch.nn.Module, step: int) -> None:
        if self.period:  # time-based runs end only right after a sync
            return
        if step != self._last_sync:
            self._sync()
            self._last_sync = step

    def broadcast_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.averager.broadcast(0)
        mpi = self.comm.mpi
        for buf in model.buffers():  # buffers outside the flat buffer, e.g. BatchNorm's step count
            if id(buf) in self._in_flat:
                continue
            # clone: a view pickles its whole storage (the flat buffer, tens of MB for ResNet-18)
            buf.copy_(mpi.bcast(buf.detach().cpu().clone() if self.rank == 0 else None, root=0))
        state = mpi.bcast(optimizer.state_dict() if self.rank == 0 else None, root=0)
        if self.rank != 0:
            optimizer.load_state_dict(state)
        if self.outer is not None and self.outer.globals is None:
            self.outer.reset(self.averager.params())
        self._round_start = time.perf_counter()  # every rank leaves the broadcast together

    def layout(self) -> dict[str, Any]:
        return {"weights": self.weights}  # a resume at another world size mixes the ranks' states by w_j

    def summary(self, summary: dict[str, Any]) -> dict[str, Any]:
        cfg = self.sync_cfg
        return {"sync_every": cfg.sync_every, "alpha": cfg.alpha, "mpi_allreduce": cfg.mpi_allreduce,
                "mpi_allreduce_path": getattr(getattr(self, "averager", None), "allreduce", None)}  # auto's choice

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self._steps, "last_sync": self._last_sync, "syncs": self.syncs,
                "global_steps": self.global_steps,
                "outer": self.outer.state_dict() if self.outer is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a checkpoint of another strategy
            return
        self._steps, self._last_sync = int(state["steps"]), int(state["last_sync"])
        self.syncs, self.global_steps = int(state.get("syncs", 0)), int(state.get("global_steps", 0))
        self._round_start = time.perf_counter()
        if self.outer is not None:
            self.outer.load_state_dict(state["outer"])
