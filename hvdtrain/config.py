"""Typed run configuration: defaults < TOML file < command line, validated before any MPI call.

Every field has a docstring-style comment; `__post_init__` checks the values and raises
`ConfigError` with a message that names the value, the rule and the fix.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration error; the CLI prints it on one line and exits 2."""


BACKENDS = ("horovod", "mpi", "single")
MODELS = ("net", "mlp")
OPTIMIZERS = ("sgd", "adam")
PARTITIONS = ("block", "random")
DTYPES = ("float32", "float64")
MPI_ALLREDUCES = ("native", "ring")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class DataConfig:
    path: str = "regression"
    """A folder written by `hvdtrain data make`, or a built-in name (regression, digits)."""
    rows: int = 100_000
    """Rows to generate when `path` is a built-in name (ignored for a folder)."""
    partition: str = "block"
    """How samples are split across ranks: `block` (contiguous) or `random` (seeded)."""

    def __post_init__(self) -> None:
        _check(self.partition in PARTITIONS,
               f"partition {self.partition!r} is unknown; use one of {', '.join(PARTITIONS)}")
        _check(isinstance(self.rows, int) and self.rows >= 1,
               f"rows must be a positive integer, got {self.rows!r}; use --rows N with N >= 1")


@dataclass
class ModelConfig:
    name: str = "net"
    """`net` (Linear 10->20, ReLU, Linear 20->1; regression) or `mlp` (any task)."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of `mlp`."""
    dtype: str = "float32"
    """Parameter and data dtype; float64 makes equivalence checks exact to ~1e-12."""

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        _check(self.name in MODELS, f"model {self.name!r} is unknown; use one of {', '.join(MODELS)}")
        _check(self.dtype in DTYPES, f"dtype {self.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        _check(all(isinstance(h, int) and h >= 1 for h in self.hidden) and self.hidden,
               f"hidden widths must be positive integers, got {self.hidden!r}; e.g. --hidden 256,256")


