"""`hvdtrain bench synthetic`: img/s of a real model under every strategy, against the loops users
would write instead, with Horovod's `examples/pytorch/pytorch_synthetic_benchmark.py` method.

One fixed random batch (C x S x S images, labels < the model's outputs), W warm-up batches, then
I iterations of K batches, each timed (timeit, as Horovod's script); img/s per rank per
iteration, reported as the mean +- 1.96 std over every rank's iterations and the total (mean x N).
Rows, each a launched job with a timeout:
- every multi-rank strategy of the registry (`strategies.variants([1])`), called exactly as
  train.py's loop calls it (attach, wrap, broadcast_state, then zero_grad, backward, `step`,
  `after_step`), with hvdtrain's rank environment given at launch;
- `horovod (hand-written)`: the loop of Horovod's script (DistributedOptimizer, broadcasts,
  optimizer.step()) under horovodrun, stock environment; `horovod (hand-written, hvdtrain env)`:
  the same loop with hvdtrain's environment, which separates loop cost from environment tuning;
- `ddp (hand-written)`: torch.distributed + DistributedDataParallel under mpirun (rendezvous:
  rank 0's address and a free port over mpi4py), stock environment;
- `plain torch`: 1 rank, no communication.
`--repeat R` launches every row R times, interleaved (all rows, then all again; hvdtrain.tools.stats);
the ratios (vs hand-written Horovod, vs plain) also come as the median over the R pairs of runs
(run i of both rows, each run's mean img/s) with a 95% bootstrap interval (`*_interval`; R >= 5).
Every rank runs torch.set_num_threads(T) (default cores // N). Ranks run
`python -m hvdtrain.tools.bench_synthetic --worker KIND DIR SETTINGS` and write DIR/rank-R.json.
Writes OUT/synthetic.json (meta: machine, versions, threads, settings; rows) and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import timeit
from pathlib import Path
from typing import Any, Callable, NamedTuple

from hvdtrain.tools import tables
from hvdtrain.checkpoint import atomic_write_text
from hvdtrain.errors import ConfigError
from hvdtrain.tools.launch import check_capacity, ends_its_jobs, horovodrun_cmd, launcher_env, mpirun_args, run
from hvdtrain.tools.stats import format_ratio, interleaved_order, ratio_summary


class Job(NamedTuple):
    label: str
    kind: str          # worker kind: strategy, horovod-hand, ddp-hand, plain
    launcher: str      # horovodrun, mpirun or python
    ranks: int
    env: str           # hvdtrain (its rank environment) or stock (as a user gets it)
    flags: list[str]   # hvdtrain flags of a strategy row


PEERS = {"horovod-hand": ("horovod (hand-written)", "horovod-hand", "horovodrun", "stock"),
         "horovod-hand-env": ("horovod (hand-written, hvdtrain env)", "horovod-hand", "horovodrun", "hvdtrain"),
         "ddp-hand": ("ddp (hand-written)", "ddp-hand", "mpirun", "stock"),
         "plain": ("plain torch", "plain", "python", "stock")}
HAND_HOROVOD = PEERS["horovod-hand"][0]
HAND_HOROVOD_ENV = PEERS["horovod-hand-env"][0]
PLAIN = PEERS["plain"][0]


def jobs(np: int, selected: list[str] | None = None) -> list[Job]:
    """The registry's multi-rank strategies (mpi at k=1), then the hand-written peers."""
    from hvdtrain.strategies import variants
    out = [Job(v.label, "strategy", v.launcher, np, "hvdtrain", v.flags) for v in variants([1])
           if selected is None or v.flags[1] in selected]
    out += [Job(label, kind, launcher, 1 if key == "plain" else np, env, [])
            for key, (label, kind, launcher, env) in PEERS.items() if selected is None or key in selected]
    return out


def strategy_names() -> list[str]:
    from hvdtrain.strategies import variants
    return list(dict.fromkeys(v.flags[1] for v in variants([1]))) + list(PEERS)


# ----------------------------------------------------------------------------------- rank side
def build_model(s: dict[str, Any]) -> Any:
    from hvdtrain.plugins import call_plugin, load_attr
    return call_plugin(s["model"], "--model", load_attr(s["model"], "--model"), **s["model_args"])


