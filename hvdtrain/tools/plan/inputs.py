"""The model and compute inputs of `hvdtrain plan`: counted or measured here, or given as flags.

- `--model MODULE:ATTR [--model-args JSON]` (or the built-in `mlp` / `net`, as hvdtrain.models'
  classes with their constructor arguments in --model-args): the model is built once on the CPU
  (hvdtrain's plug-in loader, so a bad spec is one line) and its trainable parameters counted, one
  tensor at a time in `model.parameters()` order; backward produces their gradients in the
  reverse order (autograd runs the graph from the loss back), which is the order the overlap
  model fills buckets in. `--params N` instead: N elements split into PARAMS_TENSORS equal tensors,
  so fusion and buckets see a model of ordinary layers.
- compute: `--samples-per-second R --batch-size B` (one rank, no communication), or `--measure`:
  forward, backward and optimizer step timed here separately (SGD, random inputs, the mean of the
  squared outputs as loss: any model), median of `steps` timed iterations after 2 warm-up ones,
  with `threads` torch threads (the thread count one rank gets: cores // ranks per node).

torch is imported inside the functions that need it: `hvdtrain plan --params N` never loads it.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

from hvdtrain.errors import ConfigError
from hvdtrain.tools.plan.model import Compute, ModelShape

BUILTIN_MODELS = {"mlp": "hvdtrain.models:MLP", "net": "hvdtrain.models:Net"}
"""Built-in model names --model takes, as the MODULE:ATTR of their classes (arguments: --model-args)."""
PARAMS_TENSORS = 16
"""`--params N` is modelled as this many equal tensors."""


def model_spec(name: str) -> str:
    return BUILTIN_MODELS.get(name, name)


def build_model(name: str, args: dict[str, Any] | None = None) -> Any:
    """The user's model, built on the CPU: ConfigError (one line) if it cannot be."""
    from hvdtrain.plugins import call_plugin, is_spec, load_attr
    spec = model_spec(name)
    if not is_spec(spec):
        raise ConfigError(f"--model {name!r} is neither MODULE:ATTR nor a built-in ({', '.join(BUILTIN_MODELS)}); "
                          f"write e.g. --model mypkg.models:Net, or give --params N")
    factory = load_attr(spec, "--model")
    model = call_plugin(spec, "--model", factory, **(args or {}))
    import torch
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"--model {name} returned {type(model).__name__}, not a torch.nn.Module; return a model")
    return model


def shape_of(model: Any, name: str = "model") -> ModelShape:
    """Trainable parameter tensors in parameters() order; bytes per element of the first one."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"--model {name} has no trainable parameters; nothing to synchronise")
    return ModelShape(tuple(int(p.numel()) for p in params), int(params[0].element_size()), name)


def shape_from_params(params: int, element_bytes: int = 4) -> ModelShape:
    if params < 1:
        raise ConfigError(f"--params {params} must be >= 1; e.g. --params 25000000")
    base, extra = divmod(params, PARAMS_TENSORS)
    sizes = tuple(base + (1 if i < extra else 0) for i in range(PARAMS_TENSORS))
    return ModelShape(tuple(s for s in sizes if s > 0), element_bytes, "--params model")


def model_shape(model: str | None = None, model_args: dict[str, Any] | None = None,
                params: int | None = None) -> ModelShape:
    """The model's parameter tensors from --model (counted) or --params."""
    if model is not None and params is not None:
        raise ConfigError("give --model or --params, not both")
    if model is not None:
        return shape_of(build_model(model, model_args), model)
    if params is not None:
        return shape_from_params(params)
    raise ConfigError("no model: give --model MODULE:ATTR [--model-args JSON] or --params N")


def input_for(model: Any, batch_size: int, input_shape: Sequence[int] | None) -> Any:
    """A random batch the model takes: `input_shape` per sample, or the first Linear's width."""
    import torch
    if input_shape:
        return torch.randn(batch_size, *input_shape)
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
    first_any = next((m for m in model.modules() if len(list(m.children())) == 0
                      and list(m.parameters(recurse=False))), None)
    if first is not None and first is first_any:
        return torch.randn(batch_size, first.in_features)
    raise ConfigError("--measure cannot tell the model's input shape; give --input-shape, e.g. "
                      "--input-shape 3,224,224 (one sample, without the batch)")


def measure_compute(model: str, model_args: dict[str, Any] | None, batch_size: int,
                    input_shape: Sequence[int] | None = None, threads: int = 1,
                    steps: int = 5) -> tuple[Compute, dict[str, Any]]:
    """Forward, backward and SGD step of one rank here, each timed (median of `steps`)."""
    import torch
    if batch_size < 1 or steps < 1 or threads < 1:
        raise ConfigError(f"--measure needs --batch-size, --measure-steps and --threads >= 1, got "
                          f"{batch_size}, {steps}, {threads}")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_model(model, model_args)
    net.train()
    x = input_for(net, batch_size, input_shape)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-6)
    times: list[tuple[float, float, float]] = []
    try:
        for i in range(steps + 2):
            optimizer.zero_grad(set_to_none=False)
            t0 = time.perf_counter()
            out = net(x)
            loss = out.float().pow(2).mean() if torch.is_tensor(out) else sum(o.float().pow(2).mean() for o in out)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            t3 = time.perf_counter()
            if i >= 2:
                times.append((t1 - t0, t2 - t1, t3 - t2))
    except ConfigError:
        raise
    except Exception as exc:  # the user's model on a random batch
        from hvdtrain.plugins import describe_error
        raise ConfigError(f"--measure: running --model {model} on a random batch of {tuple(x.shape)} raised "
                          f"{describe_error(exc)}; give --input-shape, or --samples-per-second instead") from None
    fwd, bwd, opt = (statistics.median(t[i] for t in times) for i in range(3))
    compute = Compute(fwd, bwd, opt, batch_size)
    record = {"how": "measured", "model": model, "model_args": model_args or {}, "batch_size": batch_size,
              "threads": threads, "steps": steps, "forward_s": fwd, "backward_s": bwd, "optimizer_s": opt,
              "samples_per_second": compute.samples_per_second, "input_shape": list(x.shape[1:])}
    return compute, record
