"""Typed run configuration: defaults < TOML file < command line / `fit` keywords, validated before
any MPI call.

Each setting is defined once, here: a dataclass field and the docstring under it. The TOML key
is `[section] field`; the CLI flag and the `fit` keyword are generated from the field (`SETTINGS`
below; `--sync-every` / `sync_every=`), with a few short names (`--data`, `--model`,
`--optimizer`, `--backend`). `__post_init__` checks the values and raises `ConfigError` with a
message that names the value, the rule and the fix. `APPLIES` (below the settings) says what each
setting applies to (backend, elastic, model, optimizer, data, fit's objects, one process);
`load_config` refuses a value other than the default where it does not apply (hvdtrain.applies).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from hvdtrain.applies import FIT, SPEC, Given, Rule, Run, check, describe
from hvdtrain.errors import ConfigError
from hvdtrain.layout import detect_layout
from hvdtrain.plugins import is_spec, nearest

PARTITIONS = ("block", "random")
DTYPES = ("float32", "float64")
MPI_ALLREDUCES = ("auto", "native", "ring", "shared")
LR_SCHEDULES = ("constant", "cosine")
AMP_MODES = ("none", "bf16", "fp16")
OUTER_OPTIMIZERS = ("none", "sgd", "nesterov")
FLOAT32_MAX = 3.4028234663852886e38
"""The largest lr: torch converts it to the parameters' dtype, float32 by default."""
THREADS_MAX = 1024
"""The most torch threads per rank (OpenMP fails to create many more and the process crashes)."""
TIMEOUT_MAX = 2 ** 31 - 1
"""The largest collective_timeout in seconds (Horovod's stall settings are C ints; 0 means never)."""


def _registered(kind: str) -> tuple[str, ...]:
    """Built-in names of a kind, from the catalogs (leaves: config imports no registry or strategy;
    imported here, not at the top, so importing config never runs the strategies package)."""
    if kind == "backend":
        from hvdtrain.strategies.catalog import STRATEGIES
        return tuple(STRATEGIES)
    from hvdtrain.catalog import LOSSES, MODELS, OPTIMIZERS
    return tuple({"model": MODELS, "optimizer": OPTIMIZERS, "loss": LOSSES}[kind])


def _check_name(kind: str, value: Any, flag: str) -> None:
    """A registered name or MODULE:ATTR (resolved, with its own errors, when the run starts)."""
    names = _registered(kind)
    _check(isinstance(value, str) and (value in names or is_spec(value)),
           f"{kind} {value!r} is unknown{nearest(str(value), names)}; use one of {', '.join(names)} "
           f"or MODULE:ATTR with {flag}")


def _utf8(text: str) -> bool:
    """Is `text` valid UTF-8 (no surrogates left from undecodable bytes in argv or a path)?"""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def default_backend(environ: Mapping[str, str] | None = None) -> str:
    """What `backend = "auto"` means: `horovod` when a launcher started this process (its variables
    are in `environ`, default os.environ: see layout.detect_layout), `single` otherwise."""
    launched = detect_layout(os.environ if environ is None else environ).launcher != "none"
    return "horovod" if launched else "single"


@dataclass
class DataConfig:
    path: str = "regression"
    """A folder written by `hvdtrain data make`, or a built-in name (regression, digits)."""
    rows: int = 100_000
    """Rows to generate for the built-in `regression` set (a folder, `digits` or a Dataset brings its own)."""
    partition: str = "block"
    """How samples are split across ranks: `block` (contiguous) or `random` (seeded)."""
    num_workers: int = 0
    """DataLoader worker processes per rank for a Dataset (`--data MODULE:ATTR` or `fit`; 0 = load in the training process)."""
    pin_memory: bool = False
    """DataLoader pin_memory for a Dataset (`--data MODULE:ATTR` or `fit`; faster host-to-GPU copies, on a GPU)."""

    def __post_init__(self) -> None:
        _check(self.partition in PARTITIONS,
               f"partition {self.partition!r} is unknown; use one of {', '.join(PARTITIONS)}")
        _check(isinstance(self.rows, int) and self.rows >= 1,
               f"rows must be a positive integer, got {self.rows!r}; use --rows N with N >= 1")
        _check(isinstance(self.num_workers, int) and self.num_workers >= 0,
               f"num_workers must be >= 0, got {self.num_workers!r}; use 0 to load in the training process")