@dataclass
class OptimConfig:
    name: str = "sgd"
    """`sgd` or `adam`."""
    lr: float = 0.01
    """Learning rate (per step, not scaled by world size unless `scale_lr`)."""
    momentum: float = 0.0
    """SGD momentum."""
    scale_lr: bool = False
    """Horovod only: multiply lr by world size (the usual rule when the global batch grows)."""

    def __post_init__(self) -> None:
        _check(self.name in OPTIMIZERS,
               f"optimizer {self.name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
        _check(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}; use e.g. --lr 0.01")
        _check(math.isfinite(self.momentum) and 0 <= self.momentum < 1,
               f"momentum must be in [0, 1), got {self.momentum!r}; use e.g. --momentum 0.9")


@dataclass
class SyncConfig:
    backend: str = "horovod"
    """`horovod` (gradient ring-allreduce), `mpi` (parameter averaging) or `single`."""
    sync_every: int = 1
    """MPI fallback: average parameters every k local steps."""
    alpha: float = 1.0
    """MPI fallback: mixing rate in (0, 1]; 1 = full averaging."""
    weights: tuple[float, ...] | None = None
    """MPI fallback: per-rank averaging weights (sum 1); default = block sizes / total."""
    mpi_allreduce: str = "native"
    """MPI fallback: `native` (MPI_Allreduce) or `ring` (hvdtrain's own ring)."""
    fp16: bool = False
    """Horovod: compress gradients to fp16 on the wire."""
    backward_passes_per_step: int = 1
    """Horovod: local gradient accumulation before each allreduce."""

    def __post_init__(self) -> None:
        _check(self.backend in BACKENDS,
               f"backend {self.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        _check(isinstance(self.sync_every, int) and self.sync_every >= 1,
               f"sync_every must be an integer >= 1, got {self.sync_every!r}; use --sync-every 1")
        _check(math.isfinite(self.alpha) and 0 < self.alpha <= 1,
               f"alpha must be in (0, 1], got {self.alpha!r}; use --alpha 1")
        _check(self.mpi_allreduce in MPI_ALLREDUCES,
               f"mpi_allreduce {self.mpi_allreduce!r} is unknown; use one of {', '.join(MPI_ALLREDUCES)}")
        _check(isinstance(self.backward_passes_per_step, int) and self.backward_passes_per_step >= 1,
               f"backward_passes_per_step must be >= 1, got {self.backward_passes_per_step!r}; use 1")
        if self.weights is not None:
            self.weights = tuple(float(w) for w in self.weights)
            _check(all(math.isfinite(w) and w >= 0 for w in self.weights),
                   f"weights must be >= 0, got {list(self.weights)}; e.g. --weights 0.5,0.5")
            _check(abs(sum(self.weights) - 1) <= 1e-6,
                   f"weights must sum to 1, got {list(self.weights)} (sum {sum(self.weights):g}); rescale them")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    epochs: int = 1
    """Passes over each rank's block."""
    batch_size: int = 64
    """Samples per rank per step (global batch = batch_size x world size)."""
    seed: int = 0
    """Seeds model init, data generation and the per-rank shuffles."""
    out: str = "runs/default"
    """Output folder (rank 0 writes metrics.jsonl, summary.json, model.pt, checkpoints/)."""
    resume: bool = False
    """Continue from the newest checkpoint in `out`/checkpoints."""
    overwrite: bool = False
    """Start fresh even though `out` holds checkpoints of an earlier run (they are replaced)."""
    checkpoint_every: int = 0
    """Write a checkpoint every N steps (0 = only at the end and on preemption)."""
    log_every: int = 10
    """Average the loss over ranks every N steps (one tiny allreduce), one metrics line per step."""
    threads: int = 0
    """torch intra-op threads per rank; 0 = cores on this host / ranks on this host."""
    collective_timeout: float = 300.0
    """End the job when one synchronisation waits longer than this many seconds (0 = never)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.epochs, int) and self.epochs >= 1,
               f"epochs must be an integer >= 1, got {self.epochs!r}; use --epochs 1")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1,
               f"batch_size must be an integer >= 1, got {self.batch_size!r}; use --batch-size 64")
        _check(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
               f"checkpoint_every must be >= 0, got {self.checkpoint_every!r}; use 0 for only at the end")
        _check(isinstance(self.log_every, int) and self.log_every >= 1,
               f"log_every must be >= 1, got {self.log_every!r}; use e.g. --log-every 10")
        _check(isinstance(self.threads, int) and self.threads >= 0,
               f"threads must be >= 0, got {self.threads!r}; use 0 for cores / local ranks")
        _check(bool(str(self.out)), "out must name a folder; use --out DIR")
        _check(math.isfinite(self.collective_timeout) and self.collective_timeout >= 0,
               f"collective_timeout must be >= 0 seconds, got {self.collective_timeout!r}; use 0 to disable")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "sync": SyncConfig}


def _kind_error(value: Any, default: Any) -> str | None:
    """The expected kind if `value` (from TOML or a caller) cannot stand where `default` stands."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, tuple) or (default is None and value is not None):
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        return None if ok else "a list of numbers"
    return None


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {where}{unknown[0]}; known keys: {', '.join(sorted(known))}")
    for key, value in values.items():
        f = known[key]
        if f.default is not dataclasses.MISSING or f.name in ("hidden",):
            default = f.default if f.default is not dataclasses.MISSING else ()
            kind = _kind_error(value, default)
            if kind and not isinstance(value, dict):
                raise ConfigError(f"config key {where}{key} must be {kind}, got {value!r}; fix its value")
    try:
        return cls(**values)
    except TypeError as exc:  # wrong type in a TOML value, e.g. a list where a number belongs
        raise ConfigError(f"bad value in {where or 'config'}: {exc}") from None


def load_config(path: str | None = None, overrides: dict[str, dict[str, Any] | Any] | None = None) -> TrainConfig:
    """Merge defaults < TOML file < overrides (same nested shape as the TOML) and validate."""
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        _check(p.is_file(), f"config file {path!r} does not exist; pass an existing TOML file to --config")
        try:
            raw = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path!r} is not valid TOML ({exc}); fix the syntax") from None
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            raw.setdefault(key, {})
            _check(isinstance(raw[key], dict), f"config key {key!r} must be a [{key}] table; write it as [{key}]")
            raw[key].update(value)
        else:
            raw[key] = value
    top = {k: v for k, v in raw.items() if k not in SECTIONS}
    for name, cls in SECTIONS.items():
        section = raw.get(name, {})
        _check(isinstance(section, dict), f"config key {name!r} must be a [{name}] table; write it as [{name}]")
        top[name] = _build(cls, section, f"{name}.")
    return _build(TrainConfig, top, "")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
