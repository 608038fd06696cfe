"""`hvdtrain bench train`: what data parallelism costs and buys on this machine.

For 1..N ranks it runs `hvdtrain train` per strategy (Horovod gradient allreduce, the MPI
fallback at each `--sync-every` k, and as the no-communication reference the MPI fallback that
only averages after the last step) on a compute-bound MLP, `--threads` torch threads per rank:
samples/s, efficiency samples/s(N) / (N x samples/s(1)), bytes per step, peak RSS per rank.
At 1 rank the same model, data and batch also run as a plain torch loop written the way a user
would, so hvdtrain's own overhead is a ratio. `--memory-rows R` compares peak RSS on an R-row
set with the same run on a tiny set, next to the bytes of the rank's data block.
Each rank runs as `python -m hvdtrain.tools.bench_train RSS_DIR <hvdtrain argv>`: the same code path
plus an exit hook that records its peak RSS (ru_maxrss). Writes OUT/train.json and a table.
`--repeat R` runs every job R times, interleaved (all jobs, then all again; hvdtrain.tools.stats):
a row shows its median run, and each ratio (efficiency, vs plain) also comes as the median over
the R pairs of runs with a 95% bootstrap interval (`*_interval` in the JSON; use R >= 5).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hvdtrain import data as D
from hvdtrain.checkpoint import atomic_write_text
from hvdtrain.config import BY_KWARG, field_default
from hvdtrain.tools import tables
from hvdtrain.tools.stats import format_ratio, interleaved_order, median_index, ratio_summary
from hvdtrain.tools.machine import machine
from hvdtrain.tools.launch import check_capacity, ends_its_jobs, horovodrun_cmd, mpirun_args, run

NO_COMM_K = 1_000_000_000
"""sync_every larger than any run: the MPI fallback then only averages once, after the last step."""
RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "HOROVOD_RANK", "PMI_RANK")


def plain_loop(folder: Path, hidden: tuple[int, ...], batch_size: int, epochs: int, lr: float,
               seed: int, threads: int, device: str = "cpu") -> dict[str, Any]:
    """The reference: one process, whole set in memory, shuffled index batches, SGD. No hvdtrain."""
    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    X = torch.from_numpy(np.load(folder / "X.npy")).to(dev)
    y = torch.from_numpy(np.load(folder / "y.npy")).reshape(-1, 1).to(dev)
    layers: list[nn.Module] = []
    width = X.shape[1]
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    model = nn.Sequential(*layers, nn.Linear(width, 1)).to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.MSELoss()
    steps = len(X) // batch_size
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(X), device=dev)
        for s in range(steps):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            optimizer.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"backend": "plain", "world_size": 1, "steps": steps * epochs, "train_seconds": seconds,
            "samples_per_sec": steps * epochs * batch_size / seconds, "final_loss": loss.item(),
            "bytes_per_step": 0, "comm_seconds": 0.0, "parameters": sum(p.numel() for p in model.parameters())}


def _rank_main(argv: list[str]) -> int:
    """Rank entry: `RSS_DIR train ...` runs hvdtrain, `RSS_DIR plain OUT JSON` the plain loop."""
    rss_dir = Path(argv[0])
    rank = next((os.environ[v] for v in RANK_VARS if v in os.environ), "0")

    def write_rss() -> None:  # ru_maxrss is KiB on Linux: the process's peak resident set
        import resource
        rss_dir.mkdir(parents=True, exist_ok=True)
        (rss_dir / f"rank-{rank}").write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))

    atexit.register(write_rss)
    if argv[1] == "plain":
        s = json.loads(argv[3])
        summary = plain_loop(Path(s.pop("data")), tuple(s.pop("hidden")), **s)
        atomic_write_text(json.dumps(summary, indent=2) + "\n", Path(argv[2]) / "summary.json")
        return 0
    from hvdtrain.cli import main
    return main(argv[1:])


def strategies(ks: list[int]) -> list[tuple[str, str, list[str]]]:
    """(label, launcher, hvdtrain flags) for the multi-rank strategies."""
    from hvdtrain.strategies import variants
    out = [tuple(v) for v in variants(ks)]
    return out + [("no comm", "mpirun", ["--backend", "mpi", "--sync-every", str(NO_COMM_K)])]


def launch(label: str, launcher: str, ranks: int, argv: list[str], run_dir: Path,
           timeout: float) -> dict[str, Any]:
    """Run one job under the RSS hook; its summary.json plus every rank's peak RSS."""
    shutil.rmtree(run_dir, ignore_errors=True)
    hooked = ["hvdtrain.tools.bench_train", str(run_dir / "rss"), *argv]
    cmd = (horovodrun_cmd(ranks, hooked) if launcher == "horovodrun" else
           mpirun_args(ranks) + [sys.executable, "-m", "mpi4py", "-m", *hooked] if launcher == "mpirun" else
           [sys.executable, "-m", *hooked])
    print(f"$ {' '.join(cmd)}", flush=True)
    result = run(cmd, timeout=timeout)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "launch.log").write_text(result.stdout)
    if result.returncode != 0:
        tail = " | ".join(result.stdout.strip().splitlines()[-5:])
        raise RuntimeError(f"{label} at {ranks} rank(s) exited {result.returncode}: {tail}")
    summary = json.loads((run_dir / "summary.json").read_text())
    files = [run_dir / "rss" / f"rank-{r}" for r in range(ranks)]
    rss = summary.get("peak_rss_bytes") or [int(f.read_text()) if f.is_file() else None for f in files]
    return {"summary": summary, "peak_rss_bytes": rss if isinstance(rss, list) else [rss]}


