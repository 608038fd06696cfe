"""`hvdtrain plan`'s command line: flags to Options (core.py), the printed report and the files."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from hvdtrain.errors import EXIT_USAGE, EXIT_WRITE, ConfigError, WriteError
from hvdtrain.tools.launch import MAX_RANKS_PER_CORE, ends_its_jobs, host_cores
import hvdtrain.tools.plan.model as M
import hvdtrain.tools.plan.report as report
from hvdtrain.tools.plan.validate import SECONDS_PER_RUN
from hvdtrain.tools.plan.core import (DEFAULT_NODES, DEFAULT_SWEEP, OUT_JSON, OUT_MD, OUT_PNG, Options, Result,
                                      build, check, check_options)

DESCRIPTION = ("Predict one training step, samples/s and scaling of every strategy on a cluster, from an "
               "alpha-beta(-gamma) model of its collectives and their overlap (hvdtrain/tools/plan/model.py).")


def _list(kind: type, name: str) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(float(x)) if kind is int and "e" in x.lower() else kind(x)
                         for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {name}") from None
    return parse


def _count(text: str) -> int:
    """An integer that may be written 25e6."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    from hvdtrain.cli import Parser, json_arg
    p = Parser(prog="hvdtrain plan", description=DESCRIPTION,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and compute")
    g.add_argument("--model", help="MODULE:ATTR (or mlp, net) whose trainable parameters are counted")
    g.add_argument("--model-args", type=json_arg, default={}, help="JSON object of keyword arguments for --model")
    g.add_argument("--params", type=_count, help="parameter count instead of --model (e.g. 25e6)")
    g.add_argument("--samples-per-second", type=float, help="one rank's samples/s without communication")
    g.add_argument("--batch-size", type=int, default=64, help="samples per rank per step (default 64)")
    g.add_argument("--measure", action="store_true", help="time forward, backward and an SGD step of --model here")
    g.add_argument("--input-shape", type=_list(int, "integers"),
                   help="one sample's shape for --measure (e.g. 3,224,224)")
    g.add_argument("--threads", type=int, default=1, help="torch threads for --measure (one rank's share of cores)")
    g.add_argument("--measure-steps", type=int, default=5, help="timed iterations of --measure")
    g = p.add_argument_group("cluster")
    g.add_argument("--nodes", type=_list(int, "integers"), default=DEFAULT_NODES,
                   help="node counts (default 1,2,4,8,16)")
    g.add_argument("--ranks-per-node", type=int, default=1, help="ranks (GPUs, or CPU ranks) per node (default 1)")
    g.add_argument("--inter-gbit", type=float, help="inter-node link Gbit/s per node (default 10, or the profile)")
    g.add_argument("--inter-latency-us", type=float, help="inter-node latency per message step (default 25 us)")
    g.add_argument("--intra-gbit", type=float, help="intra-node Gbit/s per rank (default 40, or the profile)")
    g.add_argument("--intra-latency-us", type=float, help="intra-node latency per message step (default 2 us)")
    g.add_argument("--link-efficiency", type=float, default=1.0,
                   help="share of a link flag's line rate that carries payload, applied to every link flag (default 1)")
    g.add_argument("--memcpy-gbps", type=float, help="memory copy GB/s of the passes (default: profile, or 10)")
    g.add_argument("--profile", help="profile JSON written by --calibrate; flags override (see profile.py)")
    g = p.add_argument_group("strategies")
    g.add_argument("--strategies", type=_list(str, "names"), default=("horovod", "ddp", "mpi"),
                   help="registry strategies to plan (default horovod,ddp,mpi)")
    g.add_argument("--sync-every", type=_list(int, "integers"), default=(1, 16),
                   help="MPI fallback k values (default 1,16)")
    g.add_argument("--hierarchy", type=_list(int, "integers"),
                   help="K_LOCAL,K_GLOBAL: add the hierarchical MPI fallback")
    g.add_argument("--outer-optimizer", default="none", help="sgd or nesterov: add outer-optimizer rows")
    g.add_argument("--warmup-steps", type=int, default=0, help="add rows with W steps of gradient averaging first")
    g.add_argument("--steps", type=int, default=1000, help="steps of the run the warm-up is part of")
    g.add_argument("--sync-every-seconds", type=float, default=0.0, help="add the time-based MPI fallback row")
    g.add_argument("--slow-rank-factor", type=float, default=1.0, help="one rank this many times slower (straggler)")
    g.add_argument("--fp16", action="store_true", help="Horovod fp16 compression (half the bytes)")
    g.add_argument("--fusion-mb", type=float, default=M.HOROVOD_FUSION_BYTES / M.MIB,
                   help="HOROVOD_FUSION_THRESHOLD in MiB (0.28.1 default: 128)")
    g.add_argument("--cycle-ms", type=float, default=M.HOROVOD_CYCLE_SECONDS * 1e3,
                   help="HOROVOD_CYCLE_TIME (default 1)")
    g.add_argument("--horovod-fusion", default="bucket", help="bucket (default) or cycle: see model.py")
    g = p.add_argument_group("output")
    g.add_argument("--sweep-gbit", type=_list(float, "numbers"), default=DEFAULT_SWEEP,
                   help="inter-node speeds for the link crossovers (default 100,25,10,1,0.2,0.05)")
    g.add_argument("--json", help="write the rows, crossovers and recommendations here")
    g.add_argument("--out", help=f"folder for {OUT_JSON}, {OUT_PNG} (efficiency vs ranks) and {OUT_MD}")
    g.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    g = p.add_argument_group("modes")
    g.add_argument("--calibrate", action="store_true",
                   help="run bench allreduce here (and across --hosts) and write a profile (--profile-out)")
    g.add_argument("--hosts", help="H1,H2,...: the hosts of --calibrate (one rank each) and --validate")
    g.add_argument("--profile-out", default="plan-profile.json",
                   help="where --calibrate writes (default plan-profile.json)")
    g.add_argument("--calibrate-np", type=int, default=2, help="ranks of the intra-node calibration (default 2)")
    g.add_argument("--calibrate-max-bytes", type=_count, default=64 << 20, help="largest size calibrated (64 MiB)")
    g.add_argument("--timeout", type=float, default=900, help="seconds per launched job (calibrate, validate)")
    g.add_argument("--published", action="store_true", help="check the model against Horovod's 512-GPU benchmark")
    g.add_argument("--validate", action="store_true", help="run the validation grid and compare (see validate.py)")
    g.add_argument("--tiny", action="store_true", help="--validate: a few configs and steps (CI)")
    g.add_argument("--repeats", type=int, default=3, help="--validate: interleaved repeats per config (default 3)")
    g.add_argument("--seconds-per-run", type=float, default=SECONDS_PER_RUN,
                   help="--validate: seconds of training per run, by the prediction (default %(default)s)")
    return p


OPTION_FLAGS = [f.name for f in Options.__dataclass_fields__.values() if f.name not in ("profile", "compute", "shape")]


def options_from(args: argparse.Namespace) -> Options:
    given = {name: getattr(args, name) for name in OPTION_FLAGS if hasattr(args, name)}
    given = {k: v for k, v in given.items() if v is not None}
    if args.hierarchy is not None:
        given["hierarchy"] = tuple(args.hierarchy)
    return Options(**given, profile=args.profile)


def print_result(r: Result, markdown: bool = False) -> None:
    m = r.meta
    c = m["compute"]
    print(f"[plan] {m['model']}: {m['params']:,} parameters ({m['param_bytes'] / 1e6:.4g} MB); one rank "
          f"{c['samples_per_second_one_rank']:.4g} samples/s at batch {c['batch_size']} (forward "
          f"{c['forward_s'] * 1e3:.3g} ms, backward {c['backward_s'] * 1e3:.3g} ms, optimizer "
          f"{c['optimizer_s'] * 1e3:.3g} ms; {c.get('how')})")
    for base, link in m["links"].items():
        print(f"[plan] {base}: intra {link['intra']['gbit']:.4g} Gbit/s {link['intra']['alpha_us']:.3g} us "
              f"({link['intra']['source']}), inter {link['inter']['gbit']:.4g} Gbit/s "
              f"{link['inter']['alpha_us']:.3g} us ({link['inter']['source']}); {m['ranks_per_node']} rank(s) per node")
    print(report.format_table(r.rows, markdown))
    top = max(m["nodes"])
    lines = report.crossover_lines([c for c in r.crossovers if c["kind"] == "nodes" or c["nodes"] == top])
    if lines:
        print(f"\ncrossovers against horovod in samples/s (node counts at these links; link speeds at {top} "
              f"nodes, all node counts in the JSON; speed only: convergence per sample is `hvdtrain bench "
              f"convergence`'s job):")
        for line in lines:
            print(f"  {line}")
    print("\nrecommendations:")
    for rec in r.recommendations:
        print(f"  {rec['text']}")


def write_outputs(r: Result, args: argparse.Namespace) -> list[str]:
    written = []
    if args.json:
        report.write_json(args.json, r.meta, r.rows, r.crossovers, r.recommendations)
        written.append(args.json)
    if args.out:
        out = Path(args.out)
        report.write_json(out / OUT_JSON, r.meta, r.rows, r.crossovers, r.recommendations)
        links = r.meta["links"].get("horovod") or next(iter(r.meta["links"].values()))
        title = (f"{r.meta['model']} ({r.meta['params'] / 1e6:.3g}M params), batch "
                 f"{r.meta['compute']['batch_size']}/rank, {r.meta['ranks_per_node']} rank(s)/node, inter "
                 f"{links['inter']['gbit']:.3g} Gbit/s")
        report.plot_efficiency(r.rows, out / OUT_PNG, title)
        md = [report.format_table(r.rows, markdown=True), "", *[f"- {x}" for x in report.crossover_lines(r.crossovers)],
              "", *[f"- {rec['text']}" for rec in r.recommendations]]
        report.write_file(out / OUT_MD, "\n".join(md) + "\n")
        written += [str(out / OUT_JSON), str(out / OUT_PNG), str(out / OUT_MD)]
    return written


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"hvdtrain: error: {message}\n")
    return code