@dataclass
class ModelConfig:
    name: str = "net"
    """`net` (10-20-1, regression), `mlp`, or MODULE:ATTR (an nn.Module class or a callable returning one)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for a MODULE:ATTR model (JSON on the command line, [model.args] in TOML)."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of `mlp`."""
    dtype: str = "float32"
    """Parameter and data dtype; float64 makes equivalence checks exact to ~1e-12."""

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        _check_name("model", self.name, "--model")
        _check(isinstance(self.args, dict), f"model args must be a JSON object, got {self.args!r}; "
                                            f"e.g. --model-args '{{\"num_classes\": 10}}'")
        _check(self.dtype in DTYPES, f"dtype {self.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        _check(all(isinstance(h, int) and h >= 1 for h in self.hidden) and self.hidden,
               f"hidden widths must be positive integers, got {self.hidden!r}; e.g. --hidden 256,256")


@dataclass
class OptimConfig:
    name: str = "sgd"
    """`sgd`, `adam`, `adamw`, or MODULE:ATTR (a torch Optimizer class, called with params and lr)."""
    args: dict[str, Any] = field(default_factory=dict)
    """More optimizer keyword arguments, e.g. {"weight_decay": 0.01} (JSON on the command line)."""
    lr: float = 0.01
    """Learning rate (per step, not scaled by world size unless `scale_lr`)."""
    momentum: float = 0.0
    """Momentum of the built-in `sgd` (another optimizer takes its own in `args`)."""
    scale_lr: bool = False
    """Horovod and DDP (gradient averaging): multiply lr by world size (the usual rule when the global batch grows)."""
    lr_schedule: str = "constant"
    """`constant`, or `cosine`: linear warm-up over warmup_steps, then cosine decay to 0."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up from 0 (with any lr_schedule)."""

    def __post_init__(self) -> None:
        _check_name("optimizer", self.name, "--optimizer")
        _check(isinstance(self.args, dict), f"optimizer args must be a JSON object, got {self.args!r}; "
                                            f"e.g. --optimizer-args '{{\"weight_decay\": 0.01}}'")
        _check(self.lr_schedule in LR_SCHEDULES, f"lr_schedule {self.lr_schedule!r} is unknown; use one "
                                                 f"of {', '.join(LR_SCHEDULES)}")
        _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
               f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}; use e.g. --warmup-steps 100")
        _check(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}; use e.g. --lr 0.01")
        _check(self.lr <= FLOAT32_MAX, f"lr must be at most {FLOAT32_MAX:.4g} (torch applies it in float32), got "
                                       f"{self.lr!r}; use e.g. --lr 0.01")
        _check(math.isfinite(self.momentum) and 0 <= self.momentum < 1,
               f"momentum must be in [0, 1), got {self.momentum!r}; use e.g. --momentum 0.9")


