"""What to train, resolved: the user's objects (from `fit`) or the config's names and MODULE:ATTR
plug-ins (from the CLI / TOML). Built-in names live in hvdtrain.catalog (read by config
validation too); a new model, loss or optimizer is one entry there plus its case in the builder
below, or a plug-in with no change to hvdtrain.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from hvdtrain.catalog import LOSSES, MODELS, OPTIMIZERS  # noqa: F401  (re-exported)
from hvdtrain.config import ModelConfig, OptimConfig
from hvdtrain.errors import ConfigError
from hvdtrain.plugins import call_plugin, describe_error, is_spec, load_attr


@dataclass
class Job:
    """The user's own pieces (all optional: what is None comes from the config)."""
    model: Any = None            # nn.Module, or a zero-argument callable returning one
    train_data: Any = None       # Dataset, (X, y) pair, folder, or None for cfg.data.path
    eval_data: Any = None
    loss: Any = None             # callable (output, target) -> scalar, or a name
    optimizer: Any = None        # callable params -> Optimizer, or a name
    scheduler: Any = None        # callable optimizer -> LRScheduler


@dataclass(frozen=True)
class DataShape:
    task: str                    # "regression" or "classification"
    n_features: int              # features of one flattened sample
    n_outputs: int | None        # 1 / target width for regression, classes (when known)


def build_model(cfg: ModelConfig, job: Job, shape: DataShape) -> nn.Module:
    """The model on this rank, before the start-up broadcast (rank 0's weights win). A user's model
    keeps its own dtype unless dtype float64 is asked for; the data follows the model's dtype."""
    dtype = getattr(torch, cfg.dtype)
    if job.model is not None:
        model = job.model
        if cfg.args:  # hvdtrain builds none of the user's objects: nothing would take them
            raise ConfigError(f"--model-args {json.dumps(cfg.args)} is for a MODULE:ATTR model, but fit got the "
                              f"model itself; build it with its arguments (a callable: functools.partial(Net, ...))")
        if not isinstance(model, nn.Module) and not callable(model):
            raise ConfigError(f"fit(model=...) got {type(model).__name__} {model!r:.40}; pass an nn.Module or a "
                              f"zero-argument callable returning one")
        if not isinstance(model, nn.Module):
            model = call_plugin("model", "fit(model=...)", model)
            _need_module(model, "fit(model=...): the callable")
        return model.to(dtype) if cfg.dtype != "float32" else model
    if is_spec(cfg.name):
        model = call_plugin(cfg.name, "--model", load_attr(cfg.name, "--model"), **cfg.args)
        _need_module(model, f"--model {cfg.name}")
        return model.to(dtype) if cfg.dtype != "float32" else model
    if cfg.args:
        raise ConfigError(f"--model-args is for MODULE:ATTR models; built-in {cfg.name!r} takes --hidden")
    from hvdtrain.models import MLP, Net
    if shape.n_outputs is None:
        raise ConfigError(f"model {cfg.name!r} needs the number of classes, which the data does not say; "
                          f"give the Dataset a `num_classes` attribute or use a MODULE:ATTR model")
    if cfg.name == "net":
        if shape.task != "regression":
            raise ConfigError(f"model 'net' is for regression but the data is {shape.task}; use --model mlp")
        return Net(shape.n_features, shape.n_outputs).to(dtype)
    return MLP(shape.n_features, shape.n_outputs, cfg.hidden).to(dtype)


def _need_module(obj: Any, what: str) -> None:
    if not isinstance(obj, nn.Module):
        raise ConfigError(f"{what} returned {type(obj).__name__}, not a torch.nn.Module; return a model")


