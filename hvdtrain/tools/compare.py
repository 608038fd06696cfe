"""`hvdtrain compare`: the same job under each strategy, side by side.

It writes the data once, launches each run itself (horovodrun for Horovod, mpirun for the MPI
fallback), then collects every run's summary.json into compare.json, report.md and a table. With
`--hosts H1:slots,H2:slots` every run is launched across those hosts (mpirun --host,
horovodrun -H), so the strategies are compared over a network; the --out folder (the data
set and the runs; a --data folder too) must then be on a file system every host sees at the
same path.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hvdtrain import data as D
from hvdtrain.tools import tables
from hvdtrain.cli import check_train_args
from hvdtrain.config import BY_KWARG, MPI_ALLREDUCES, field_default
from hvdtrain.errors import EXIT_WRITE, ConfigError, WriteError
from hvdtrain.plugins import is_spec
from hvdtrain.checkpoint import atomic_write_text
from hvdtrain.tools.launch import (check_capacity, check_horovod, ends_its_jobs, horovodrun_cmd, launcher_env, mpirun_cmd,
                                   parse_hosts, run)
from hvdtrain.strategies import Variant as Strategy, variants


def strategies(sync_every: list[int], alpha: float, allreduce: str) -> list[Strategy]:
    """The registry's strategies (hvdtrain.strategies.variants), the MPI fallback at each k."""
    out = variants(sync_every, {"mpi": ["--alpha", str(alpha), "--mpi-allreduce", allreduce]})
    return [s._replace(label=s.label + f" a={alpha:g}") if alpha != 1 and "--alpha" in s.flags else s
            for s in out]


def _slug(label: str) -> str:
    return label.replace(" ", "_").replace("=", "")


def run_strategy(s: Strategy, np: int, out: Path, train_args: list[str], timeout: float,
                 hosts: str | None = None) -> dict[str, Any]:
    run_dir = out / "runs" / _slug(s.label)
    argv = ["hvdtrain", "train", *train_args, *s.flags, "--out", str(run_dir), "--overwrite"]
    cmd = (horovodrun_cmd(np, argv, hosts=hosts) if s.launcher == "horovodrun"
           else mpirun_cmd(np, argv, hosts=hosts))
    print(f"$ {' '.join(cmd)}", flush=True)
    result = run(cmd, timeout=timeout, env=launcher_env(np=np, hosts=hosts))
    atomic_write_text(result.stdout, out / "logs" / f"{_slug(s.label)}.log")
    if result.returncode != 0:
        tail = result.stdout.strip().splitlines()[-5:]
        raise RuntimeError(f"{s.label} exited {result.returncode}: " + " | ".join(tail))
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {"label": s.label, "command": cmd, "summary": summary, "metrics": steps}


COLUMNS = [("strategy", "label", "{}"), ("final loss", "final_loss", "{:.5g}"),
           ("eval", "eval", "{}"), ("wall s", "wall_seconds", "{:.2f}"),
           ("samples/s", "samples_per_sec", "{:.0f}"), ("MB sent/rank", "mb", "{:.2f}"),
           ("comm %", "comm_pct", "{:.1f}")]


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        s = r["summary"]
        rows.append({**s, "label": r["label"], "mb": s["bytes_communicated"] / 1e6,
                     "comm_pct": None if s["comm_seconds"] is None  # not measured (DDP): n/a, not 0
                     else 100 * s["comm_seconds"] / max(s["train_seconds"], 1e-9),
                     "eval": (f"acc {s['eval_accuracy']:.4f}" if "eval_accuracy" in s
                              else f"loss {s['eval_loss']:.5g}" if "eval_loss" in s else None)})
    return rows


def format_table(results: list[dict[str, Any]], markdown: bool = False) -> str:
    return tables.format_table(COLUMNS, table_rows(results), markdown)


