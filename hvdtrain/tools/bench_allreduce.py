"""`hvdtrain bench allreduce --np N --out DIR`: float32 SUM allreduce in place, nccl-tests style.

The driver is a plain process (no rank): it starts one job per implementation with mpirun or
horovodrun (each under a timeout, so a hung job costs a row, never the run), every job's
rank 0 appends its rows to DIR/allreduce.rows.jsonl, then the driver writes
DIR/allreduce.json, prints a table and plots DIR/allreduce.png.

How a size is timed: warm-up calls, then per iteration a barrier, a timer around the call,
and the slowest rank's time for that iteration (the collective is done when the last rank
is); p50 over iterations. algbw = bytes / p50; busbw = algbw * 2(N-1)/N, the bytes each rank
moves in a ring allreduce, so it compares with the link or memory bandwidth whatever N is.
memcpy runs on one rank and reports busbw = algbw (a copy moves each byte once).

Repeats (`--repeat R`, R >= 5 for an interval worth reading): whole jobs of every implementation,
interleaved (impl1, impl2, ..., impl1, impl2, ...; hvdtrain.tools.stats), so a slow phase of a
shared machine hits every implementation alike. A row's p50 is the median of its runs' p50s;
every row but raw MPI's also gets `vs_raw`, its busbw over raw MPI's at the same size, as the
median over the R pairs (run i of both) with a 95% bootstrap interval (`vs_raw_interval`).
Raw MPI means `mpi4py` under the same rank environment: `mpi4py-tuned` for the implementations
hvdtrain configures (HVDTRAIN_CONFIGURED), plain `mpi4py` for the others (and for mpi4py-tuned
itself, which then shows what the settings buy).

Across hosts: `--hosts H1:slots,H2:slots` starts every MPI and Horovod job there (mpirun
--host, horovodrun -H; memcpy stays on this host), the --out folder must be visible to every
host at the same path, and the JSON meta records the hosts, `--label` and, on the local
cluster (HVDTRAIN_CLUSTER_DIR set by mpi_jobs/cluster_local.sh), each host's link shaping
as `tc` shows it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from hvdtrain.comm.env import job_env_defaults
from hvdtrain.tools import tables
from hvdtrain.tools.stats import format_ratio, interleaved_order, median, paired, ratio_summary
from hvdtrain.tools.allreduce_impls import (DEFAULT_IMPLS, HVDTRAIN_CONFIGURED, IMPLS, BenchGroup,
                                              horovod_env_defaults, open_impl)
from hvdtrain.tools.launch import (TIMEOUT_EXIT, check_capacity, ends_its_jobs, horovodrun_cmd, host_args,
                                   launcher_env, parse_hosts, run)
from hvdtrain.tools.machine import cpu_model, mpirun_version
from hvdtrain.versions import package

ROWS_FILE, JSON_FILE, PNG_FILE = "allreduce.rows.jsonl", "allreduce.json", "allreduce.png"


def byte_sizes(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    """min_bytes, min_bytes*factor, ... up to max_bytes (default: 4 B to 256 MiB, powers of 4)."""
    if min_bytes < 4 or max_bytes < min_bytes or factor < 2:
        raise ValueError(f"need 4 <= --min-bytes <= --max-bytes and --factor >= 2, got "
                         f"{min_bytes}, {max_bytes}, {factor}")
    sizes = [min_bytes]
    while sizes[-1] * factor <= max_bytes:
        sizes.append(sizes[-1] * factor)
    return sizes


def iterations(nbytes: int, iters: int, warmup: int) -> tuple[int, int]:
    """(warm-up, timed) iterations: `iters` for small sizes, fewer (>= 10) for big ones so a
    256 MiB point takes seconds, not minutes; `--iters` below 10 is taken as given (CI)."""
    timed = min(iters, max(10, (1 << 30) // nbytes))
    return min(warmup, timed), timed


def bus_factor(impl: str, size: int) -> float:
    return 1.0 if impl == "memcpy" else 2.0 * (size - 1) / size


def make_row(impl: str, size: int, nbytes: int, seconds: float) -> dict[str, Any]:
    algbw = nbytes / seconds / 1e9
    factor = bus_factor(impl, size)
    return {"impl": impl, "np": size, "bytes": nbytes, "p50_us": seconds * 1e6,
            "algbw_gbps": algbw, "busbw_gbps": algbw * factor, "bus_factor": factor}


def run_worker(args: argparse.Namespace) -> int:
    """Inside every rank of one job: time each size, rank 0 appends the rows."""
    import torch
    torch.set_num_threads(1)  # one compute thread per rank: ranks share the cores
    group = open_group(args)
    for nbytes in byte_sizes(args.min_bytes, args.max_bytes, args.factor):
        op = group.make_allreduce(nbytes)
        warm, timed = iterations(nbytes, args.iters, args.warmup)
        for _ in range(warm):
            op()
        times = np.empty(timed)
        for i in range(timed):
            group.barrier()
            start = time.perf_counter()
            op()
            times[i] = time.perf_counter() - start
        slowest = group.max_over_ranks(times)
        if group.rank == 0:
            row = {**make_row(args.worker, group.size, nbytes, median(slowest)), "repeat": args.repeat_index}
            if getattr(op, "path", None):  # the code path that ran (hvdtrain-mpi: auto's choice)
                row["path"] = op.path
            with open(args.rows, "a") as f:
                f.write(json.dumps(row) + "\n")
        del op
    group.barrier()
    group.close()
    return 0


def open_group(args: argparse.Namespace) -> BenchGroup:
    """open_impl, except that across hosts torch-gloo meets at rank 0's host (the first of
    --hosts, mpirun fills hosts in order): allreduce_impls has it rendezvous at 127.0.0.1."""
    if args.worker != "torch-gloo" or not args.master_addr:
        return open_impl(args.worker, chunk_bytes=args.chunk_bytes, port=args.port)
    import torch.distributed as dist
    init = dist.init_process_group

    def at_rank0(backend: str, init_method: str, **kwargs: Any) -> None:
        init(backend, init_method=init_method.replace("//127.0.0.1:", f"//{args.master_addr}:"), **kwargs)

    with mock.patch.object(dist, "init_process_group", at_rank0):
        return open_impl(args.worker, chunk_bytes=args.chunk_bytes, port=args.port)


def launch_command(impl: str, args: argparse.Namespace, port: int,
                   env: dict[str, str] | None = None, repeat: int = 0) -> list[str]:
    """The command line that runs `impl` as a job of --np ranks (1 for memcpy, on this host);
    its rows carry `repeat`, the round of the interleaved schedule it belongs to."""
    worker = ["-m", "hvdtrain.tools.bench_allreduce", "--worker", impl, "--rows", str(args.rows),
              "--min-bytes", str(args.min_bytes), "--max-bytes", str(args.max_bytes),
              "--factor", str(args.factor), "--iters", str(args.iters), "--warmup",
              str(args.warmup), "--chunk-bytes", str(args.chunk_bytes), "--port", str(port),
              "--repeat-index", str(repeat)]
    if IMPLS[impl] == "local":
        return [sys.executable, *worker]
    if args.hosts:
        worker += ["--master-addr", args.hosts.split(",")[0].rsplit(":", 1)[0]]
    if IMPLS[impl] == "horovodrun":
        return horovodrun_cmd(args.np, worker[1:], gloo=True, hosts=args.hosts)
    # `-m mpi4py`: an exception on one rank aborts the job instead of hanging the others.
    where = host_args(args.hosts, env) if args.hosts else []
    return ["mpirun", "-np", str(args.np), *where, *args.mpirun_args.split(), sys.executable,
            "-m", "mpi4py", *worker]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job_env(impl: str, np: int | None = None, hosts: str | None = None) -> dict[str, str]:
    """Root allowed, venv on PATH (launcher_env); one OpenMP thread; this hvdtrain importable.
    The implementations hvdtrain runs also get hvdtrain's rank environment
    (horovod_env_defaults, the user's values win); raw MPI, torch-gloo and the `-stock`
    variant run as a user would get them. It goes in at launch because some of it is read
    once at process start (THP_MEM_ALLOC_ENABLE at the first tensor allocation, OMPI_MCA_*
    at MPI_Init), before any hvdtrain code could set it."""
    path = [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]
    env = launcher_env({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                        "PYTHONPATH": os.pathsep.join(p for p in path if p)})
    if impl in HVDTRAIN_CONFIGURED:
        for key, value in job_env_defaults(np, hosts).items():
            env.setdefault(key, value)
    else:  # as a user would run it: none of hvdtrain's defaults unless they exported them
        for key in horovod_env_defaults():
            if key not in os.environ:
                env.pop(key, None)
    return env


def link_shaping() -> dict[str, Any] | None:
    """On the local cluster (HVDTRAIN_CLUSTER_DIR set by mpi_jobs/cluster_local.sh): each host's
    queueing on its link `hvd0` as `tc qdisc/class show` print it, and the htb rate if shaped."""
    if not os.environ.get("HVDTRAIN_CLUSTER_DIR"):
        return None

    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"failed: {exc}"
    names = [ln.split()[0] for ln in sh("ip", "netns", "list").splitlines() if re.match(r"hvd-h\d+\b", ln)]
    hosts = {}
    for ns in sorted(names, key=lambda n: int(n[5:])):
        qdisc, cls = (sh("ip", "netns", "exec", ns, "tc", kind, "show", "dev", "hvd0")
                      for kind in ("qdisc", "class"))
        rate = re.search(r"\brate (\S+)", cls)
        hosts[ns] = {"qdisc": qdisc, "class": cls, "rate": rate.group(1) if rate else None}
    rates = {h["rate"] for h in hosts.values()}
    summary = ("no cluster hosts" if not hosts else "unshaped" if rates == {None} else
               f"htb rate {rates.pop()} per host" if len(rates) == 1 else
               ", ".join(f"{ns} {h['rate'] or 'unshaped'}" for ns, h in hosts.items()))
    return {"summary": summary, "hosts": hosts}


def collect_meta(args: argparse.Namespace, failed: dict[str, str]) -> dict[str, Any]:
    cpu = cpu_model()
    mpi = mpirun_version() or "mpirun not found"
    return {"host": socket.gethostname(), "cores": os.cpu_count(), "cpu": cpu,
            "python": platform.python_version(), "torch": package("torch"),
            "numpy": package("numpy"), "horovod": package("horovod"), "mpi4py": package("mpi4py"),
            "mpi": mpi, "impls": args.impls, "failed": failed, "hosts": args.hosts or "local",
            "label": args.label, "links": args.links,
            "settings": {"np": args.np, "min_bytes": args.min_bytes, "max_bytes": args.max_bytes,
                         "factor": args.factor, "iters": args.iters, "warmup": args.warmup,
                         "chunk_bytes": args.chunk_bytes, "mpirun_args": args.mpirun_args,
                         "repeat": args.repeat,
                         "dtype": "float32", "op": "sum, in place", "torch_threads": 1,
                         "job_env": {k: os.environ.get(k, v)
                                     for k, v in job_env_defaults(args.np, args.hosts).items()},
                         "job_env_note": f"given to {', '.join(sorted(HVDTRAIN_CONFIGURED))}"}}


RAW, RAW_TUNED = "mpi4py", "mpi4py-tuned"


def raw_reference(impl: str, present: set[str]) -> str | None:
    """The raw MPI row `impl` is compared with: the same rank environment where it ran
    (mpi4py-tuned for what hvdtrain configures, else mpi4py), or the other one if only that ran;
    none for raw MPI itself and for memcpy (one rank, a copy)."""
    if impl in (RAW, "memcpy"):
        return None
    order = [RAW_TUNED, RAW] if impl in HVDTRAIN_CONFIGURED and impl != RAW_TUNED else [RAW]
    return next((ref for ref in order if ref in present), None)


def combine_runs(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (impl, size) from the runs' rows (in the order they first appear): the median
    of the runs' p50s, and each run's p50 with its repeat index (the pairs of `add_ratios`)."""
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for line in lines:
        runs.setdefault((line["impl"], line["bytes"]), []).append(line)
    rows = []
    for (impl, nbytes), mine in runs.items():
        mine = sorted(mine, key=lambda r: r.get("repeat", 0))
        seconds = median([r["p50_us"] * 1e-6 for r in mine])
        path = {"path": mine[0]["path"]} if "path" in mine[0] else {}
        rows.append({**make_row(impl, mine[0]["np"], nbytes, seconds), **path,
                     "repeats": [r.get("repeat", 0) for r in mine],
                     "p50_us_runs": [r["p50_us"] for r in mine], "busbw_gbps_runs": [r["busbw_gbps"] for r in mine]})
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """`vs_raw`: busbw over the raw MPI reference's (`vs_raw_impl`) at the same size, from the
    rows' medians; `vs_raw_interval`: the paired ratio (run i against run i) with its 95%
    bootstrap interval (hvdtrain.tools.stats.ratio_summary)."""
    present = {r["impl"] for r in rows}
    by = {(r["impl"], r["bytes"]): r for r in rows}
    for r in rows:
        ref_impl = raw_reference(r["impl"], present)
        ref = by.get((ref_impl, r["bytes"])) if ref_impl else None
        r["vs_raw_impl"] = ref_impl if ref else None
        r["vs_raw"] = r["busbw_gbps"] / ref["busbw_gbps"] if ref else None
        a, b = paired(dict(zip(r["repeats"], r["busbw_gbps_runs"])),
                      dict(zip(ref["repeats"], ref["busbw_gbps_runs"]))) if ref else ([], [])
        r["vs_raw_interval"] = ratio_summary(a, b) if a else None


COLUMNS = [("impl", "impl", "{}"), ("np", "np", "{}"), ("bytes", "bytes", "{}"), ("p50_us", "p50_us", "{:.1f}"),
           ("algbw GB/s", "algbw_gbps", "{:.3f}"), ("busbw GB/s", "busbw_gbps", "{:.3f}"),
           ("raw", "vs_raw_impl", "{}"), ("x raw [95% CI]", "x_raw", "{}")]


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per (impl, size); `x raw` is the paired busbw ratio to the raw MPI row named in
    `raw` (the same rank environment), with its 95% bootstrap interval over the repeats."""
    shown = [{**r, "x_raw": format_ratio(r["vs_raw_interval"]) or None} for r in rows]
    print(tables.format_table(COLUMNS, shown))
    paths: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        if r.get("path"):
            paths.setdefault(r["impl"], {}).setdefault(r["path"], []).append(r["bytes"])
    for impl, by in paths.items():
        print(f"[bench] {impl} ran: " + ", ".join(f"{p} at {min(b)}-{max(b)} B" for p, b in by.items()))


def where(meta: dict[str, Any]) -> str:
    """np, hosts and link conditions, for the table and plot titles."""
    hosts = meta["host"] if meta["hosts"] == "local" else meta["hosts"]
    links = f", links {meta['links']['summary']}" if meta["links"] else ""
    label = f" [{meta['label']}]" if meta["label"] else ""
    return f"np={meta['settings']['np']} on {hosts}{links}{label}"


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = [r for r in rows if r["impl"] == impl and r["busbw_gbps"] > 0]
        label = f"{impl} (1 rank, copy rate)" if impl == "memcpy" else impl
        ax.plot([r["bytes"] for r in mine], [r["busbw_gbps"] for r in mine], marker="o",
                ms=3, label=label, linestyle="--" if impl == "memcpy" else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # small messages are latency-bound: GB/s spans decades
    ax.set_xlabel("message size (bytes, float32, in place)")
    ax.set_ylabel("bus bandwidth (GB/s) = algbw x 2(N-1)/N")
    ax.set_title(f"allreduce busbw, {where(meta)} ({meta['cores']} cores, {meta['cpu']})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hvdtrain bench allreduce", description=__doc__.split("\n")[0])
    p.add_argument("--np", type=int, default=2, help="ranks per job (memcpy always uses 1)")
    p.add_argument("--out", type=Path, default=Path("bench-allreduce"), help="output folder")
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                   help=f"comma-separated, from {', '.join(IMPLS)}")
    p.add_argument("--min-bytes", type=int, default=4)
    p.add_argument("--max-bytes", type=int, default=256 << 20)
    p.add_argument("--factor", type=int, default=4, help="size step (4: 4 B, 16 B, ... 256 MiB)")
    p.add_argument("--iters", type=int, default=200, help="timed iterations (fewer for big sizes)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1,
                   help="whole runs of every implementation, interleaved (impl1, impl2, ..., impl1, ...); "
                        "the ratios to raw MPI get a 95%% interval over them (use >= 5)")
    p.add_argument("--chunk-bytes", type=int, default=1 << 20, help="hvdtrain-ring chunk size")
    p.add_argument("--mpirun-args", default="--oversubscribe --bind-to none",
                   help="extra mpirun flags for the MPI jobs")
    p.add_argument("--timeout", type=float, default=900, help="seconds per job before it is killed")
    p.add_argument("--hosts", help="run the MPI and Horovod jobs across hosts H1:slots,H2:slots "
                   "(memcpy stays here); --out must be visible to every host at the same path")
    p.add_argument("--label", help="what the JSON and plot title say about the links (e.g. '1 GbE')")
    p.add_argument("--oversubscribe", action="store_true",
                   help="run more than 8 ranks per core on a host anyway (refused otherwise)")
    p.add_argument("--master-addr", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--repeat-index", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.impls = [s for s in args.impls.split(",") if s]
    unknown = [s for s in args.impls if s not in IMPLS]
    if unknown or args.np < 1 or args.repeat < 1:
        p.error(f"unknown --impls {unknown} (choose from {', '.join(IMPLS)})" if unknown
                else f"--np must be >= 1, got {args.np}" if args.np < 1
                else f"--repeat must be >= 1, got {args.repeat}")
    byte_sizes(args.min_bytes, args.max_bytes, args.factor)  # validate early, with the values
    if args.hosts is not None:
        args.hosts = parse_hosts(args.hosts, args.np)  # ValueError: one line, exit 2, nothing launched
    if not args.worker:
        check_capacity(args.np, args.hosts, args.oversubscribe)
    return args


@ends_its_jobs("hvdtrain bench allreduce", rank_flags=("--worker",))
def main(argv: list[str]) -> int:
    """Run the benchmark (or, with the hidden --worker, one rank of one job); 0 if every job ran."""
    try:
        args = parse_args(argv)
    except ValueError as exc:
        print(f"hvdtrain bench allreduce: {exc}", file=sys.stderr)
        return 2
    if args.worker:
        return run_worker(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    args.rows = (args.out / ROWS_FILE).resolve()
    args.rows.write_text("")
    args.links = link_shaping()  # the conditions the jobs start under
    failed: dict[str, str] = {}
    for rep, impl in interleaved_order(args.impls, args.repeat):
        if impl in failed:  # a job that failed once is not run again
            continue
        log = args.out / "logs" / (f"{impl}.log" if args.repeat == 1 else f"{impl}-r{rep}.log")
        env = job_env(impl, args.np, args.hosts)
        cmd = launch_command(impl, args, free_port(), env, rep)
        round_ = f" (round {rep + 1}/{args.repeat})" if args.repeat > 1 else ""
        print(f"[bench] {impl}{round_}: {' '.join(cmd[:6])} ...", flush=True)
        result = run(cmd, timeout=args.timeout, env=env)  # kills the whole job on timeout
        log.write_text(result.stdout)
        if result.returncode != 0:
            why = f"timed out after {args.timeout:.0f} s" if result.returncode == TIMEOUT_EXIT \
                else f"exit {result.returncode}"
            failed[impl] = f"{why}; see {log}"
            print(f"[bench] {impl} FAILED: {failed[impl]}", file=sys.stderr, flush=True)
    rows = combine_runs([json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()])
    add_ratios(rows)
    meta = collect_meta(args, failed)
    (args.out / JSON_FILE).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"[bench] allreduce busbw, {where(meta)}")
    print_table(rows)
    if rows:
        plot(rows, meta, args.out / PNG_FILE)
    print(f"[bench] wrote {args.out / JSON_FILE} and {args.out / PNG_FILE}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