@dataclass
class SyncConfig:
    backend: str = "auto"
    """Sync strategy: `horovod` (gradient ring-allreduce), `mpi` (parameter averaging), `ddp`, `single`, or MODULE:ATTR; `auto` (the default, for the CLI, TOML and `fit` alike): `horovod` when a launcher (mpirun, horovodrun, srun) started the process, `single` otherwise (`default_backend`)."""
    sync_every: int = 1
    """MPI fallback: average parameters every k local steps."""
    alpha: float = 1.0
    """MPI fallback: mixing rate in (0, 1]; 1 = full averaging."""
    weights: tuple[float, ...] | None = None
    """MPI fallback: per-rank averaging weights (sum 1); default = block sizes / total."""
    mpi_allreduce: str = "auto"
    """MPI fallback: `native` (pre-scale by w_i, then MPI_Allreduce), `ring` (hvdtrain's own ring, w_i folded into its first send), `shared` (all ranks on one host: each rank's parameters are a row of one shared-memory file and rank r averages segment r of every row; native when shared memory is missing or too small), or `auto` (shared from 8 KiB of parameters when all ranks share one host, native otherwise)."""
    warmup_allreduce_steps: int = 0
    """MPI fallback: average gradients every step (as Horovod) for the first W steps, then parameters every k."""
    outer_optimizer: str = "none"
    """MPI fallback: `none`, `sgd` or `nesterov`: apply the pseudo-gradient (last global minus average) with an outer optimizer."""
    outer_lr: float = 0.7
    """MPI fallback: outer optimizer learning rate (outer sgd with lr 1 and momentum 0 is plain averaging)."""
    outer_momentum: float = 0.9
    """MPI fallback: outer optimizer momentum."""
    hierarchy: tuple[int, ...] | None = None
    """MPI fallback: K_LOCAL,K_GLOBAL: average within each host every K_LOCAL steps, across hosts every K_GLOBAL."""
    sync_every_seconds: float = 0.0
    """MPI fallback: time-based averaging: each rank takes local steps for T seconds, then all average with weights proportional to the samples each trained since the last sync (0 = off: every k steps)."""
    fp16: bool = False
    """Horovod: compress gradients to fp16 on the wire."""
    backward_passes_per_step: int = 1
    """Horovod: local gradient accumulation before each allreduce."""
    elastic: bool = False
    """Horovod elastic training under `horovodrun --gloo --min-np A --max-np B --host-discovery-script SCRIPT`: ranks may leave and join while the job runs (strategies/elastic.py; the same loop as every run)."""
    elastic_commit_every: int = 10
    """Elastic: commit the training state (model, optimizer, counters) every N steps; a failed rank rolls every rank back to the last commit, and host changes take effect at a commit."""

    def __post_init__(self) -> None:
        if self.backend == "auto":  # --elastic is Horovod's own
            self.backend = "horovod" if self.elastic else default_backend()
        _check_name("backend", self.backend, "--backend")
        _check(isinstance(self.sync_every, int) and self.sync_every >= 1,
               f"sync_every must be an integer >= 1, got {self.sync_every!r}; use --sync-every 1")
        _check(math.isfinite(self.alpha) and 0 < self.alpha <= 1,
               f"alpha must be in (0, 1], got {self.alpha!r}; use --alpha 1")
        _check(self.mpi_allreduce in MPI_ALLREDUCES,
               f"mpi_allreduce {self.mpi_allreduce!r} is unknown; use one of {', '.join(MPI_ALLREDUCES)}")
        _check(isinstance(self.warmup_allreduce_steps, int) and self.warmup_allreduce_steps >= 0,
               f"warmup_allreduce_steps must be an integer >= 0, got {self.warmup_allreduce_steps!r}; "
               f"use e.g. --warmup-allreduce-steps 100")
        _check(self.outer_optimizer in OUTER_OPTIMIZERS, f"outer_optimizer {self.outer_optimizer!r} is unknown; "
                                                         f"use one of {', '.join(OUTER_OPTIMIZERS)}")
        _check(math.isfinite(self.outer_lr) and 0 < self.outer_lr <= FLOAT32_MAX,
               f"outer_lr must be > 0 (and at most {FLOAT32_MAX:.4g}), got {self.outer_lr!r}; use e.g. --outer-lr 0.7")
        _check(math.isfinite(self.outer_momentum) and 0 <= self.outer_momentum < 1,
               f"outer_momentum must be in [0, 1), got {self.outer_momentum!r}; use e.g. --outer-momentum 0.9")
        _check(self.outer_optimizer == "none" or self.alpha == 1,
               f"alpha {self.alpha!r} and outer_optimizer {self.outer_optimizer!r} both set how far replicas "
               f"move; use --outer-lr instead of --alpha")
        if self.hierarchy is not None:
            self.hierarchy = tuple(self.hierarchy)
            h = self.hierarchy
            _check(len(h) == 2 and all(isinstance(k, int) and k >= 1 for k in h) and h[1] % h[0] == 0,
                   f"hierarchy must be K_LOCAL,K_GLOBAL with K_GLOBAL a multiple of K_LOCAL, got {list(h)}; "
                   f"e.g. --hierarchy 4,16")
            _check(self.alpha == 1 and self.outer_optimizer == "none",
                   "hierarchy averages fully at both levels; leave --alpha 1 and --outer-optimizer none")
        _check(isinstance(self.sync_every_seconds, (int, float)) and math.isfinite(self.sync_every_seconds)
               and self.sync_every_seconds >= 0,
               f"sync_every_seconds must be a number >= 0, got {self.sync_every_seconds!r}; "
               f"use e.g. --sync-every-seconds 2 (0: every --sync-every steps)")
        _check(isinstance(self.backward_passes_per_step, int) and self.backward_passes_per_step >= 1,
               f"backward_passes_per_step must be >= 1, got {self.backward_passes_per_step!r}; use 1")
        _check(isinstance(self.elastic_commit_every, int) and self.elastic_commit_every >= 1,
               f"elastic_commit_every must be an integer >= 1, got {self.elastic_commit_every!r}; "
               f"use e.g. --elastic-commit-every 10")
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
    eval_every: int = 0
    """Evaluate on the held-out data every N steps too (OUT/evals.jsonl, with training seconds so far); MPI fallback: use a multiple of sync_every."""
    tensorboard: bool = False
    """Also write TensorBoard event files to OUT/tensorboard (loss, samples/s, comm time, bytes, eval)."""
    threads: int = 0
    """torch intra-op threads per rank; 0 = cores on this host / ranks on this host."""
    collective_timeout: float = 300.0
    """End the job when one synchronisation waits longer than this many seconds (0 = never)."""
    loss: str = "auto"
    """`auto` (MSE for float targets, cross-entropy for integer labels), `mse`, `cross_entropy`, or MODULE:ATTR."""
    amp: str = "none"
    """Mixed precision: `none`, `bf16` (autocast, CPU and GPU) or `fp16` (GPU, with a GradScaler)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.epochs, int) and self.epochs >= 1,
               f"epochs must be an integer >= 1, got {self.epochs!r}; use --epochs 1")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1,
               f"batch_size must be an integer >= 1, got {self.batch_size!r}; use --batch-size 64")
        _check(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
               f"checkpoint_every must be >= 0, got {self.checkpoint_every!r}; use 0 for only at the end")
        _check(isinstance(self.log_every, int) and self.log_every >= 1,
               f"log_every must be >= 1, got {self.log_every!r}; use e.g. --log-every 10")
        _check(isinstance(self.eval_every, int) and self.eval_every >= 0,
               f"eval_every must be an integer >= 0, got {self.eval_every!r}; use 0 for only at the end")
        _check(isinstance(self.threads, int) and 0 <= self.threads <= THREADS_MAX,
               f"threads must be in [0, {THREADS_MAX}], got {_show(self.threads)}; use 0 for cores / local ranks")
        _check(bool(str(self.out)), "out must name a folder; use --out DIR")
        _check(not self.tensorboard or _utf8(str(self.out)),
               f"--tensorboard takes an --out that is valid UTF-8 (TensorBoard encodes its paths so), got "
               f"{str(self.out)!r}; choose another --out, or drop --tensorboard")
        _check(math.isfinite(self.collective_timeout) and (self.collective_timeout == 0 or
                                                          1 <= self.collective_timeout <= TIMEOUT_MAX),
               f"collective_timeout must be 0 (never) or 1 to {TIMEOUT_MAX} seconds (Horovod's stall check counts "
               f"whole seconds in a C int), got {self.collective_timeout!r}; use e.g. --collective-timeout 300")
        _check(isinstance(self.seed, int) and self.seed >= 0,
               f"seed must be an integer >= 0, got {self.seed!r}; use e.g. --seed 0")
        if self.loss != "auto":
            _check_name("loss", self.loss, "--loss")
        _check(self.amp in AMP_MODES, f"amp {self.amp!r} is unknown; use one of {', '.join(AMP_MODES)}")


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
    if isinstance(default, dict):
        return None if isinstance(value, dict) else "a table (JSON object)"
    if isinstance(default, tuple) or (default is None and value is not None):
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        return None if ok else "a list of numbers"
    return None


INT_LIMIT = 2 ** 63
"""Integer settings stay below this (torch and numpy take int64: seeds, sizes, counts)."""


def _range_error(value: Any, kind: str) -> str | None:
    """Why a value of the right kind cannot be used at all: an integer beyond int64, a number
    beyond a float. `kind` is the setting's (_kind: int, ints, float, floats, ...)."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, bool) or not isinstance(v, int):
            continue
        if kind in ("float", "floats"):
            try:
                float(v)
            except OverflowError:
                return "a number must fit in a float"
        elif not -INT_LIMIT <= v < INT_LIMIT:
            return "integers must lie in [-2**63, 2**63)"
    return None