def build_parser() -> argparse.ArgumentParser:
    from hvdtrain.cli import Parser
    p = Parser(prog="hvdtrain compare", description=__doc__)
    p.add_argument("--np", type=int, default=2, help="ranks per run")
    p.add_argument("--out", default="runs/compare", help="report folder")
    p.add_argument("--data", default="regression", help="built-in set or data folder")
    p.add_argument("--rows", type=int, default=field_default(BY_KWARG["rows"]),
                   help="rows of a built-in set (default: as [data] rows, %(default)s)")
    p.add_argument("--seed", type=int, default=field_default(BY_KWARG["seed"]),
                   help="seed of the data and every run (default: as seed, %(default)s)")
    p.add_argument("--sync-every", default="1,4,16", help="MPI fallback k values, comma-separated")
    p.add_argument("--alpha", type=float, default=field_default(BY_KWARG["alpha"]))
    p.add_argument("--mpi-allreduce", default=field_default(BY_KWARG["mpi_allreduce"]), choices=MPI_ALLREDUCES)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--hosts", default=None,
                   help="run across hosts H1:slots,H2:slots (mpirun --host, horovodrun -H); default: "
                        "this host. --out must be on a file system all hosts see at the same path")
    p.add_argument("--oversubscribe", action="store_true",
                   help="run more than 8 ranks per core on a host anyway (refused otherwise)")
    return p


@ends_its_jobs("hvdtrain compare")
def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except WriteError as exc:  # a log, compare.json, report.md or a plot: one line, no traceback
        sys.stderr.write(f"hvdtrain: error: {exc}\n")
        return EXIT_WRITE


def _main(argv: list[str]) -> int:
    args, train_args = build_parser().parse_known_args(argv)
    if args.np < 1 or args.rows < 1 or args.seed < 0:
        bad = "--np" if args.np < 1 else "--rows" if args.rows < 1 else "--seed"
        sys.stderr.write(f"hvdtrain: error: {bad} must be >= {0 if bad == '--seed' else 1}, got "
                         f"{getattr(args, bad[2:])}; e.g. --np 2 --rows 100000 --seed 0\n")
        return 2
    try:
        ks = [int(k) for k in args.sync_every.split(",") if k.strip()]
        if not ks or min(ks) < 1:
            raise ValueError
    except ValueError:
        sys.stderr.write(f"hvdtrain: error: --sync-every {args.sync_every!r} must be integers like 1,4,16\n")
        return 2
    try:
        hosts = None if args.hosts is None else parse_hosts(args.hosts, args.np)
        check_capacity(args.np, hosts, args.oversubscribe)
        if any(s.launcher == "horovodrun" for s in strategies(ks, args.alpha, args.mpi_allreduce)):
            check_horovod()
    except ValueError as exc:
        sys.stderr.write(f"hvdtrain: error: {exc}\n")
        return 2
    out = Path(args.out).resolve()  # ranks (on other hosts too) get absolute paths
    runs = strategies(ks, args.alpha, args.mpi_allreduce)
    try:  # every run's settings, validated here before anything is launched or written
        for s in runs:
            check_train_args(["--data", args.data, "--rows", str(args.rows), "--seed", str(args.seed),
                              *train_args, *s.flags, "--out", str(out)])
        if args.data not in D.BUILTINS and not is_spec(args.data):
            D.describe(args.data)
    except ConfigError as exc:
        sys.stderr.write(f"hvdtrain: error: {exc}\n")
        return 2
    folder: Path | str = args.data
    if args.data in D.BUILTINS:
        folder = D.builtin_folder(out, args.data, args.rows, args.seed)
        if not (folder / "meta.json").is_file():
            D.make_dataset(args.data, folder, rows=args.rows, seed=args.seed)
    elif not is_spec(args.data):
        folder = Path(args.data).resolve()
    common = ["--data", str(folder), "--seed", str(args.seed), *train_args]
    results = []
    for s in runs:
        try:
            results.append(run_strategy(s, args.np, out, common, args.timeout, hosts))
        except RuntimeError as exc:
            sys.stderr.write(f"hvdtrain: error: run {exc}; see {out}/logs\n")
            return 1
    where = f"on {hosts}" if hosts else "on this host"
    title = f"hvdtrain compare: {args.np} ranks {where}, data {Path(str(folder)).name}, seed {args.seed}"
    table = format_table(results)
    print(f"\n{title}\n{table}")
    atomic_write_text(json.dumps({"np": args.np, "hosts": hosts or "local", "data": str(folder),
                                  "train_args": common,
                                  "runs": [{k: r[k] for k in ("label", "command", "summary")} for r in results]},
                                 indent=2) + "\n", out / "compare.json")
    report = [f"# {title}", "", format_table(results, markdown=True), ""]
    try:
        from hvdtrain.tools.plots import compare_plots
        report += [f"![{name}]({name})" for name in compare_plots(results, out, title)]
    except ImportError:
        pass
    atomic_write_text("\n".join(report) + "\n", out / "report.md")
    print(f"\nwrote {out}/report.md, {out}/compare.json")
    return 0