@ends_its_jobs("hvdtrain plan")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.published:
            import hvdtrain.tools.plan.published as published
            return published.main_published(args)
        if args.calibrate:
            return _calibrate(args)
        if args.validate:
            import hvdtrain.tools.plan.validate as V
            return V.main_validate(args)
        result = build(options_from(args))
        print_result(result, args.markdown)
        for path in write_outputs(result, args):
            print(f"[plan] wrote {path}")
        return 0
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except WriteError as exc:
        return _fail(str(exc), EXIT_WRITE)
    except RuntimeError as exc:  # a launched job failed (calibrate, validate)
        return _fail(str(exc), 1)


def _calibrate(args: argparse.Namespace) -> int:
    import hvdtrain.tools.plan.inputs as inputs
    import hvdtrain.tools.plan.profile as P
    check(args.calibrate_np >= 2, f"--calibrate-np {args.calibrate_np} must be >= 2 (an allreduce needs two ranks)")
    check(args.calibrate_max_bytes >= 4, f"--calibrate-max-bytes {args.calibrate_max_bytes} must be >= 4")
    check(args.timeout > 0, f"--timeout {args.timeout} must be > 0")
    most = MAX_RANKS_PER_CORE * host_cores()  # refused before launching, as every launching command does
    check(args.calibrate_np <= most, f"--calibrate-np {args.calibrate_np} is more than {MAX_RANKS_PER_CORE} ranks per "
                                     f"core of this host's {host_cores()}; use --calibrate-np <= {most}")
    if args.hosts:
        P.one_per_host(args.hosts)  # a bad --hosts is one line before anything runs
    o = options_from(args)
    if args.model:
        check_options(o)
    out = Path(args.profile_out).with_suffix("").with_name(Path(args.profile_out).stem + "-bench")
    prof = P.calibrate(out, args.calibrate_np, args.hosts, args.calibrate_max_bytes, timeout=args.timeout)
    if args.model:
        shape = inputs.model_shape(args.model, args.model_args)
        compute, record = inputs.measure_compute(args.model, args.model_args, args.batch_size, args.input_shape,
                                                 args.threads, args.measure_steps)
        prof["compute"] = {**record, "params": shape.params}
    P.write_profile(prof, args.profile_out)
    for kind in ("intra", "inter"):
        for impl, fit in prof["links"][kind].items():
            print(f"[plan] {kind} {impl}: {fit['gbit']:.4g} Gbit/s, {fit['alpha_us']:.3g} us per step "
                  f"(np {fit['np']}, {fit['points']} sizes, worst fit error {100 * fit['max_rel_error']:.0f}%)")
    print(f"[plan] memcpy {prof['memcpy_gbps']} GB/s; wrote {args.profile_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
