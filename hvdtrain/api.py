"""`hvdtrain.fit`: train the user's own model on the user's own data, inside a script started by
horovodrun, mpirun, srun or plain `python` (one process)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from hvdtrain.config import load_config, overrides_from_kwargs
from hvdtrain.errors import EXIT_FAILED, ConfigError, WriteError
from hvdtrain.guard import end_job_after_error
from hvdtrain.registry import Job


def fit(model: Any, train_data: Any, eval_data: Any = None, *, loss: Any = None, optimizer: Any = None,
        scheduler: Callable[[Any], Any] | None = None, config: str | None = None,
        **settings: Any) -> dict[str, Any] | None:
    """Train `model` data-parallel on every rank of the job; returns the summary on rank 0, None elsewhere.

    model       an nn.Module built the same way on every rank (rank 0's parameters and buffers are
                broadcast at the start), or a zero-argument callable returning one. Afterwards it
                holds the final, synchronised state on every rank.
    train_data  a map-style Dataset (a rank calls __getitem__ only for its own block's indices),
                an (X, y) pair of arrays/tensors, or a data folder / built-in name.
    eval_data   the same kinds, or None: held-out loss (and accuracy) over every rank's share.
    loss        a callable (output, target) -> scalar, or 'mse' / 'cross_entropy'; default by task.
    optimizer   a callable params -> Optimizer (e.g. functools.partial(torch.optim.AdamW, lr=3e-4))
                or a name ('sgd', 'adam', 'adamw', used with `lr=`).
    scheduler   a callable optimizer -> LRScheduler, stepped once per step (or lr_schedule='cosine').
    config      a TOML file, as `hvdtrain train --config`; keyword settings override it.
    **settings  any run setting by its keyword (backend, epochs, batch_size, sync_every, alpha,
                weights, out, resume, seed, ...: `hvdtrain train --help` lists them, `--sync-every`
                is `sync_every=`). Default backend: `auto` (config.default_backend: horovod
                when a launcher started the process, single otherwise), as for the CLI.

    Raises ConfigError (a ValueError) on every rank for bad settings, models or data. An exception
    from your own code while training (model, Dataset, loss, scheduler) is raised as usual in one
    process; in a job of several ranks the others cannot go on without this rank, so its traceback
    is printed once (from one rank) and the whole job is ended with exit code 1.
    """
    from hvdtrain.strategies import make_strategy
    from hvdtrain.train import NumericalError, Preempted, train

    overrides = overrides_from_kwargs(settings, "fit() setting")
    if isinstance(loss, str):
        overrides["loss"], loss = loss, None
    if isinstance(optimizer, str):
        overrides.setdefault("optim", {})["name"], optimizer = optimizer, None
    if isinstance(train_data, (str, Path)):
        overrides.setdefault("data", {})["path"], train_data = str(train_data), None
    if model is None:
        raise ConfigError("fit() needs a model: an nn.Module or a zero-argument callable returning one")
    cfg = load_config(config, overrides, origin="keyword", supplied=_supplied(model, train_data, loss, optimizer,
                                                                              scheduler))
    strategy = make_strategy(cfg)
    job = Job(model=model, train_data=train_data, eval_data=eval_data, loss=loss, optimizer=optimizer,
              scheduler=scheduler)
    try:
        return train(cfg, strategy, job=job)
    except (ConfigError, WriteError, NumericalError, Preempted):  # raised on every rank together
        raise
    except Exception:  # the user's code raised on this rank while training: the others cannot go on
        comm = strategy.comm
        if comm.size == 1:
            raise
        end_job_after_error(comm.rank, comm.size, comm.abort, EXIT_FAILED, cfg.collective_timeout)
        raise


def _supplied(model: Any, train_data: Any, loss: Any, optimizer: Any, scheduler: Any) -> dict[str, str]:
    """The objects fit was given in place of settings, for config.check_applies (APPLIES)."""
    found = {name: getattr(obj, "__name__", type(obj).__name__) for name, obj in (
        ("model", model), ("loss", loss), ("optimizer", optimizer), ("scheduler", scheduler)) if obj is not None}
    if train_data is not None:
        found["train_data"] = "arrays" if isinstance(train_data, (tuple, list)) else "Dataset"
    return found