class _MSE(nn.Module):
    """MSE that lines a (B,) target up with a (B, 1) output instead of broadcasting to (B, B)."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape and pred.numel() == target.numel():
            target = target.view_as(pred)
        return nn.functional.mse_loss(pred, target.to(pred.dtype))


def build_loss(name: str, job: Job, task: str) -> Callable[[Any, Any], torch.Tensor]:
    spec = job.loss if job.loss is not None else name
    if callable(spec):
        return spec
    if spec == "auto":
        spec = "mse" if task == "regression" else "cross_entropy"
    if spec == "mse":
        return _MSE()
    if spec == "cross_entropy":
        return nn.CrossEntropyLoss()
    found = load_attr(spec, "--loss")
    if isinstance(found, type):  # a loss class such as torch.nn:SmoothL1Loss
        found = call_plugin(spec, "--loss", found)
    if not callable(found):
        raise ConfigError(f"--loss {spec}: found {type(found).__name__}, which is not callable; point it "
                          f"at a function (output, target) -> loss or an nn.Module class")
    return found


def build_optimizer(cfg: OptimConfig, job: Job, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    spec = job.optimizer if job.optimizer is not None else cfg.name
    if callable(spec) and not isinstance(spec, str):
        if cfg.args:  # hvdtrain calls the user's callable with the parameters only
            raise ConfigError(f"--optimizer-args {json.dumps(cfg.args)} is for a named or MODULE:ATTR optimizer, "
                              f"but fit(optimizer=...) got a callable; put the arguments into it, e.g. "
                              f"functools.partial(torch.optim.AdamW, lr=3e-4, weight_decay=0.01)")
        opt = call_plugin(getattr(spec, "__name__", "optimizer"), "fit(optimizer=...)", spec, params)
    elif not isinstance(spec, str):
        raise ConfigError(f"fit(optimizer=...) got {type(spec).__name__} {spec!r:.40}; pass a callable params -> "
                          f"Optimizer or a name ('sgd', 'adam', 'adamw')")
    else:
        found = load_attr(OPTIMIZERS.get(spec, spec), "--optimizer")
        opt = call_plugin(spec, "--optimizer", found, params, **optimizer_keywords(cfg, spec))
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"optimizer {spec!r} gave {type(opt).__name__}, not a torch.optim.Optimizer; "
                          f"pass a callable params -> Optimizer, e.g. functools.partial(torch.optim.AdamW, lr=3e-4)")
    return opt


def optimizer_keywords(cfg: OptimConfig, name: str) -> dict[str, Any]:
    """The keywords an optimizer class is called with, after the parameters: `lr` (and `momentum`
    for sgd) from their own settings, then --optimizer-args. The rule for a key given both ways:
    an error naming both, never a silent choice (a setting is given in one place; `lr` stays where
    scale_lr, the schedules, the summary and `compare` read it)."""
    own = {"lr": ("--lr", cfg.lr), **({"momentum": ("--momentum", cfg.momentum)} if name == "sgd" else {})}
    if "params" in cfg.args:
        raise ConfigError('--optimizer-args sets "params", which hvdtrain passes itself (the model\'s trainable '
                          'parameters); drop "params" from --optimizer-args')
    for key, (flag, value) in own.items():
        if key in cfg.args:
            given = json.dumps(cfg.args[key])
            default = OptimConfig.__dataclass_fields__[key].default
            now = f"its default {value:g}" if value == default else f"{value:g}"
            raise ConfigError(f'--optimizer-args sets "{key}" and so does {flag} ({now}); give it once: use {flag} '
                              f'{given} (fit: {key}={given}) and drop "{key}" from --optimizer-args')
    return {**{key: value for key, (_, value) in own.items()}, **cfg.args}


def warmup_cosine(warmup: int, total: int, cosine: bool) -> Callable[[int], float]:
    """LR multiplier at step s: linear warm-up over `warmup` steps, then constant or cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_scheduler(cfg: OptimConfig, job: Job, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> Any:
    """The user's scheduler (stepped once per step), the built-in warm-up/cosine, or None."""
    if job.scheduler is not None:
        try:
            sched = job.scheduler(optimizer)
        except Exception as exc:
            raise ConfigError(f"fit(scheduler=...) raised {describe_error(exc)}; pass a callable "
                              f"optimizer -> LRScheduler") from None
        if not hasattr(sched, "step") or not hasattr(sched, "state_dict"):
            raise ConfigError(f"fit(scheduler=...) returned {type(sched).__name__}, not an LR scheduler; "
                              f"return e.g. torch.optim.lr_scheduler.StepLR(optimizer, 10)")
        return sched
    if cfg.lr_schedule == "constant" and cfg.warmup_steps == 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.warmup_steps, total_steps, cfg.lr_schedule == "cosine"))