def _show(value: Any) -> str:
    """repr for a message, short (a 5000-digit integer has no repr: Python limits int to str)."""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 80 else text[:77] + "..."


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {where}{unknown[0]}{nearest(unknown[0], known)}; known keys: "
                          f"{', '.join(sorted(known))}")
    for key, value in values.items():
        f = known[key]
        if f.name in SECTIONS and cls is TrainConfig:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = _kind_error(value, default)
        if kind:
            raise ConfigError(f"config key {where}{key} must be {kind}, got {_show(value)}; fix its value")
        bad = _range_error(value, _kind(str(f.type)))
        if bad:
            flag = SHORT_FLAGS.get((where.rstrip("."), key), "--" + key.replace("_", "-"))
            raise ConfigError(f"{flag} (TOML {where}{key}) {_show(value)} is out of range: {bad}; use a value in range")
    try:
        return cls(**values)
    except TypeError as exc:  # wrong type in a TOML value, e.g. a list where a number belongs
        raise ConfigError(f"bad value in {where or 'config'}: {exc}") from None


def load_config(path: str | None = None, overrides: dict[str, dict[str, Any] | Any] | None = None, *,
                origin: str = "flag", supplied: Mapping[str, str] | None = None) -> TrainConfig:
    """Merge defaults < TOML file < overrides (same nested shape as the TOML), validate the values,
    then check every setting off its default against what it applies to (APPLIES).

    origin    how the overrides were given, for messages: "flag" (the CLI) or "keyword" (`fit`)
    supplied  the objects `fit` was given instead of settings: argument -> what it is, e.g.
              {"model": "nn.Module", "train_data": "Dataset", "optimizer": "callable"}
    """
    raw: dict[str, Any] = {}
    if path is not None:  # "" too: an empty --config names no file
        p = Path(path)
        try:
            text = p.read_bytes() if p.is_file() else None
        except OSError as exc:  # unreadable, or a name the system refuses (ENAMETOOLONG)
            raise ConfigError(f"config file {_show(path)} cannot be read ({exc.strerror}); pass a readable TOML "
                              f"file to --config") from None
        _check(text is not None, f"config file {path!r} does not exist; pass an existing TOML file to --config")
        try:
            raw = tomllib.loads(text.decode("utf-8"))  # type: ignore[union-attr]
        except ValueError as exc:  # TOMLDecodeError, UnicodeDecodeError, an integer of > 4300 digits
            raise ConfigError(f"config file {path!r} is not valid TOML ({str(exc).splitlines()[0][:200]}); fix the "
                              f"syntax") from None
    from_toml = _keys(raw)
    from_overrides = _keys(overrides or {})
    for key, value in (overrides or {}).items():
        if key in SECTIONS and isinstance(value, dict):
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
    auto = raw.get("sync", {}).get("backend", "auto") == "auto"
    cfg = _build(TrainConfig, top, "")
    how = {s.kwarg: "toml" if _dotted(s) in from_toml and _dotted(s) not in from_overrides else origin
           for s in SETTINGS}
    check_applies(cfg, how, path, supplied, auto)
    return cfg