def fixed_batch(s: dict[str, Any], device: Any) -> tuple[Any, Any]:
    """The one random batch every step trains on (Horovod's script: randn images, random labels)."""
    import torch
    gen = torch.Generator().manual_seed(s["seed"])
    x = torch.randn(s["batch_size"], s["channels"], s["image_size"], s["image_size"], generator=gen)
    y = torch.randint(0, s["num_classes"], (s["batch_size"],), generator=gen)
    return x.to(device), y.to(device)


def timed(step: Callable[[], None], s: dict[str, Any], device: Any) -> list[float]:
    """Warm-up, then img/s of each of `iters` timed runs of `per_iter` steps (timeit, gc off)."""
    import torch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def batches(n: int) -> Callable[[], None]:
        def body() -> None:
            for _ in range(n):
                step()
            sync()
        return body
    timeit.timeit(batches(s["warmup"]), number=1)
    return [s["batch_size"] * s["per_iter"] / timeit.timeit(batches(s["per_iter"]), number=1)
            for _ in range(s["iters"])]


def user_step(model: Any, optimizer: Any, x: Any, y: Any) -> Callable[[], None]:
    """One training step as the hand-written loops (and Horovod's script) write it."""
    import torch.nn.functional as F

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def strategy_config(flags: list[str], s: dict[str, Any], out: str) -> Any:
    """The TrainConfig a `hvdtrain train` with these flags would run (same parser, same checks)."""
    from hvdtrain.cli import add_train_flags, overrides_from
    from hvdtrain.config import load_config

    class Flags(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise ConfigError(f"{message}; fix the strategy flags {flags}")
    p = Flags(add_help=False)
    add_train_flags(p)
    args = p.parse_args([*flags, "--model", s["model"], "--model-args", json.dumps(s["model_args"]),
                         "--optimizer", "sgd", "--lr", "0.01", "--threads", str(s["threads"]),
                         "--batch-size", str(s["batch_size"]), "--seed", str(s["seed"]), "--out", out])
    return load_config(None, overrides_from(args))


def run_strategy(s: dict[str, Any], out: str) -> tuple[int, int, list[float]]:
    """hvdtrain: the strategy object driven as train.py's loop drives it."""
    import torch
    import torch.nn.functional as F

    from hvdtrain.registry import Job as TrainJob, build_optimizer
    from hvdtrain.strategies import make_strategy
    cfg = strategy_config(s["flags"], s, out)
    strategy = make_strategy(cfg)
    rank, size = strategy.rank, strategy.size
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(s).to(strategy.device)
    optimizer = build_optimizer(cfg.optim, TrainJob(), model)
    optimizer = strategy.attach(model, optimizer, [1.0 / size] * size)
    forward = strategy.wrap(model)
    strategy.broadcast_state(model, optimizer)
    model.train()
    x, y = fixed_batch(s, strategy.device)
    count = 0

    def step() -> None:
        nonlocal count
        optimizer.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        strategy.step(optimizer)
        count += 1
        strategy.after_step(count, model)
    rates = timed(step, s, strategy.device)
    strategy.finish(model, count)
    strategy.comm.shutdown()
    return rank, size, rates


def run_horovod_hand(s: dict[str, Any]) -> tuple[int, int, list[float]]:
    """Horovod's pytorch_synthetic_benchmark.py loop, as its users write it."""
    import horovod.torch as hvd
    import torch
    hvd.init()
    torch.set_num_threads(s["threads"])
    device = torch.device("cuda", hvd.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build_model(s).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    rates = timed(user_step(model, optimizer, *fixed_batch(s, device)), s, device)
    rank, size = hvd.rank(), hvd.size()
    hvd.shutdown()
    return rank, size, rates


def run_ddp_hand(s: dict[str, Any]) -> tuple[int, int, list[float]]:
    """torch DDP as its users write it; rank 0's address and a free port shared over mpi4py."""
    import torch
    import torch.distributed as dist
    from mpi4py import MPI
    from torch.nn.parallel import DistributedDataParallel as DDP
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    address = None
    if rank == 0:
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
        with socket.socket() as sock:
            sock.bind((host, 0))
            address = f"tcp://{host}:{sock.getsockname()[1]}"
    address = comm.bcast(address, root=0)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", init_method=address, rank=rank, world_size=size)
    torch.set_num_threads(s["threads"])
    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", rank))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    model = DDP(build_model(s).to(device), device_ids=[local] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    rates = timed(user_step(model, optimizer, *fixed_batch(s, device)), s, device)
    dist.destroy_process_group()
    return rank, size, rates


def run_plain(s: dict[str, Any]) -> tuple[int, int, list[float]]:
    """One process, no communication: the loop every other row is measured against."""
    import torch
    torch.set_num_threads(s["threads"])
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(s).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return 0, 1, timed(user_step(model, optimizer, *fixed_batch(s, device)), s, device)


def worker(argv: list[str]) -> int:
    """Rank entry: `--worker KIND DIR SETTINGS_JSON`; writes DIR/rank-R.json."""
    kind, folder, s = argv[0], Path(argv[1]), json.loads(argv[2])
    if kind == "strategy":
        rank, size, rates = run_strategy(s, str(folder / "train-out"))
    else:
        rank, size, rates = {"horovod-hand": run_horovod_hand, "ddp-hand": run_ddp_hand,
                             "plain": run_plain}[kind](s)
    import torch
    record = {"rank": rank, "size": size, "threads": torch.get_num_threads(), "img_per_sec": rates}
    atomic_write_text(json.dumps(record) + "\n", folder / f"rank-{rank}.json")
    return 0


# ----------------------------------------------------------------------------------- driver
def job_env(env: str, np: int) -> dict[str, str]:
    """hvdtrain rows get its rank environment at launch (some of it is read at process start, as
    bench allreduce does; the user's exported values win); stock rows none of it, unless exported."""
    from hvdtrain.comm.env import job_env_defaults
    base = launcher_env({"PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[2]), os.getcwd(), os.environ.get("PYTHONPATH")) if p)})
    for key, value in job_env_defaults(np).items():
        if env == "hvdtrain":
            base.setdefault(key, value)
        elif key not in os.environ:
            base.pop(key, None)
    return base


def launch(job: Job, s: dict[str, Any], run_dir: Path, timeout: float) -> list[dict[str, Any]]:
    """One job; every rank's record. RuntimeError with the output's tail when it fails."""
    import shutil
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    argv = ["hvdtrain.tools.bench_synthetic", "--worker", job.kind, str(run_dir), json.dumps({**s, "flags": job.flags})]
    cmd = (horovodrun_cmd(job.ranks, argv) if job.launcher == "horovodrun" else
           mpirun_args(job.ranks) + [sys.executable, "-m", "mpi4py", "-m", *argv] if job.launcher == "mpirun" else
           [sys.executable, "-m", *argv])
    print(f"$ {' '.join(cmd[:-1])} '{cmd[-1]}'", flush=True)
    result = run(cmd, timeout=timeout, env=job_env(job.env, job.ranks))
    (run_dir / "launch.log").write_text(result.stdout)
    files = [run_dir / f"rank-{r}.json" for r in range(job.ranks)]
    if result.returncode != 0 or not all(f.is_file() for f in files):
        tail = " | ".join(result.stdout.strip().splitlines()[-5:])
        raise RuntimeError(f"{job.label} at {job.ranks} rank(s) exited {result.returncode}: {tail}")
    return [json.loads(f.read_text()) for f in files]


def row_of(job: Job, records: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and 1.96 std over every rank's iterations (of every repeat); total = mean x ranks.
    `img_per_sec_per_rank_runs`: the same mean for each run alone (round i of the schedule)."""
    import numpy as np
    per_rank = [[v for rep in records for v in rep[r]["img_per_sec"]] for r in range(job.ranks)]
    values = np.array([v for rank in per_rank for v in rank])
    mean = float(values.mean())
    runs = [float(np.mean([v for rank in rep for v in rank["img_per_sec"]])) for rep in records]
    return {"strategy": job.label, "ranks": job.ranks, "launcher": job.launcher, "env": job.env,
            "img_per_sec_per_rank_mean": mean, "img_per_sec_per_rank_ci95": float(1.96 * values.std()),
            "img_per_sec_total": mean * job.ranks, "img_per_sec_by_rank": per_rank,
            "img_per_sec_per_rank_runs": runs,
            "threads": [records[0][r]["threads"] for r in range(job.ranks)]}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """vs_handwritten_horovod: total over the hand-written Horovod total (same rank count);
    vs_handwritten_horovod_env: the same against the hand-written loop run in hvdtrain's rank
    environment (the like-for-like comparison of the loops themselves); vs_plain: img/s per rank
    over the plain 1-rank loop's (the scaling efficiency). Each also as `*_interval`: the paired
    ratio over the runs (run i against run i), with its 95% interval."""
    hand = next((r for r in rows if r["strategy"] == HAND_HOROVOD), None)
    hand_env = next((r for r in rows if r["strategy"] == HAND_HOROVOD_ENV), None)
    plain = next((r for r in rows if r["strategy"] == PLAIN), None)

    def interval(r: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any] | None:
        a, b = r.get("img_per_sec_per_rank_runs"), base.get("img_per_sec_per_rank_runs") if base else None
        return ratio_summary(a, b) if a and b and len(a) == len(b) else None

    for r in rows:
        same = hand if hand and hand["ranks"] == r["ranks"] else None  # equal ranks: per rank = total ratio
        r["vs_handwritten_horovod"] = r["img_per_sec_total"] / same["img_per_sec_total"] if same else None
        r["vs_handwritten_horovod_interval"] = interval(r, same)
        same_env = hand_env if hand_env and hand_env["ranks"] == r["ranks"] else None
        r["vs_handwritten_horovod_env"] = r["img_per_sec_total"] / same_env["img_per_sec_total"] if same_env else None
        r["vs_handwritten_horovod_env_interval"] = interval(r, same_env)
        r["vs_plain"] = (r["img_per_sec_per_rank_mean"] / plain["img_per_sec_per_rank_mean"] if plain else None)
        r["vs_plain_interval"] = interval(r, plain)


COLUMNS = [("strategy", "strategy", "{}"), ("ranks", "ranks", "{}"), ("img/s per rank", "per_rank", "{}"),
           ("img/s total", "img_per_sec_total", "{:.1f}"), ("vs hand-written hvd [95% CI]", "hand_ci", "{}"),
           ("vs hand-written hvd, hvdtrain env [95% CI]", "hand_env_ci", "{}"),
           ("vs plain [95% CI]", "plain_ci", "{}")]


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    cells = [{**r, "per_rank": f"{r['img_per_sec_per_rank_mean']:.1f} +- {r['img_per_sec_per_rank_ci95']:.1f}",
              "hand_ci": format_ratio(r.get("vs_handwritten_horovod_interval"), 3) or None,
              "hand_env_ci": format_ratio(r.get("vs_handwritten_horovod_env_interval"), 3) or None,
              "plain_ci": format_ratio(r.get("vs_plain_interval"), 3) or None} for r in rows]
    return tables.format_table(COLUMNS, cells, markdown=markdown)


def probe(s: dict[str, Any]) -> int:
    """Build the model and run 2 images through it here, before any launch: a bad model, bad
    arguments or an input it cannot take is one line now. Returns the number of classes."""
    import torch
    from hvdtrain.plugins import describe_error
    model = build_model(s)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"--model {s['model']} returned {type(model).__name__}, not a torch.nn.Module; "
                          f"point it at a model class or factory")
    x = torch.randn(2, s["channels"], s["image_size"], s["image_size"])
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ConfigError(f"--model {s['model']} failed on input {tuple(x.shape)}: {describe_error(exc)}; "
                          f"match --channels/--image-size to the model") from None
    if not (isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == 2 and out.shape[1] >= 1):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"--model {s['model']} gave {shape} for 2 images; a classifier returning "
                          f"(batch, classes) logits is needed")
    return int(out.shape[1])


def build_parser() -> argparse.ArgumentParser:
    from hvdtrain.cli import Parser, json_arg
    p = Parser(prog="hvdtrain bench synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--np", type=int, default=2, help="ranks of every multi-rank row")
    p.add_argument("--model", default="hvdtrain.examples.resnet:resnet18", help="MODULE:ATTR of the model")
    p.add_argument("--model-args", type=json_arg, default={}, help="JSON keyword arguments for the model")
    p.add_argument("--batch-size", type=int, default=32, help="images per rank per step")
    p.add_argument("--image-size", type=int, default=224, help="S: images are CHANNELS x S x S")
    p.add_argument("--channels", type=int, default=3, help="input channels")
    p.add_argument("--num-warmup-batches", type=int, default=10)
    p.add_argument("--num-batches-per-iter", type=int, default=10)
    p.add_argument("--num-iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores // np)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per row, interleaved; iterations pooled, ratios get a 95%% interval (use >= 5)")
    p.add_argument("--strategies", default=None,
                   help="comma-separated rows to run (default all): registry names and the peers "
                        + ", ".join(PEERS))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    p.add_argument("--out", default="runs/bench-synthetic", help="folder for synthetic.json and the runs")
    p.add_argument("--oversubscribe", action="store_true",
                   help="run more than 8 ranks per core anyway (refused otherwise)")
    return p


def check(args: argparse.Namespace) -> tuple[dict[str, Any], list[Job]]:
    """Every argument checked before anything is launched (ConfigError: one line)."""
    for name in ("np", "batch_size", "image_size", "channels", "num_batches_per_iter", "num_iters", "repeat"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be >= 1, got {getattr(args, name)}; use e.g. {flag} 2")
    try:
        check_capacity(args.np, oversubscribe=args.oversubscribe)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.num_warmup_batches < 0 or args.threads < 0 or not args.timeout > 0:
        raise ConfigError(f"--num-warmup-batches and --threads must be >= 0 and --timeout > 0, got "
                          f"{args.num_warmup_batches}, {args.threads}, {args.timeout}; use e.g. 2, 0, 1800")
    selected = None
    if args.strategies is not None:
        selected = [x.strip() for x in args.strategies.split(",") if x.strip()]
        unknown = [x for x in selected if x not in strategy_names()] or ([] if selected else [args.strategies])
        if unknown:
            raise ConfigError(f"--strategies {args.strategies!r}: {unknown[0]!r} is unknown; use a comma-"
                              f"separated subset of {','.join(strategy_names())}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    s = {"model": args.model, "model_args": args.model_args, "batch_size": args.batch_size,
         "image_size": args.image_size, "channels": args.channels, "warmup": args.num_warmup_batches,
         "per_iter": args.num_batches_per_iter, "iters": args.num_iters,
         "threads": args.threads or max(1, cores // args.np), "seed": 0}
    s["num_classes"] = probe(s)
    selection = jobs(args.np, selected)
    for job in selection:
        if job.kind == "strategy":
            strategy_config(job.flags, s, args.out)  # the same validation the rank will do
    return s, selection


@ends_its_jobs("hvdtrain bench synthetic")
def main(argv: list[str]) -> int:
    from hvdtrain.comm.env import job_env_defaults
    from hvdtrain.tools.machine import machine
    args = build_parser().parse_args(argv)
    try:
        s, selection = check(args)
    except ConfigError as exc:
        sys.stderr.write(f"hvdtrain: error: {exc}\n")
        return 2
    out = Path(args.out).resolve()
    load_before = os.getloadavg()
    records: dict[str, list[list[dict[str, Any]]]] = {}
    failed: dict[str, str] = {}
    for rep, job in interleaved_order(selection, args.repeat):
        if job.label in failed:
            continue
        name = job.label.replace(" ", "-").translate(str.maketrans("", "", "=(),"))
        try:
            records.setdefault(job.label, []).append(
                launch(job, s, out / "runs" / f"{name}-r{rep}", args.timeout))
        except RuntimeError as exc:
            failed[job.label] = str(exc)
            records.pop(job.label, None)
    rows = [row_of(job, records[job.label]) for job in selection if job.label in records]
    add_ratios(rows)
    meta = {**machine(), "threads_per_rank": s["threads"], "load_before": load_before, "load_after": os.getloadavg(),
            "settings": {**vars(args), "num_classes": s["num_classes"], "threads_per_rank": s["threads"]},
            "command": shlex.join(["hvdtrain", "bench", "synthetic", *argv]), "rank_env": {
                "hvdtrain": {k: os.environ.get(k, v) for k, v in job_env_defaults(args.np).items()},
                "stock": {k: os.environ[k] for k in job_env_defaults(args.np) if k in os.environ}},
            "method": "Horovod pytorch_synthetic_benchmark.py: one fixed random batch, warm-up, then "
                      "iterations of K batches; mean and 1.96 std over every rank's iterations; ratios "
                      "also paired over interleaved runs: median and 95% bootstrap interval"}
    atomic_write_text(json.dumps({"meta": meta, "rows": rows, "failed": failed}, indent=2) + "\n",
                      out / "synthetic.json")
    print(f"\nhvdtrain bench synthetic: {args.model} {json.dumps(args.model_args)}, {args.np} ranks, batch "
          f"{args.batch_size}/rank, {args.channels}x{args.image_size}x{args.image_size}, {args.num_warmup_batches} "
          f"warm-up + {args.num_iters} x {args.num_batches_per_iter} batches, {s['threads']} thread(s)/rank, "
          f"{meta['cores']} cores\n{format_table(rows)}")
    for label, why in failed.items():
        sys.stderr.write(f"hvdtrain: error: run {why}; see {out}/runs/*/launch.log\n")
    print(f"\nwrote {out}/synthetic.json")
    return 1 if failed else 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(worker(argv[1:]) if argv[:1] == ["--worker"] else main(argv))
