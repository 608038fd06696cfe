"""Command line: `hvdtrain train|data|compare|bench|doctor` (also `python -m hvdtrain ...`).

Configuration is parsed and validated here, before any MPI call; errors are one line on
stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any, Callable

from hvdtrain.config import (BY_KWARG, SETTINGS, describe_rule, field_default, load_config,
                             overrides_from_kwargs, parse_json_object)
from hvdtrain.errors import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NUMERICAL, EXIT_PREEMPTED, EXIT_USAGE, EXIT_WRITE,
                             ConfigError, WriteError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"hvdtrain: error: {message}; see `{self.prog} --help`\n")
        sys.exit(EXIT_USAGE)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def json_arg(text: str) -> dict[str, Any]:
    """argparse type of a JSON-object flag (`--model-args '{"k": 1}'`): the object, or a usage error."""
    try:
        return parse_json_object(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "ints": _ints, "floats": _floats, "json": json_arg}


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per setting, generated from the config dataclasses (config.SETTINGS), grouped by
    TOML section; each help line ends with the TOML key and the default."""
    p.add_argument("--config", help="TOML file; command-line flags override it")
    defaults = _flat_defaults()
    groups: dict[str | None, Any] = {}
    for s in SETTINGS:
        if s.section not in groups:
            groups[s.section] = p.add_argument_group(f"[{s.section}]" if s.section else "run")
        key = f"{s.section}.{s.key}" if s.section else s.key
        applies = f"; applies to: {describe_rule(s.kwarg)}" if describe_rule(s.kwarg) else ""
        text = f"{s.help} (TOML {key}; default {defaults[key]!r}{applies})".replace("%", "%%")
        dest = s.flag[2:].replace("-", "_")
        if s.kind == "bool":
            groups[s.section].add_argument(s.flag, dest=dest, action="store_true", default=None, help=text)
        else:
            groups[s.section].add_argument(s.flag, dest=dest, type=_TYPES[s.kind], default=None, help=text)


def _flat_defaults() -> dict[str, Any]:
    """Each setting's default as its dataclass field declares it ('auto' stays 'auto')."""
    return {f"{s.section}.{s.key}" if s.section else s.key: field_default(s) for s in SETTINGS}


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    given = {s.kwarg: getattr(args, s.flag[2:].replace("-", "_")) for s in SETTINGS}
    return overrides_from_kwargs({k: v for k, v in given.items() if v is not None})


class _Raising(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}; see `hvdtrain train --help`")


def check_train_args(argv: list[str]) -> None:
    """Validate `hvdtrain train` arguments without running anything (ConfigError if bad)."""
    parser = _Raising(prog="hvdtrain train", add_help=False)
    add_train_flags(parser)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, overrides_from(args))
    from hvdtrain.plugins import is_spec, load_attr
    for flag, value in (("--model", cfg.model.name), ("--data", cfg.data.path), ("--loss", cfg.loss),
                        ("--optimizer", cfg.optim.name), ("--backend", cfg.sync.backend)):
        if is_spec(value):
            load_attr(value, flag)  # imports the plug-in: a missing module or name is found now


class StopFlag:
    """A clean stop on request: SIGTERM / SIGUSR1 (Slurm's --signal, a time limit, preemption) and
    SIGINT (Ctrl-C; mpirun turns it into SIGTERM for its ranks, see comm.env.MPIRUN) set a flag
    that the ranks vote on at the next metrics flush (--log-every): every rank stops at the same
    step, writes a checkpoint and exits 99 (EXIT_PREEMPTED) with one line, no traceback. A SIGINT
    after a stop was requested (a second Ctrl-C) stops this process at once: one line, exit 130
    (EXIT_INTERRUPTED), no new checkpoint (the last one stays; under a launcher the job ends with
    this rank)."""

    def __init__(self) -> None:
        self.requested = False
        self.pid = os.getpid()  # forked children (DataLoader workers) inherit the handler: they stay quiet
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested:
            if _layout_rank() == 0 and os.getpid() == self.pid:
                sys.stderr.write("hvdtrain: interrupted again; stopped at once, without a new checkpoint\n")
                sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


def _layout_rank() -> int:
    """This process's rank from the launcher's variables (0 when there are none, or they are bad)."""
    from hvdtrain.layout import detect_layout
    try:
        return detect_layout(os.environ).rank
    except ConfigError:
        return 0