def row_of(label: str, ranks: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run by throughput: on a shared host noise goes both ways (load, turbo clocks).
    `samples_per_sec_runs` keeps every run in schedule order (run i of every row: round i)."""
    mid = runs[median_index([r["summary"]["samples_per_sec"] for r in runs])]
    s = mid["summary"]
    return {"strategy": label, "ranks": ranks, "samples_per_sec": s["samples_per_sec"],
            "samples_per_sec_runs": [r["summary"]["samples_per_sec"] for r in runs],
            "train_seconds": s["train_seconds"], "steps": s["steps"], "bytes_per_step": s["bytes_per_step"],
            "comm_fraction": None if s["comm_seconds"] is None  # not measured (DDP): n/a
            else s["comm_seconds"] / max(s["train_seconds"], 1e-9),
            "final_loss": s["final_loss"], "eval_loss": s.get("eval_loss"), "parameters": s.get("parameters"),
            "peak_rss_bytes": max((r["peak_rss_bytes"] for r in runs),
                                  key=lambda b: max((x or 0) for x in b))}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """efficiency = samples/s(N) / (N x samples/s(1)) of the same strategy; 1-rank rows vs plain.
    Point values from the rows' median runs; with every run kept (`samples_per_sec_runs`), also
    the paired ratios (run i against run i) with their 95% intervals: `efficiency_interval`
    (b = N x the 1-rank run, the linear-scaling ideal) and `vs_plain_interval`."""
    one = {r["strategy"]: r for r in rows if r["ranks"] == 1}

    def interval(r: dict[str, Any], base: dict[str, Any] | None, n: int) -> dict[str, Any] | None:
        a, b = r.get("samples_per_sec_runs"), base.get("samples_per_sec_runs") if base else None
        if not a or not b or len(a) != len(b):
            return None
        return ratio_summary(a, [n * x for x in b])

    for r in rows:
        base = one.get(r["strategy"])
        plain = one.get("plain torch") if r["ranks"] == 1 else None
        r["efficiency"] = r["samples_per_sec"] / (r["ranks"] * base["samples_per_sec"]) if base else None
        r["efficiency_interval"] = interval(r, base, r["ranks"])
        r["vs_plain"] = r["samples_per_sec"] / plain["samples_per_sec"] if plain else None
        r["vs_plain_interval"] = interval(r, plain, 1)


def block_bytes(folder: Path, rank: int, size: int) -> int:
    """Bytes of the arrays a rank keeps: its training and eval blocks (X and y, float32)."""
    info = D.describe(folder)
    row = (info.n_features + info.n_outputs) * 4
    n = len(D.partition(info.n_train, rank, size))
    lo, hi = D.block_bounds(info.n_eval, rank, size)
    return (n + hi - lo) * row


def regression_set(out: Path, rows: int, seed: int) -> Path:
    """The built-in regression set inside `out`, written once and reused by every run."""
    folder = D.builtin_folder(out, "regression", rows, seed)
    return folder if (folder / "meta.json").is_file() else D.make_dataset("regression", folder, rows, seed)


def memory_rows(args: argparse.Namespace, ks: list[int], out: Path, common: list[str]) -> list[dict[str, Any]]:
    """Peak RSS per rank on a large set vs a tiny one (same small model): what the data block costs."""
    rows = []
    sets = {tag: regression_set(out, n, args.seed) for tag, n in (("base", args.memory_base_rows),
                                                                   ("big", args.memory_rows))}
    for label, launcher, flags in strategies([max(ks)])[:2]:
        rss: dict[str, list[int | None]] = {}
        for tag, folder in sets.items():
            run_dir = out / "runs" / f"memory-{label.replace(' ', '-').replace('=', '')}-{tag}"
            argv = ["train", "--data", str(folder), *common, *flags, "--model", "net", "--epochs", "1",
                    "--batch-size", str(args.batch_size), "--out", str(run_dir), "--overwrite"]
            res = launch(label, launcher, args.np, argv, run_dir, args.timeout)
            rss[tag], model_bytes = res["peak_rss_bytes"], res["summary"]["parameters"] * 4
        for rank, (big, base) in enumerate(zip(rss["big"], rss["base"])):
            block = block_bytes(sets["big"], rank, args.np)
            excess = big - base if big is not None and base is not None else None
            rows.append({"strategy": label, "ranks": args.np, "rank": rank, "rows": args.memory_rows,
                         "base_rows": args.memory_base_rows, "peak_rss_bytes": big, "base_rss_bytes": base,
                         "excess_bytes": excess, "block_bytes": block, "model_bytes": model_bytes,
                         "excess_over_block_model": None if excess is None else excess / (block + model_bytes)})
    return rows


COLUMNS = [("strategy", "strategy", "{}"), ("ranks", "ranks", "{}"), ("samples/s", "samples_per_sec", "{:.0f}"),
           ("efficiency [95% CI]", "eff_ci", "{}"), ("vs plain [95% CI]", "plain_ci", "{}"),
           ("KB/step", "kb_step", "{:.1f}"), ("comm %", "comm_pct", "{:.1f}"),
           ("eval loss", "eval_loss", "{:.5g}"), ("peak RSS MB", "rss_mb", "{}")]


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = []
    for r in rows:
        v = {**r, "kb_step": r["bytes_per_step"] / 1e3,
             "eff_ci": format_ratio(r.get("efficiency_interval"), 3) or None,
             "plain_ci": format_ratio(r.get("vs_plain_interval"), 3) or None,
             "comm_pct": None if r["comm_fraction"] is None else 100 * r["comm_fraction"],
             "rss_mb": "/".join(f"{b / 2**20:.0f}" if b else "?" for b in r["peak_rss_bytes"])}
        cells.append(v)
    return tables.format_table(COLUMNS, cells)


def memory_line(m: dict[str, Any]) -> str:
    mib = {k: "?" if m[k] is None else f"{m[k] / 2**20:.1f}" for k in
           ("peak_rss_bytes", "base_rss_bytes", "excess_bytes", "block_bytes", "model_bytes")}
    ratio = "?" if m["excess_over_block_model"] is None else f"{m['excess_over_block_model']:.2f}"
    return (f"memory {m['strategy']} rank {m['rank']}: peak RSS {mib['peak_rss_bytes']} MiB on {m['rows']} rows, "
            f"{mib['base_rss_bytes']} MiB on {m['base_rows']}; excess {mib['excess_bytes']} MiB = {ratio} x "
            f"(block {mib['block_bytes']} MiB + model {mib['model_bytes']} MiB)")


def build_parser() -> argparse.ArgumentParser:
    from hvdtrain.cli import Parser
    p = Parser(prog="hvdtrain bench train", description=__doc__.split("\n\n")[0],
               epilog="Other flags (e.g. --config run.toml, --optimizer) go to every `hvdtrain train` run.")
    p.add_argument("--np", type=int, default=2, help="largest rank count; runs 1..NP")
    p.add_argument("--out", default="runs/bench-train", help="folder for train.json and the runs")
    p.add_argument("--rows", type=int, default=262_144, help="rows of the built-in regression set")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--hidden", default="1024,1024", help="MLP widths (compute-bound by default)")
    p.add_argument("--batch-size", type=int, default=512,
                   help="samples per rank per step (compute per allreduce grows with it)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--sync-every", default="1,16", help="MPI fallback k values, comma-separated")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per row, interleaved; the median counts, ratios get a 95%% interval (use >= 5)")
    p.add_argument("--seed", type=int, default=field_default(BY_KWARG["seed"]))
    p.add_argument("--memory-rows", type=int, default=0, help="rows for the peak-RSS check (0: skip)")
    p.add_argument("--memory-base-rows", type=int, default=20_000, help="rows of its tiny reference set")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--oversubscribe", action="store_true",
                   help="run more than 8 ranks per core anyway (refused otherwise)")
    return p


@ends_its_jobs("hvdtrain bench train")
def main(argv: list[str]) -> int:
    args, extra = build_parser().parse_known_args(argv)
    try:
        hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
        ks = [int(k) for k in args.sync_every.split(",") if k.strip()]
    except ValueError:
        hidden, ks = (), []
    if args.np < 1 or args.repeat < 1 or not hidden or not ks or min(hidden + tuple(ks)) < 1:
        sys.stderr.write(f"hvdtrain: error: need --np >= 1 (got {args.np}), --repeat >= 1 (got {args.repeat}), "
                         f"--hidden and --sync-every as positive integers (got {args.hidden!r}, {args.sync_every!r}); "
                         f"use e.g. --np 2 --hidden 1024,1024 --sync-every 1,16\n")
        return 2
    try:
        check_capacity(args.np, oversubscribe=args.oversubscribe)
    except ValueError as exc:
        sys.stderr.write(f"hvdtrain: error: {exc}\n")
        return 2
    out = Path(args.out).resolve()
    folder = regression_set(out, args.rows, args.seed)
    common = ["--seed", str(args.seed), "--threads", str(args.threads), "--lr", str(args.lr), *extra]
    model = ["--model", "mlp", "--hidden", args.hidden, "--epochs", str(args.epochs),
             "--batch-size", str(args.batch_size), "--data", str(folder), *common]
    plain = {"data": str(folder), "hidden": hidden, "batch_size": args.batch_size, "epochs": args.epochs,
             "lr": args.lr, "seed": args.seed, "threads": args.threads}
    jobs = [("plain torch", "python", 1, []), ("single", "python", 1, ["--backend", "single"])]
    jobs += [(label, launcher, n, flags) for n in range(1, args.np + 1) for label, launcher, flags in strategies(ks)]
    load_before = os.getloadavg()
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        for rep, (label, launcher, n, flags) in interleaved_order(jobs, args.repeat):
            run_dir = out / "runs" / f"{label.replace(' ', '-').replace('=', '')}-np{n}-r{rep}"
            argv = (["plain", str(run_dir), json.dumps(plain)] if label == "plain torch" else
                    ["train", *model, *flags, "--out", str(run_dir), "--overwrite"])
            results.setdefault((label, n), []).append(launch(label, launcher, n, argv, run_dir, args.timeout))
        memory = memory_rows(args, ks, out, common) if args.memory_rows else []
    except RuntimeError as exc:
        sys.stderr.write(f"hvdtrain: error: run {exc}; see {out}/runs/*/launch.log\n")
        return 1
    rows = [row_of(label, n, runs) for (label, n), runs in results.items()]
    add_ratios(rows)
    meta = {**machine(), "load_before": load_before, "load_after": os.getloadavg(),
            "settings": {**vars(args), "train_args": extra, "model": "mlp", "data": str(folder)}}
    atomic_write_text(json.dumps({"meta": meta, "rows": rows, "memory": memory}, indent=2) + "\n", out / "train.json")
    title = (f"hvdtrain bench train: 1..{args.np} ranks, mlp {args.hidden}, batch {args.batch_size}/rank, "
             f"{args.rows} rows x {args.epochs} epoch(s), {args.threads} thread(s)/rank, {meta['cores']} cores")
    print(f"\n{title}\n{format_table(rows)}")
    for m in memory:
        print(memory_line(m))
    print(f"\nwrote {out}/train.json")
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
