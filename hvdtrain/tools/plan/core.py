"""The plan as a function: options checked, inputs resolved, every strategy's rows, crossovers and
recommendations (the command line is cli.py; the formulas model.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from hvdtrain.errors import ConfigError
import hvdtrain.tools.plan.model as M
import hvdtrain.tools.plan.report as report
from hvdtrain.tools.plan.profile import DEFAULT_MEMCPY_GBPS, STRATEGY_IMPLS, LinkFlags, read_profile, strategy_links

__all__ = ["plan", "build", "Options", "Result"]

DEFAULT_NODES = (1, 2, 4, 8, 16)
DEFAULT_SWEEP = (100.0, 25.0, 10.0, 1.0, 0.2, 0.05)
OUT_JSON, OUT_PNG, OUT_MD = "plan.json", "plan.png", "plan.md"


@dataclass
class Options:
    """Every input of a plan, as the flags name them (None: not given)."""
    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    params: int | None = None
    samples_per_second: float | None = None
    batch_size: int = 64
    measure: bool = False
    input_shape: tuple[int, ...] | None = None
    threads: int = 1
    measure_steps: int = 5
    nodes: tuple[int, ...] = DEFAULT_NODES
    ranks_per_node: int = 1
    inter_gbit: float | None = None
    inter_latency_us: float | None = None
    intra_gbit: float | None = None
    intra_latency_us: float | None = None
    link_efficiency: float = 1.0
    profile: str | dict[str, Any] | None = None
    strategies: tuple[str, ...] = ("horovod", "ddp", "mpi")
    sync_every: tuple[int, ...] = (1, 16)
    hierarchy: tuple[int, int] | None = None
    outer_optimizer: str = "none"
    warmup_steps: int = 0
    steps: int = 1000
    sync_every_seconds: float = 0.0
    slow_rank_factor: float = 1.0
    fp16: bool = False
    fusion_mb: float = M.HOROVOD_FUSION_BYTES / M.MIB
    cycle_ms: float = M.HOROVOD_CYCLE_SECONDS * 1e3
    horovod_fusion: str = "bucket"
    memcpy_gbps: float | None = None
    sweep_gbit: tuple[float, ...] = DEFAULT_SWEEP
    compute: M.Compute | None = None       # given directly (notebooks, published, validate)
    shape: M.ModelShape | None = None


@dataclass
class Result:
    rows: list[dict[str, Any]]
    crossovers: list[dict[str, Any]]
    recommendations: list[dict[str, Any]]
    meta: dict[str, Any]


@dataclass(frozen=True)
class Variant:
    label: str
    base: str                 # the registry strategy whose links it uses
    synchronous: bool         # the same update as Horovod's (gradient averaging every step)
    predict: Callable[[M.ModelShape, M.Compute, M.Cluster, M.Settings], M.Prediction]


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_options(o: Options) -> None:
    """Every bad value is one ConfigError naming the flag, the value and a fix."""
    from hvdtrain.strategies.catalog import STRATEGIES
    check(bool(o.nodes) and all(isinstance(n, int) and n >= 1 for n in o.nodes),
           f"--nodes {','.join(map(str, o.nodes)) or repr('')} must list node counts >= 1; e.g. --nodes 1,2,4,8")
    check(isinstance(o.ranks_per_node, int) and o.ranks_per_node >= 1,
           f"--ranks-per-node {o.ranks_per_node} must be >= 1; e.g. --ranks-per-node 4")
    for flag, value in (("--inter-gbit", o.inter_gbit), ("--intra-gbit", o.intra_gbit),
                        ("--samples-per-second", o.samples_per_second), ("--memcpy-gbps", o.memcpy_gbps)):
        check(value is None or (finite(value) and value > 0),
               f"{flag} {value} must be a number > 0; e.g. {flag} 10")
    for flag, value in (("--inter-latency-us", o.inter_latency_us), ("--intra-latency-us", o.intra_latency_us)):
        check(value is None or (finite(value) and value >= 0),
               f"{flag} {value} must be a number >= 0; e.g. {flag} 25")
    check(finite(o.link_efficiency) and 0 < o.link_efficiency <= 1,
           f"--link-efficiency {o.link_efficiency} must be in (0, 1]; e.g. --link-efficiency 0.95")
    check(isinstance(o.batch_size, int) and o.batch_size >= 1,
           f"--batch-size {o.batch_size} must be >= 1; e.g. --batch-size 64")
    check(o.params is None or (isinstance(o.params, int) and o.params >= 1),
           f"--params {o.params} must be an integer >= 1; e.g. --params 25000000")
    multi = [n for n, e in STRATEGIES.items() if e.launcher != "python"]
    for s in o.strategies:
        check(s in multi, f"--strategies: {s!r} is not a multi-rank strategy of hvdtrain; use some of "
                           f"{', '.join(multi)}, e.g. --strategies {','.join(multi)}")
        check(s in STRATEGY_IMPLS,
               f"--strategies: {s!r} has no cost model yet; use some of {', '.join(STRATEGY_IMPLS)}")
    check(bool(o.strategies), f"--strategies is empty; use some of {', '.join(STRATEGY_IMPLS)}")
    check(bool(o.sync_every) and all(isinstance(k, int) and k >= 1 for k in o.sync_every),
           f"--sync-every {','.join(map(str, o.sync_every))} must list integers >= 1; e.g. --sync-every 1,16")
    if o.hierarchy is not None:
        h = tuple(o.hierarchy)
        check(len(h) == 2 and all(isinstance(k, int) and k >= 1 for k in h) and h[1] % h[0] == 0,
               f"--hierarchy {','.join(map(str, h))} must be K_LOCAL,K_GLOBAL with K_GLOBAL a multiple of "
               f"K_LOCAL; e.g. --hierarchy 4,16")
    check(o.outer_optimizer in ("none", "sgd", "nesterov"),
           f"--outer-optimizer {o.outer_optimizer!r} is unknown; use none, sgd or nesterov")
    check(isinstance(o.warmup_steps, int) and o.warmup_steps >= 0, f"--warmup-steps {o.warmup_steps} must be >= 0")
    check(isinstance(o.steps, int) and o.steps >= max(1, o.warmup_steps),
           f"--steps {o.steps} must be >= 1 and >= --warmup-steps {o.warmup_steps}; e.g. --steps 1000")
    check(finite(o.sync_every_seconds) and o.sync_every_seconds >= 0,
           f"--sync-every-seconds {o.sync_every_seconds} must be >= 0 (0: not time-based)")
    check(finite(o.slow_rank_factor) and o.slow_rank_factor >= 1,
           f"--slow-rank-factor {o.slow_rank_factor} must be >= 1 (1: no straggler); e.g. --slow-rank-factor 1.5")
    check(finite(o.fusion_mb) and o.fusion_mb >= 0, f"--fusion-mb {o.fusion_mb} must be >= 0 (0: no fusion)")
    check(finite(o.cycle_ms) and o.cycle_ms >= 0, f"--cycle-ms {o.cycle_ms} must be >= 0")
    check(o.horovod_fusion in ("bucket", "cycle"), f"--horovod-fusion {o.horovod_fusion!r}: use bucket or cycle")
    check(bool(o.sweep_gbit) and all(finite(g) and g > 0 for g in o.sweep_gbit),
           f"--sweep-gbit {','.join(map(str, o.sweep_gbit))} must list speeds > 0; e.g. --sweep-gbit 100,10,1,0.1")
    check(isinstance(o.threads, int) and o.threads >= 1, f"--threads {o.threads} must be >= 1")
    check(isinstance(o.measure_steps, int) and o.measure_steps >= 1, f"--measure-steps {o.measure_steps} must be >= 1")
    if o.input_shape is not None:
        check(all(isinstance(d, int) and d >= 1 for d in o.input_shape),
               f"--input-shape {','.join(map(str, o.input_shape))} must list sizes >= 1; e.g. --input-shape 3,224,224")


def variants(o: Options) -> list[Variant]:
    """The rows each node count gets, in table order."""
    out: list[Variant] = []
    for s in o.strategies:
        if s == "horovod":
            out.append(Variant("horovod", "horovod", True, lambda sh, c, cl, st: M.horovod(sh, c, cl, st)))
            if o.ranks_per_node > 1:
                out.append(Variant("horovod hier", "horovod", True,
                                   lambda sh, c, cl, st: M.horovod(sh, c, cl, st, hierarchical=True)))
        elif s == "ddp":
            out.append(Variant("ddp", "ddp", True, M.ddp))
        elif s == "mpi":
            for k in o.sync_every:
                out.append(Variant(f"mpi k={k}", "mpi", k == 1, lambda sh, c, cl, st, k=k: M.mpi(sh, c, cl, st, k)))
            if o.outer_optimizer != "none":
                for k in o.sync_every:
                    out.append(Variant(f"mpi outer k={k}", "mpi", False,
                                       lambda sh, c, cl, st, k=k: M.mpi(sh, c, cl, st, k, outer=True)))
            if o.warmup_steps > 0:
                for k in o.sync_every:
                    out.append(Variant(f"mpi k={k} warm-up {o.warmup_steps}", "mpi", k == 1,
                                       lambda sh, c, cl, st, k=k: M.mpi(sh, c, cl, st, k, warmup=o.warmup_steps,
                                                                        steps=o.steps)))
            if o.hierarchy is not None:
                kl, kg = o.hierarchy
                out.append(Variant(f"mpi hier {kl},{kg}", "mpi", False,
                                   lambda sh, c, cl, st: M.mpi_hierarchy(sh, c, cl, st, kl, kg)))
            if o.sync_every_seconds > 0:
                out.append(Variant(f"mpi T={o.sync_every_seconds:g}s", "mpi", False,
                                   lambda sh, c, cl, st: M.mpi_timed(sh, c, cl, st, o.sync_every_seconds)))
    return out


def settings_of(o: Options, memcpy_gbps: float) -> M.Settings:
    return M.Settings(memcpy_bytes_per_second=memcpy_gbps * 1e9, fusion_bytes=int(o.fusion_mb * M.MIB),
                      cycle_seconds=o.cycle_ms * 1e-3, fusion=o.horovod_fusion, fp16=o.fp16,
                      slow_rank_factor=o.slow_rank_factor)


def _profile(o: Options) -> dict[str, Any] | None:
    if o.profile is None or isinstance(o.profile, dict):
        return o.profile
    return read_profile(o.profile)


def resolve(o: Options) -> tuple[M.ModelShape, M.Compute, dict[str, Any] | None, float, dict[str, Any]]:
    """(model shape, one rank's compute, profile, memcpy GB/s, a record of where each came from)."""
    import hvdtrain.tools.plan.inputs as inputs
    profile = _profile(o)
    memcpy = o.memcpy_gbps or (profile or {}).get("memcpy_gbps") or DEFAULT_MEMCPY_GBPS
    src: dict[str, Any] = {"memcpy": "flag" if o.memcpy_gbps else "profile" if (profile or {}).get("memcpy_gbps")
                           else "default"}
    shape = o.shape or inputs.model_shape(o.model, o.model_args, o.params)
    if o.compute is not None:
        compute, src["compute"] = o.compute, {"how": "given"}
    elif o.measure:
        check(o.model is not None, "--measure needs --model (it runs the model here); or give --samples-per-second")
        compute, src["compute"] = inputs.measure_compute(o.model, o.model_args, o.batch_size, o.input_shape,
                                                         o.threads, o.measure_steps)
    elif o.samples_per_second is not None:
        optimizer = M.OPTIMIZER_PASSES * shape.nbytes / (memcpy * 1e9)
        compute = M.Compute.from_rate(o.samples_per_second, o.batch_size, optimizer)
        src["compute"] = {"how": "--samples-per-second", "samples_per_second": o.samples_per_second,
                          "batch_size": o.batch_size, "optimizer_s": compute.optimizer}
    elif profile and profile.get("compute"):
        c = profile["compute"]
        check(c.get("params") in (None, shape.params),
               f"the profile's compute was measured for {c.get('model')} ({c.get('params')} parameters), not this "
               f"model ({shape.params}); give --samples-per-second or --measure")
        compute = M.Compute(c["forward_s"], c["backward_s"], c["optimizer_s"], int(c["batch_size"]))
        src["compute"] = {"how": "profile", **c}
    else:
        raise ConfigError("no compute: give --samples-per-second R (one rank, no communication; with --batch-size), "
                          "or --measure (with --model), or a --profile calibrated with --model")
    return shape, compute, profile, float(memcpy), src


def evaluate(o: Options, shape: M.ModelShape, compute: M.Compute, profile: dict[str, Any] | None,
             memcpy_gbps: float, inter_gbit: float | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows for every variant and node count (at `inter_gbit` instead of the flag, if given)."""
    flags = LinkFlags(o.intra_gbit, o.intra_latency_us, inter_gbit if inter_gbit is not None else o.inter_gbit,
                      o.inter_latency_us, o.link_efficiency)
    base = settings_of(o, memcpy_gbps)
    rows, links = [], {}
    for n in o.nodes:
        for v in variants(o):
            sl = strategy_links(v.base, n, profile, flags, shape.nbytes * (0.5 if o.fp16 else 1.0))
            intra, inter = sl.intra, sl.inter
            links[v.base] = {"intra": {"source": sl.intra_source, "alpha_us": intra.alpha * 1e6, "gbit": intra.gbit},
                             "inter": {"source": sl.inter_source, "alpha_us": inter.alpha * 1e6, "gbit": inter.gbit}}
            st = replace(base, weighting_pass=sl.weighting_pass)
            cl = M.Cluster(n, o.ranks_per_node, intra, inter)
            p = v.predict(shape, compute, cl, st)
            rows.append({"strategy": v.label, "nodes": n, "ranks": cl.ranks, "ranks_per_node": o.ranks_per_node,
                         "step_seconds": p.step_seconds, "samples_per_second": p.samples_per_second,
                         "efficiency": M.efficiency(p, compute, cl.ranks),
                         "comm_fraction": p.exposed_comm_seconds / p.step_seconds if p.step_seconds > 0 else 0.0,
                         "inter_bytes_per_step": p.inter_bytes_per_step,
                         "exposed_comm_seconds": p.exposed_comm_seconds, "comm_seconds": p.comm_seconds,
                         "base": v.base, "synchronous": v.synchronous, "inter_gbit": inter.gbit})
    return rows, links


def build(options: Options | None = None, **kwargs: Any) -> Result:
    """The whole plan: rows, crossovers (node counts at the given links, and a link sweep),
    recommendations, and the inputs as meta."""
    o = replace(options or Options(), **kwargs)
    check_options(o)
    shape, compute, profile, memcpy, src = resolve(o)
    rows, links = evaluate(o, shape, compute, profile, memcpy)
    crossovers = report.node_crossovers(rows)
    if any(n > 1 for n in o.nodes) and "horovod" in o.strategies:
        crossovers += report.link_crossovers(lambda g: evaluate(o, shape, compute, profile, memcpy, g)[0],
                                             o.sweep_gbit)
    meta = {"model": shape.name, "params": shape.params, "param_bytes": shape.nbytes, "tensors": len(shape.sizes),
            "compute": {"forward_s": compute.forward, "backward_s": compute.backward,
                        "optimizer_s": compute.optimizer, "batch_size": compute.batch_size,
                        "samples_per_second_one_rank": compute.samples_per_second, **src.get("compute", {})},
            "memcpy_gbps": memcpy, "memcpy_source": src["memcpy"], "links": links,
            "ranks_per_node": o.ranks_per_node, "nodes": list(o.nodes),
            "profile": None if profile is None else {k: profile.get(k)
                                                     for k in ("date", "machine", "hosts", "shaping")},
            "settings": {"fusion_mb": o.fusion_mb, "cycle_ms": o.cycle_ms, "horovod_fusion": o.horovod_fusion,
                         "fp16": o.fp16, "sync_every": list(o.sync_every), "hierarchy": o.hierarchy,
                         "outer_optimizer": o.outer_optimizer, "warmup_steps": o.warmup_steps, "steps": o.steps,
                         "sync_every_seconds": o.sync_every_seconds, "slow_rank_factor": o.slow_rank_factor,
                         "link_efficiency": o.link_efficiency, "sweep_gbit": list(o.sweep_gbit)}}
    return Result(rows, crossovers, report.recommendations(rows), meta)


def plan(**kwargs: Any) -> list[dict[str, Any]]:
    """The rows of a plan (one dict per strategy and node count), for notebooks: keywords as the
    flags (`params=25_000_000, samples_per_second=200, nodes=(1, 2, 4)`); see Options."""
    if isinstance(kwargs.get("params"), float) and float(kwargs["params"]).is_integer():
        kwargs["params"] = int(kwargs["params"])
    for key in ("nodes", "sync_every", "sweep_gbit", "strategies", "input_shape", "hierarchy"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return build(**kwargs).rows