def _fail(message: str, rank: int, size: int, abort: Callable[[int], None] | None, code: int) -> int:
    """One line on stderr; in a multi-rank job rank 0 speaks first and the job is ended."""
    if size > 1 and rank != 0:
        time.sleep(5.0)  # if rank 0 hit the same error its abort ends us before we repeat it
    prefix = f"hvdtrain: error (rank {rank}): " if size > 1 and rank != 0 else "hvdtrain: error: "
    sys.stderr.write(prefix + message + "\n")
    sys.stderr.flush()
    if abort is not None and size > 1:
        abort(code)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    stop = StopFlag()  # before torch is imported: from here on Ctrl-C is a clean stop
    try:
        cfg = load_config(args.config, overrides_from(args))  # before torch loads: a bad setting costs ~0.3 s
    except ConfigError as exc:
        return _fail(str(exc), 0, 1, None, EXIT_USAGE)
    from hvdtrain.strategies import make_strategy
    from hvdtrain.train import NumericalError, Preempted, train

    try:
        if cfg.sync.elastic:  # hvdtrain: checked before Horovod starts
            from hvdtrain.strategies.elastic import check_launcher
            check_launcher(os.environ)
        strategy = make_strategy(cfg)
    except ConfigError as exc:
        return _fail(str(exc), 0, 1, None, EXIT_USAGE)
    backend = strategy.comm
    try:
        summary = train(cfg, strategy, stop)
    except ConfigError as exc:  # raised on every rank together (train agrees on errors first)
        if backend.rank == 0:  # the rank now (Horovod elastic may renumber)
            sys.stderr.write(f"hvdtrain: error: {exc}\n")
        backend.shutdown()
        return EXIT_USAGE
    except NumericalError as exc:  # every rank raises it together
        if backend.rank == 0:  # the rank now (Horovod elastic may renumber)
            sys.stderr.write(f"hvdtrain: error: {exc}\n")
        backend.shutdown()
        return EXIT_NUMERICAL
    except Preempted as exc:
        if backend.rank == 0:  # the rank now (Horovod elastic may renumber)
            sys.stderr.write(f"hvdtrain: {exc}\n")
        backend.shutdown()
        return EXIT_PREEMPTED
    except WriteError as exc:  # raised on every rank together, or on rank 0 alone after the others finished
        if backend.rank == 0 or not exc.everywhere:
            sys.stderr.write(f"hvdtrain: error{f' (rank {backend.rank})' if backend.rank else ''}: {exc}\n")
        backend.shutdown()
        return EXIT_WRITE
    except BaseException:  # the user's code raised while training (or a bug): one traceback, one rank
        from hvdtrain.guard import end_job_after_error
        end_job_after_error(backend.rank, backend.size, backend.abort, EXIT_FAILED, cfg.collective_timeout)
        return EXIT_FAILED
    if summary is not None:
        tail = (f"eval_accuracy {summary['eval_accuracy']:.4f}" if "eval_accuracy" in summary
                else f"eval_loss {summary['eval_loss']:.5g}" if "eval_loss" in summary else "no eval data")
        final = "n/a (no steps left)" if summary["final_loss"] is None else f"{summary['final_loss']:.5g}"
        print(f"hvdtrain: {summary['backend']} x{summary['world_size']}: {summary['steps']} steps, "
              f"final_loss {final}, {tail}, {summary['samples_per_sec']:.0f} samples/s, "
              f"{summary['wall_seconds']:.2f} s; wrote {cfg.out}/summary.json")
    backend.shutdown()
    return 0


def cmd_data_make(args: argparse.Namespace) -> int:
    from hvdtrain.data import make_dataset
    try:
        if args.rows < 1 or args.seed < 0:
            bad = f"--rows {args.rows}" if args.rows < 1 else f"--seed {args.seed}"
            raise ConfigError(f"{bad} is out of range; use --rows >= 1 and --seed >= 0")
        folder = make_dataset(args.name, args.out, rows=args.rows, seed=args.seed, overwrite=args.overwrite)
    except ConfigError as exc:
        return _fail(str(exc), 0, 1, None, EXIT_USAGE)
    except OSError as exc:
        return _fail(f"cannot write {args.out!r} ({exc.strerror}); choose a writable --out", 0, 1, None,
                     EXIT_USAGE)
    print(f"hvdtrain: wrote {args.name} to {folder}")
    return 0


class _Version(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from hvdtrain.versions import report
        print(report())
        parser.exit()


def build_parser() -> Parser:
    parser = Parser(prog="hvdtrain", description="Data-parallel PyTorch training over MPI and Horovod.")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print hvdtrain's version and those of torch, Horovod, mpi4py and MPI")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = sub.add_parser("train", help="train a model on this rank's data block")
    add_train_flags(train)
    train.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="write built-in data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    make = data_sub.add_parser("make", help="write a built-in set to a folder")
    make.add_argument("name", help="regression or digits")
    make.add_argument("--rows", type=int, default=field_default(BY_KWARG["rows"]),
                      help="rows of the regression set (default: as [data] rows, %(default)s)")
    make.add_argument("--seed", type=int, default=field_default(BY_KWARG["seed"]),
                      help="seed of the generated data (default: as seed, %(default)s)")
    make.add_argument("--out", required=True)
    make.add_argument("--overwrite", action="store_true", help="replace an existing folder at --out")
    make.set_defaults(func=cmd_data_make)
    for name, (_, text) in FORWARDED.items():  # listed for --help; parsed by their own modules
        sub.add_parser(name, help=text)
    return parser


# Tools (hvdtrain/tools/, the layer above the CLI) by module name: the core never imports a tool.
FORWARDED = {
    "compare": ("hvdtrain.tools.compare", "run the same job under each strategy; report, JSON and plots"),
    "bench": ("hvdtrain.tools.bench", "benchmarks: bench allreduce, train, synthetic, convergence or fit"),
    "doctor": ("hvdtrain.tools.doctor", "check torch, Horovod, MPI and each launcher (a 2-rank allreduce)"),
    "plan": ("hvdtrain.tools.plan", "predict step time and scaling of every strategy on a cluster; --calibrate, --validate"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in FORWARDED:  # sub-commands with a parser of their own
            import importlib
            return int(importlib.import_module(FORWARDED[argv[0]][0]).main(argv[1:]))
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling is in place (`train`: StopFlag)
        sys.stderr.write("hvdtrain: interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
