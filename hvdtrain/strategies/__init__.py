"""The strategies: look one up by name (or MODULE:ATTR) and start it.

The list of built-in strategies is hvdtrain.strategies.catalog (a leaf that config validation
reads too), re-exported here. A new strategy is one file with a SyncStrategy subclass plus one
entry in the catalog; or, without touching hvdtrain, `--backend mypkg.sync:MyStrategy` (any
SyncStrategy subclass).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hvdtrain.errors import ConfigError
from hvdtrain.plugins import call_plugin, is_spec, load_attr
from hvdtrain.strategies.catalog import HOROVOD_INSTALL, STRATEGIES, Entry, Variant, variants

if TYPE_CHECKING:
    from hvdtrain.config import TrainConfig
    from hvdtrain.strategies.base import SyncStrategy

__all__ = ["STRATEGIES", "Entry", "Variant", "variants", "strategy_class", "make_strategy"]


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
                          f"{HOROVOD_INSTALL if name == 'horovod' else '`make install` (mpi_jobs/install.sh)'}, or use "
                          f"--backend {other}") from None


def make_strategy(cfg: "TrainConfig") -> "SyncStrategy":
    """Start the strategy's communication library (once per process) and the strategy on it."""
    from hvdtrain.comm import make_comm
    if cfg.sync.backend != "single":  # before a strategy module's import can start MPI (mpi4py.MPI)
        from hvdtrain.comm.env import apply_env_defaults
        apply_env_defaults(cfg.collective_timeout)
    cls = strategy_class(cfg.sync.backend)
    if cfg.sync.elastic:  # config allows it with backend horovod only
        from hvdtrain.strategies.elastic import ElasticHorovod
        cls = ElasticHorovod
    comm = make_comm(cls.comm_kind, cfg.collective_timeout)
    return call_plugin(cfg.sync.backend, "--backend", cls, comm, cfg.sync, cfg.optim)
