"""Collectives over torch.distributed (gloo on CPU, nccl on GPU), for the `ddp` strategy.

The rendezvous follows the launcher: torchrun's variables (MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE, LOCAL_RANK) when set; otherwise the MPI/Slurm layout hvdtrain already reads, with
rank 0's address and a free port shared over mpi4py (mpirun, srun --mpi=pmix).
"""
from __future__ import annotations

import datetime
import gc
import os
import socket
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hvdtrain.comm.base import Comm
from hvdtrain.errors import ConfigError
from hvdtrain.layout import detect_layout


def _rendezvous(rank: int, size: int) -> str:
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if size == 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError("backend 'ddp' needs MASTER_ADDR and MASTER_PORT (torchrun sets them) or mpi4py "
                          "to share rank 0's address; launch with torchrun or mpirun") from None
    address = None
    if rank == 0:
        host = os.environ.get("HVDTRAIN_DDP_ADDR") or _own_address()
        with socket.socket() as s:
            s.bind((host, 0))
            address = f"tcp://{host}:{s.getsockname()[1]}"
    return MPI.COMM_WORLD.bcast(address, root=0)


def _own_address() -> str:
    """The address other hosts reach this one on: the one the default route (or the bridge) uses."""
    names = {socket.gethostname(), socket.getfqdn()}
    for name in names:
        try:
            addr = socket.gethostbyname(name)
            if not addr.startswith("127."):
                return addr
        except OSError:
            pass
    return "127.0.0.1"


class TorchDistComm(Comm):
    kind = "ddp"

    def __init__(self, collective_timeout: float) -> None:
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun
            rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank, local_size = int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", size))
        else:
            layout = detect_layout(env)
            rank, size, local_rank, local_size = layout.rank, layout.size, layout.local_rank, layout.local_size
        super().__init__(rank, size, local_rank, local_size)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=collective_timeout or 1800)
            dist.init_process_group(backend, init_method=_rendezvous(rank, size), rank=rank,
                                    world_size=size, timeout=timeout)
        self.backend = backend

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.array(values, dtype=np.float64))
        if self.backend == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=root)
        return box[0]

    def allgather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def shutdown(self) -> None:
        if dist.is_initialized():
            # Collect the wrappers and pending work that still reference the process group first, so
            # that destroying it joins gloo's worker threads now, not during interpreter exit.
            gc.collect()
            dist.destroy_process_group()
            gc.collect()
