"""The strategy registry: the one list that the CLI, `fit`, `compare` and the benchmarks read.

A new strategy is one file with a SyncStrategy subclass plus one line here; or, without touching
hvdtrain, `--backend mypkg.sync:MyStrategy` (any SyncStrategy subclass).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from hvdtrain.errors import ConfigError
from hvdtrain.plugins import call_plugin, is_spec, load_attr

if TYPE_CHECKING:
    from hvdtrain.config import TrainConfig
    from hvdtrain.strategies.base import SyncStrategy

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


class Variant(NamedTuple):
    """One strategy setting as compare and the benchmarks run it."""
    label: str
    launcher: str
    flags: list[str]


def variants(sync_every: list[int], extra: dict[str, list[str]] | None = None) -> list[Variant]:
    """Every multi-rank strategy of the registry; periodic ones once per k in `sync_every`.
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


def strategy_class(name: str) -> type["SyncStrategy"]:
    from hvdtrain.strategies.base import SyncStrategy
    if is_spec(name) and name not in STRATEGIES:
        cls = load_attr(name, "--backend")
        if not (isinstance(cls, type) and issubclass(cls, SyncStrategy)):
            raise ConfigError(f"--backend {name}: found {cls!r:.60}, which is not a SyncStrategy subclass; "
                              f"subclass hvdtrain.strategies.base.SyncStrategy")
        return cls
    if name not in STRATEGIES:
        raise ConfigError(f"backend {name!r} is unknown; use one of {', '.join(STRATEGIES)} or MODULE:ATTR")
    try:
        return load_attr(STRATEGIES[name].path, "--backend")
    except ConfigError as exc:
        other = "mpi" if name == "horovod" else "horovod"
        raise ConfigError(f"backend {name!r} cannot start: its library cannot be imported ({exc}); run "
                          f"`make install` (mpi_jobs/install.sh), or use --backend {other}") from None


def make_strategy(cfg: "TrainConfig") -> "SyncStrategy":
    """Start the strategy's communication library (once per process) and the strategy on it."""
    from hvdtrain.comm import make_comm
    cls = strategy_class(cfg.sync.backend)
    comm = make_comm(cls.comm_kind, cfg.collective_timeout)
    return call_plugin(cfg.sync.backend, "--backend", cls, comm, cfg.sync, cfg.optim)