def _keys(nested: Mapping[str, Any]) -> set[str]:
    """'section.key' and 'key' of a TOML-shaped mapping."""
    return {f"{k}.{sub}" if k in SECTIONS and isinstance(v, dict) else k
            for k, v in nested.items() for sub in (v if k in SECTIONS and isinstance(v, dict) else [None])}


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --- one definition per setting: CLI flags and fit keywords generated from the fields ----------

#: The few settings whose flag is shorter than section + field.
SHORT_FLAGS = {("data", "path"): "--data", ("model", "name"): "--model", ("model", "args"): "--model-args",
               ("optim", "name"): "--optimizer", ("optim", "args"): "--optimizer-args",
               ("sync", "backend"): "--backend"}


class Setting(NamedTuple):
    section: str | None  # None: a top-level TrainConfig field
    key: str
    flag: str            # --sync-every
    kwarg: str           # sync_every (hvdtrain.fit keyword)
    kind: str            # bool, int, float, str, ints, floats, json
    help: str


def _docstrings(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (the field's one documentation)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


def _kind(annotation: str) -> str:
    return {"bool": "bool", "int": "int", "float": "float", "str": "str", "tuple[int, ...]": "ints",
            "tuple[float, ...] | None": "floats", "tuple[int, ...] | None": "ints",
            "dict[str, Any]": "json"}[annotation]


def _settings() -> list[Setting]:
    out = []
    for section, cls in [(None, TrainConfig), *SECTIONS.items()]:
        docs = _docstrings(cls)
        for f in fields(cls):
            if section is None and f.name in SECTIONS:
                continue
            flag = SHORT_FLAGS.get((section or "", f.name), "--" + f.name.replace("_", "-"))
            out.append(Setting(section, f.name, flag, flag[2:].replace("-", "_"), _kind(str(f.type)),
                               docs.get(f.name, "")))
    return out


SETTINGS: list[Setting] = _settings()
BY_KWARG: dict[str, Setting] = {s.kwarg: s for s in SETTINGS}


def field_default(setting: Setting) -> Any:
    """A setting's default exactly as its dataclass field declares it (`backend` stays "auto"),
    for the CLI's help, `hvdtrain data make` and other commands that reuse a setting."""
    cls = SECTIONS[setting.section] if setting.section else TrainConfig
    f = next(f for f in fields(cls) if f.name == setting.key)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def overrides_from_kwargs(values: dict[str, Any], where: str = "setting") -> dict[str, Any]:
    """Flat `fit`-style keywords (sync_every=4) -> the nested shape of the TOML file."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in BY_KWARG:
            raise ConfigError(f"unknown {where} {name!r}{nearest(name, BY_KWARG)}; valid ones: "
                              f"{', '.join(sorted(BY_KWARG))}")
        s = BY_KWARG[name]
        (out.setdefault(s.section, {}) if s.section else out)[s.key] = value
    return out


def parse_json_object(text: str) -> dict[str, Any]:
    """A --model-args / --optimizer-args value: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not valid JSON ({exc.args[0].split(':')[0]})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{text!r} is not a JSON object; write it as '{{\"name\": value}}'")
    return value


# --- what each setting applies to: one table, checked by load_config for the CLI, TOML and fit ---

_MPI, _HOROVOD = ("mpi",), ("horovod",)

#: setting (its fit keyword) -> where it applies (hvdtrain.applies.Rule); a setting not listed applies
#: to every run. A value other than the default where the rule does not hold is refused by
#: load_config; a default never is. A MODULE:ATTR backend takes every backend's settings.
#: Read from the code: strategies/*.py (which SyncConfig fields each strategy reads; `scales_lr`
#: and `takes_accumulation`), registry.py (models, optimizers), sources.py (data), elastic.py.
APPLIES: dict[str, Rule] = {
    # run
    "resume": Rule(elastic=False),
    "overwrite": Rule(not_with=("resume",)),
    "checkpoint_every": Rule(elastic=False, note="commits: --elastic-commit-every"),
    "loss": Rule(fit_replaces="loss"),
    "amp": Rule(elastic=False, values=("fp16",)),
    # [data]
    "data": Rule(fit_replaces="train_data"),
    "rows": Rule(data=("regression",), note="a folder, `digits` or a Dataset brings its own rows"),
    "num_workers": Rule(data=(SPEC, "Dataset"), note="a DataLoader setting: a data folder is read without one"),
    "pin_memory": Rule(data=(SPEC, "Dataset"), note="a DataLoader setting: a data folder is read without one"),
    # [model]
    "model": Rule(fit_replaces="model"),
    "model_args": Rule(models=(SPEC,), note="built-in mlp takes --hidden"),
    "hidden": Rule(models=("mlp",)),
    # [optim]
    "optimizer": Rule(fit_replaces="optimizer"),
    "optimizer_args": Rule(fit_replaces="optimizer"),
    "lr": Rule(fit_replaces="optimizer"),
    "momentum": Rule(optimizers=("sgd",), note="another optimizer takes its own in --optimizer-args, e.g. "
                                               "'{\"momentum\": 0.9}' for torch.optim:SGD"),
    "scale_lr": Rule(backends=("horovod", "ddp")),  # the strategies with scales_lr = True
    "lr_schedule": Rule(elastic=False, fit_replaces="scheduler"),
    "warmup_steps": Rule(elastic=False, fit_replaces="scheduler"),
    # [sync]
    "backend": Rule(values=("single",), one_process=True),
    "sync_every": Rule(backends=_MPI, not_with=("hierarchy", "sync_every_seconds")),
    "alpha": Rule(backends=_MPI),
    "weights": Rule(backends=_MPI, not_with=("sync_every_seconds",)),
    "mpi_allreduce": Rule(backends=_MPI),
    "warmup_allreduce_steps": Rule(backends=_MPI, not_with=("sync_every_seconds",)),
    "outer_optimizer": Rule(backends=_MPI),
    "outer_lr": Rule(backends=_MPI, needs="outer_optimizer"),
    "outer_momentum": Rule(backends=_MPI, needs="outer_optimizer"),
    "hierarchy": Rule(backends=_MPI, not_with=("sync_every_seconds",)),
    "sync_every_seconds": Rule(backends=_MPI),
    "fp16": Rule(backends=_HOROVOD),
    "backward_passes_per_step": Rule(backends=_HOROVOD),  # takes_accumulation = True
    "elastic": Rule(backends=_HOROVOD, plugins=False, note="under horovodrun --gloo's elastic mode"),
    "elastic_commit_every": Rule(elastic=True),
}


def describe_rule(kwarg: str) -> str:
    """Where a setting applies, in words (README, `--help`): '' for a setting of every run."""
    return describe(APPLIES.get(kwarg), {s.kwarg: s.flag for s in SETTINGS}, kwarg)


def check_applies(cfg: TrainConfig, how: Mapping[str, str], path: str | None,
                  supplied: Mapping[str, str] | None = None, auto: bool = False) -> None:
    """Every setting off its default against APPLIES (hvdtrain.applies.check); `how` says how each
    setting was given ("flag", "keyword" or "toml"), `auto` whether `backend` came from auto."""
    from hvdtrain.catalog import DATASETS
    supplied = supplied or {}
    given = {}
    for s in SETTINGS:
        value = getattr(getattr(cfg, s.section) if s.section else cfg, s.key)
        given[s.kwarg] = Given(s.flag, _dotted(s), value, field_default(s), how[s.kwarg])
    why = ""
    if auto:
        why = ("auto: --elastic is Horovod's" if cfg.sync.elastic else "auto: a launcher started this process"
               if cfg.sync.backend == "horovod" else "auto: no launcher started this process")
    model, optimizer, path_ = cfg.model.name, cfg.optim.name, cfg.data.path
    run = Run(cfg.sync.backend, why, cfg.sync.elastic,
              FIT if "model" in supplied else model if model in _registered("model") else SPEC, model,
              FIT if "optimizer" in supplied else optimizer if optimizer in _registered("optimizer") else SPEC,
              optimizer,
              supplied.get("train_data") or (path_ if path_ in DATASETS else SPEC if is_spec(path_) else "folder"),
              path_, supplied, _registered("backend"))
    check(APPLIES, given, run, path, {"outer_optimizer": OUTER_OPTIMIZERS})


def _dotted(s: Setting) -> str:
    return f"{s.section}.{s.key}" if s.section else s.key
