"""The strategy catalog: the one list of built-in sync strategies that config validation, the
CLI, `fit`, `compare` and the benchmarks read.

A leaf: it imports nothing of hvdtrain (each strategy is a MODULE:CLASS string, imported only
when chosen, by hvdtrain.strategies.strategy_class), so hvdtrain.config can check `--backend`
without loading a strategy or a communication library. A new strategy is one file with a
SyncStrategy subclass plus one entry here.
"""
from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    path: str          # MODULE:CLASS, imported lazily: only the chosen one loads its library
    launcher: str      # how compare/bench start it: horovodrun, mpirun or python
    periodic: bool     # takes --sync-every k (compare/bench run it once per k)
    about: str


STRATEGIES: dict[str, Entry] = {
    "horovod": Entry("hvdtrain.strategies.horovod_allreduce:HorovodAllreduce", "horovodrun", False,
                     "Horovod ring-allreduce of gradients every step"),
    "mpi": Entry("hvdtrain.strategies.mpi_average:MPIAverage", "mpirun", True,
                 "MPI fallback: weighted parameter averaging every k steps"),
    "ddp": Entry("hvdtrain.strategies.ddp:DDPStrategy", "mpirun", False,
                 "torch DistributedDataParallel (gloo on CPU, nccl on GPU): the usual peer"),
    "single": Entry("hvdtrain.strategies.none:NoSync", "python", False, "one process, no synchronisation"),
}


HOROVOD_INSTALL = ('pip install "$(bash mpi_jobs/install.sh --horovod-wheel)" (the patched Horovod wheel, '
                   'built once and cached) or `make install`')
"""How to get Horovod, said wherever it is missing (README: *As a package, in your own environment*)."""


class Variant(NamedTuple):
    """One strategy setting as compare and the benchmarks run it."""
    label: str
    launcher: str
    flags: list[str]


def variants(sync_every: list[int], extra: dict[str, list[str]] | None = None) -> list[Variant]:
    """Every multi-rank strategy of the catalog; periodic ones once per k in `sync_every`.
    `extra[name]` adds flags to that strategy's runs (e.g. --alpha for mpi)."""
    out = []
    for name, entry in STRATEGIES.items():
        if entry.launcher == "python":
            continue
        flags = ["--backend", name, *(extra or {}).get(name, [])]
        if entry.periodic:
            out += [Variant(f"{name} k={k}", entry.launcher, [*flags, "--sync-every", str(k)]) for k in sync_every]
        else:
            out.append(Variant(name, entry.launcher, flags))
    return out
