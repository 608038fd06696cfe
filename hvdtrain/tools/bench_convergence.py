"""`hvdtrain bench convergence`: does the MPI fallback reach Horovod's held-out loss, and sooner?

A fixed matrix of workloads x learning rates x strategies; every cell is one `hvdtrain train`
run, launched as `hvdtrain compare` launches them (plus hvdtrain's MPI settings in the ranks'
environment, see rank_env), at equal samples (same epochs, batch per rank, seed, cosine lr) with `--eval-every E`, E a multiple of every strategy's k (and the warm-up a multiple
of k) so that the MPI fallback's replicas agree whenever they are evaluated. Per cell: the final
held-out loss (and accuracy), its gap to Horovod's, and the training seconds to reach Horovod's
final held-out loss (the first evaluation at or below it, interpolated linearly from the one
before; "never" if none), also as a ratio to Horovod's own time to that loss.

Workloads: cnn (digits CNN, adam), mlp (built-in regression, sgd + momentum), resnet (ResNet-18
on small generated images, sgd + momentum). Strategies: horovod; mpi k=1; mpi k=K; k=K after a
gradient warm-up (post-local SGD); k=K with an outer Nesterov optimizer (DiLoCo's lr 0.7,
momentum 0.9); k=K with warm-up and a tuned outer Nesterov; and, with --hosts-from-env (ranks
across the hosts in $HOSTS, e.g. from mpi_jobs/cluster_local.sh), the hierarchical 4,K, which on
one host would equal k=4. Writes OUT/convergence.json, OUT/convergence.md, OUT/loss_vs_time_*.png.
The table's "others %" is the share of the machine's CPU that other processes took during a run
(on the local cluster our ranks there count as ours, see cpu_seconds): a run with more than a
few percent was timed on a busy machine; --retry-busy runs such a (workload, lr) group again.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvdtrain import data as D
from hvdtrain.tools import tables
from hvdtrain.checkpoint import atomic_write_text
from hvdtrain.config import BY_KWARG, field_default
from hvdtrain.errors import ConfigError
from hvdtrain.strategies import STRATEGIES, Variant
from hvdtrain.tools.launch import check_capacity, ends_its_jobs

TUNED_OUTER = (1.0, 0.5)
"""Outer Nesterov lr, momentum of the tuned variant: with only tens of syncs per run DiLoCo's
0.7/0.9 (tuned for hundreds) overshoots; lr 1 keeps plain averaging's step, momentum 0.5 adds a
little (SlowMo's regime)."""


COSINE = ("--lr-schedule", "cosine")
"""Every workload decays its lr to 0: the final held-out loss settles instead of wobbling by
several percent between evaluations, so a 1% gap means something."""


@dataclass(frozen=True)
class Workload:
    flags: tuple[str, ...]      # model, data, optimizer: what `hvdtrain train` gets besides lr
    lrs: tuple[float, ...]
    epochs: int
    batch: int
    size: int                   # training rows (regression), images (resnet); 0: fixed (digits)
    env: dict[str, str] = field(default_factory=dict)


WORKLOADS = {
    "cnn": Workload(("--model", "hvdtrain.examples.digits_cnn:DigitsCNN",
                     "--data", "hvdtrain.examples.digits_cnn:digits_datasets", "--optimizer", "adam", *COSINE),
                    (0.001, 0.003), epochs=12, batch=32, size=0),
    "mlp": Workload(("--model", "mlp", "--hidden", "256,256", "--optimizer", "sgd", "--momentum", "0.9", *COSINE),
                    (0.01, 0.03), epochs=8, batch=64, size=32768),
    "resnet": Workload(("--model", "hvdtrain.examples.resnet:resnet18", "--model-args", '{"num_classes": 10}',
                        "--data", "hvdtrain.examples.images:image_datasets", "--optimizer", "sgd",
                        "--momentum", "0.9", *COSINE),
                       (0.01, 0.03), epochs=6, batch=32, size=2048, env={"HVDTRAIN_IMAGE_SIZE": "16"}),
}
TINY = {"cnn": dict(lrs=(0.003,), epochs=2, batch=32),
        "mlp": dict(lrs=(0.03,), epochs=3, batch=64, size=2048),
        "resnet": dict(lrs=(0.05,), epochs=3, batch=8, size=128, env={"HVDTRAIN_IMAGE_SIZE": "8"})}
TINY_K = 4


def train_rows(name: str, w: Workload) -> int:
    if name == "cnn":
        from hvdtrain.examples.digits_cnn import DigitsImages
        return len(DigitsImages("train"))
    return w.size


def total_steps(name: str, w: Workload, np: int) -> int:
    return D.steps_per_epoch(D.block_sizes(train_rows(name, w), np), w.batch) * w.epochs


def strategies(k: int, warmup: int, hierarchy: bool, tuned: tuple[float, float] = TUNED_OUTER,
               seconds: float = 0.0, eval_syncs: int = 1) -> list[tuple[str, Variant]]:
    """(key, variant) in run order, Horovod first: the others are judged against it. With
    `seconds` > 0 also time-based averaging every `seconds`, evaluated every `eval_syncs` syncs."""
    hvd, mpi = STRATEGIES["horovod"].launcher, STRATEGIES["mpi"].launcher
    periodic = ["--backend", "mpi", "--sync-every", str(k)]
    warm = ["--warmup-allreduce-steps", str(warmup)]
    out = [("horovod", Variant("horovod", hvd, ["--backend", "horovod"])),
           ("k1", Variant("mpi k=1", mpi, ["--backend", "mpi", "--sync-every", "1"])),
           ("k", Variant(f"mpi k={k}", mpi, periodic)),
           ("warmup", Variant(f"k={k} +warm-up", mpi, periodic + warm)),
           ("nesterov", Variant(f"k={k} +nesterov .7/.9", mpi, periodic + [
               "--outer-optimizer", "nesterov", "--outer-lr", "0.7", "--outer-momentum", "0.9"])),
           ("tuned", Variant(f"k={k} +warm-up +nesterov {tuned[0]:g}/{tuned[1]:g}", mpi, periodic + warm + [
               "--outer-optimizer", "nesterov", "--outer-lr", str(tuned[0]), "--outer-momentum", str(tuned[1])]))]
    if seconds > 0:
        timed = ["--backend", "mpi", "--sync-every-seconds", str(seconds), "--eval-every", str(eval_syncs)]
        out.append(("seconds", Variant(f"every {seconds:g} s", mpi, timed)))
        out.append(("seconds_nesterov", Variant(f"every {seconds:g} s +nesterov .7/.9", mpi, timed + [
            "--outer-optimizer", "nesterov", "--outer-lr", "0.7", "--outer-momentum", "0.9"])))
    if hierarchy:
        out.append(("hier", Variant(f"hier {max(1, k // 4)},{k}", mpi,
                                    ["--backend", "mpi", "--hierarchy", f"{max(1, k // 4)},{k}"])))
    return out


def throttled(flags: tuple[str, ...], factor: float, rank: int) -> tuple[str, ...]:
    """The workload's --model/--model-args wrapped so that `rank` runs `factor` times slower."""
    out, i, model, margs = [], 0, None, {}
    while i < len(flags):
        if flags[i] in ("--model", "--model-args"):
            model, margs = (flags[i + 1], margs) if flags[i] == "--model" else (model, json.loads(flags[i + 1]))
            i += 2
            continue
        out.append(flags[i])
        i += 1
    wrapped = {"model": model, "factor": factor, "rank": rank, "args": margs}
    return ("--model", "hvdtrain.examples.throttle:Throttled", "--model-args", json.dumps(wrapped), *out)


def multiple_of(k: int, value: float, lo: int) -> int:
    return max(lo, k * round(value / k))


# --- what the runs mean ---------------------------------------------------------------------------

def time_to(evals: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at which held-out loss first reaches `target`: linear between the first
    evaluation at or below it and the one before; None if no evaluation gets there."""
    prev = None
    for row in evals:
        if row["eval_loss"] is None:  # NaN at this evaluation: not there, and nothing to interpolate from
            prev = None
            continue
        if row["eval_loss"] <= target:
            if prev is None or prev["eval_loss"] == row["eval_loss"]:
                return float(row["train_seconds"])
            frac = (prev["eval_loss"] - target) / (prev["eval_loss"] - row["eval_loss"])
            return float(prev["train_seconds"] + frac * (row["train_seconds"] - prev["train_seconds"]))
        prev = row
    return None


def judge(cells: list[dict[str, Any]]) -> None:
    """Add gap and time-to-target fields to every cell, against its (workload, lr)'s Horovod."""
    base = {(c["workload"], c["lr"]): c for c in cells if c["key"] == "horovod" and c.get("evals")}
    for c in cells:
        hvd = base.get((c["workload"], c["lr"]))
        if not c.get("evals") or hvd is None:
            continue
        target = hvd["evals"][-1]["eval_loss"]
        if target is None:  # Horovod itself diverged: nothing to judge against
            continue
        final, hvd_time = c["evals"][-1], time_to(hvd["evals"], target)
        c["target_loss"], c["eval_loss"] = target, final["eval_loss"]
        c["diverged"] = final["eval_loss"] is None
        c["gap"] = None if c["diverged"] else (final["eval_loss"] - target) / target
        if final.get("eval_accuracy") is not None and hvd["evals"][-1].get("eval_accuracy") is not None:
            c["eval_accuracy"] = final["eval_accuracy"]
            c["accuracy_gap"] = final["eval_accuracy"] - hvd["evals"][-1]["eval_accuracy"]
        c["time_to_target"] = time_to(c["evals"], target)
        c["time_ratio"] = (None if c["time_to_target"] is None or not hvd_time
                           else c["time_to_target"] / hvd_time)


COLUMNS = [("workload", "workload", "{}"), ("lr", "lr", "{:g}"), ("strategy", "strategy", "{}"),
           ("eval loss", "eval_loss", "{:.5g}"), ("acc", "eval_accuracy", "{:.4f}"),
           ("gap %", "gap_pct", "{:+.2f}"), ("to target s", "to_target", "{}"), ("x horovod", "ratio", "{}"),
           ("train s", "train_seconds", "{:.2f}"), ("MB/rank", "mb", "{:.2f}"), ("others %", "others", "{:.0f}")]


def format_table(cells: list[dict[str, Any]], markdown: bool = False) -> str:
    rows = []
    for c in cells:
        never = "failed" if c.get("error") else "diverged" if c.get("diverged") else "never"
        t, r = c.get("time_to_target"), c.get("time_ratio")
        rows.append({**c, "gap_pct": None if c.get("gap") is None else 100 * c["gap"],
                     "to_target": never if t is None else f"{t:.2f}",
                     "ratio": never if r is None else f"{r:.2f}",
                     "mb": c["bytes_communicated"] / 1e6 if "bytes_communicated" in c else None,
                     "others": None if c.get("cpu_others") is None else 100 * c["cpu_others"]})
    return tables.format_table(COLUMNS, rows, markdown)


def goals(cells: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, per (workload, lr) and per strategy: gap within 1%, time ratio <= 0.5.
    How much Horovod's loss still moved over its last 3 evaluations says how much 1% can mean."""
    lines = []
    for w, lr in dict.fromkeys((c["workload"], c["lr"]) for c in cells):
        mine = [c for c in cells if (c["workload"], c["lr"]) == (w, lr) and c.get("target_loss") is not None]
        hvd = next((c for c in mine if c["key"] == "horovod"), None)
        if hvd is None:
            lines.append(f"{w} lr {lr:g}: no Horovod result to judge against")
            continue
        last = [e["eval_loss"] for e in hvd["evals"][-3:] if e["eval_loss"] is not None]
        fixes = [c for c in mine if c["key"] in ("warmup", "nesterov", "tuned") and c["gap"] is not None]
        best = min(fixes, key=lambda c: c["gap"], default=None)
        fast = min((c for c in mine if c["key"] != "horovod" and c["time_ratio"] is not None),
                   key=lambda c: c["time_ratio"], default=None)
        gap = "no k=K remedy ran" if best is None else (
            f"{'within' if best['gap'] <= 0.01 else 'NOT within'} 1%: best remedy {best['strategy']} "
            f"{100 * best['gap']:+.2f}%")
        speed = "nothing else reached its loss" if fast is None else (
            f"fastest to it {fast['strategy']} {fast['time_ratio']:.2f}x")
        lines.append(f"{w} lr {lr:g}: {gap}; {speed} (Horovod's loss moved "
                     f"{100 * (max(last) - min(last)) / last[-1]:.1f}% over its last 3 evaluations)")
        by_key = {c["key"]: c for c in mine}
        for timed, fixed in ((by_key.get("seconds"), by_key.get("k")),
                             (by_key.get("seconds_nesterov"), by_key.get("nesterov"))):
            if timed is None or fixed is None:
                continue
            t, f = timed["time_to_target"], fixed["time_to_target"]
            gaps = " vs ".join("diverged" if c["gap"] is None else f"{100 * c['gap']:+.2f}%" for c in (timed, fixed))
            lines.append(f"{w} lr {lr:g}: {timed['strategy']} vs {fixed['strategy']}: "
                         + (f"Horovod's loss {f / t:.2f}x sooner" if t and f else
                            f"time to Horovod's loss {'never' if t is None else f'{t:.2f} s'} vs "
                            f"{'never' if f is None else f'{f:.2f} s'}")
                         + f"; the same samples in {fixed['train_seconds'] / timed['train_seconds']:.2f}x less "
                           f"time; gap {gaps}")
            own = fixed["evals"][-1]["eval_loss"]  # equal accuracy: the fixed-k run's own final loss
            a, b = (time_to(c["evals"], own) if own is not None else None for c in (timed, fixed))
            lines.append(f"{w} lr {lr:g}: {timed['strategy']} reached {fixed['strategy']}'s final held-out loss "
                         + (f"{b / a:.2f}x sooner" if a and b else "never" if a is None else "(no time)"))
    for s in dict.fromkeys(c["strategy"] for c in cells if c["key"] != "horovod"):
        mine = [c for c in cells if c["strategy"] == s and c.get("target_loss") is not None]
        near = sum(c["gap"] is not None and c["gap"] <= 0.01 for c in mine)
        got = [c["time_ratio"] for c in mine if c["time_ratio"] is not None]
        lines.append(f"{s}: within 1% in {near}/{len(mine)} cells; reached Horovod's loss in {len(got)}/{len(mine)}"
                     + (f", time ratio <= 0.5 in {sum(r <= 0.5 for r in got)}" if got else ""))
    return lines


# --- running it -----------------------------------------------------------------------------------

def hosts_from_env(np: int) -> str:
    """$HOSTS (as cluster_local.sh exports it) with np spread evenly: H1:np/n,H2:np/n."""
    from hvdtrain.tools.launch import parse_hosts
    names = [h.strip().rsplit(":", 1)[0] for h in os.environ.get("HOSTS", "").split(",") if h.strip()]
    if not names:
        raise ValueError("--hosts-from-env needs $HOSTS (H1:slots,H2:slots); run "
                         "`eval \"$(mpi_jobs/cluster_local.sh up 2)\"` first, or drop --hosts-from-env")
    if np % len(names):
        raise ValueError(f"--np {np} does not spread evenly over the {len(names)} hosts in $HOSTS; "
                         f"use --np {len(names) * max(1, np // len(names))}")
    return parse_hosts(",".join(f"{h}:{np // len(names)}" for h in names), np)


def finite(x: Any) -> Any:
    """NaN/Inf (a diverged run) become None: convergence.json stays strict JSON."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of our finished runs): their
    difference over a run is what other processes took, i.e. how noisy its timing is. Ranks on
    the local cluster's hosts are not our children but those of the hosts' sshd daemons, whose
    reaped-children times (cutime, cstime) grow by exactly what each finished job used there."""
    import resource
    tick = os.sysconf("SC_CLK_TCK")
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / tick
    except (OSError, ValueError):
        busy = math.nan
    me = resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = me.ru_utime + me.ru_stime
    state = os.environ.get("HVDTRAIN_CLUSTER_DIR")  # set by `eval "$(mpi_jobs/cluster_local.sh up N)"`
    for pid_file in Path(state).glob("sshd-*.pid") if state else ():
        try:
            pid = pid_file.read_text().strip()
            for _ in range(40):  # a job's ssh sessions end just after mpirun: wait until sshd reaped them
                if not Path(f"/proc/{pid}/task/{pid}/children").read_text().strip():
                    break
                time.sleep(0.05)
            # /proc/PID/stat fields 14-17 (utime stime cutime cstime), counted after "(comm)"
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            mine += sum(int(x) for x in fields[11:15]) / tick
        except (OSError, ValueError, IndexError):
            pass
    return busy, mine


def busy(group: list[dict[str, Any]]) -> float:
    """The largest share of the CPU that other processes took during one of the group's runs."""
    return max((c.get("cpu_others") or 0.0 for c in group), default=0.0)


def rank_env(np: int, hosts: str | None) -> dict[str, str]:
    """hvdtrain's MPI settings for the ranks (comm.env.job_env_defaults; what the user exported wins), given
    at launch: `python -m mpi4py` starts MPI before hvdtrain could set them, so without this the
    MPI fallback would run without the yield-when-idle and allreduce settings Horovod gets."""
    from hvdtrain.comm.env import job_env_defaults
    return {k: v for k, v in job_env_defaults(np, hosts).items() if k not in os.environ}


def run_cell(v: Variant, np: int, argv: list[str], env: dict[str, str], hosts: str | None,
             run_dir: Path, log: Path, timeout: float) -> dict[str, Any]:
    from hvdtrain.tools.launch import horovodrun_cmd, launcher_env, mpirun_cmd, run
    argv = ["hvdtrain", "train", *argv, *v.flags, "--out", str(run_dir), "--overwrite"]
    if v.launcher == "horovodrun":
        cmd = horovodrun_cmd(np, argv, hosts=hosts)  # horovodrun forwards its whole environment
    else:  # mpirun forwards OMPI_* only: the workload's variables go to other hosts' ranks with -x
        cmd = mpirun_cmd(np, argv, hosts=hosts)
        cmd[1:1] = [a for var in env for a in ("-x", var)]
    print(f"$ {' '.join(cmd)}", flush=True)
    load, (total, mine), start = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
    result = run(cmd, timeout=timeout, env=launcher_env({**rank_env(np, hosts), "PYTHONUNBUFFERED": "1", **env}))
    (total2, mine2), seconds = cpu_seconds(), time.perf_counter() - start
    others = max(0.0, (total2 - total) - (mine2 - mine)) / (seconds * (os.cpu_count() or 1))
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(result.stdout)
    cell: dict[str, Any] = {"command": cmd, "load_before": load, "launch_seconds": seconds,
                            "cpu_others": finite(others)}
    if result.returncode != 0:
        tail = " | ".join(result.stdout.strip().splitlines()[-3:])
        return {**cell, "error": f"exited {result.returncode}: {tail}; see {log}"}
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [{k: finite(x) for k, x in json.loads(ln).items()}
             for ln in (run_dir / "evals.jsonl").read_text().splitlines() if ln.strip()]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ResNet-18's are ~180 MB a run; unused here
    keep = ("train_seconds", "wall_seconds", "samples", "steps", "bytes_communicated", "comm_seconds",
            "samples_per_sec")
    nan = sum(e.get("eval_loss") is None for e in evals)
    return {**cell, **{k: summary[k] for k in keep}, "evals": evals, "nan_evals": nan}


def plot(cells: list[dict[str, Any]], out: Path, title: str) -> list[str]:
    """One PNG per workload: held-out loss vs training seconds, one panel per lr, a line per strategy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = []
    for w in dict.fromkeys(c["workload"] for c in cells):
        lrs = list(dict.fromkeys(c["lr"] for c in cells if c["workload"] == w))
        fig, axes = plt.subplots(1, len(lrs), figsize=(6.5 * len(lrs), 4.8), squeeze=False)
        for ax, lr in zip(axes[0], lrs):
            mine = [c for c in cells if (c["workload"], c["lr"]) == (w, lr) and c.get("evals")]
            for i, c in enumerate(mine):
                ax.plot([e["train_seconds"] for e in c["evals"]],
                        [math.nan if e["eval_loss"] is None else e["eval_loss"] for e in c["evals"]],
                        label=c["strategy"], marker=".", linewidth=1.3, linestyle=("-", "--", ":", "-.")[i % 4])
            if mine and "target_loss" in mine[0]:
                ax.axhline(mine[0]["target_loss"], color="gray", linewidth=0.8, linestyle=":")
            if all(e["eval_loss"] is None or e["eval_loss"] > 0 for c in mine for e in c["evals"]):
                ax.set_yscale("log")
            ax.set(xlabel="training seconds (evaluations excluded)", ylabel="held-out loss", title=f"lr {lr:g}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{title}\n{w}: held-out loss vs training time (dotted: Horovod's final loss)", fontsize=9)
        fig.tight_layout()
        name = f"loss_vs_time_{w}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def build_parser() -> Any:
    from hvdtrain.cli import Parser
    p = Parser(prog="hvdtrain bench convergence", description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--lrs", default="", help="comma list: LR (every workload) or WORKLOAD=LR entries; "
                                             "default per workload (" + "; ".join(
                                                 f"{n} {','.join(map(str, w.lrs))}" for n, w in WORKLOADS.items()) + ")")
    p.add_argument("--epochs", type=int, default=0, help="epochs of every workload (0: each its own)")
    p.add_argument("--np", type=int, default=2, help="ranks per run")
    p.add_argument("--k", type=int, default=0, help=f"sync_every of the periodic strategies (default 16, {TINY_K} with --tiny)")
    p.add_argument("--warmup-fraction", type=float, default=0.25,
                   help="gradient warm-up as a share of the steps (rounded to a multiple of k)")
    p.add_argument("--eval-every", type=int, default=0, help="a multiple of k; 0: about --evals per run")
    p.add_argument("--evals", type=int, default=12, help="evaluations per run when --eval-every is 0")
    p.add_argument("--strategies", default="", help="comma list of keys to run (horovod always): "
                                                    "k1,k,warmup,nesterov,tuned,hier")
    p.add_argument("--tuned-outer", default=",".join(map(str, TUNED_OUTER)),
                   help="outer Nesterov LR,MOMENTUM of the `tuned` strategy")
    p.add_argument("--sync-seconds", type=float, default=0.0,
                   help="also run time-based averaging (--sync-every-seconds T; key `seconds`); 0: not")
    p.add_argument("--slow-rank-factor", type=float, default=0.0,
                   help="the last rank's steps take F times as long (hvdtrain.examples.throttle; cnn and "
                        "resnet only); 0: no rank slowed")
    p.add_argument("--seed", type=int, default=field_default(BY_KWARG["seed"]))
    p.add_argument("--out", default="runs/bench-convergence")
    p.add_argument("--tiny", action="store_true", help="CI settings: one lr, a few steps, small data, k=4")
    p.add_argument("--hosts-from-env", action="store_true",
                   help="run across the hosts in $HOSTS (mpi_jobs/cluster_local.sh up), np spread evenly; adds hier")
    p.add_argument("--network-label", default="", help="how the ranks are connected, for titles and JSON")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--retry-busy", type=float, default=0.0,
                   help="run a (workload, lr) group again when other processes took more than this share of "
                        "the CPU during one of its runs (0: never; e.g. 0.1 on a shared machine)")
    p.add_argument("--retries", type=int, default=2, help="most extra attempts per group for --retry-busy")
    p.add_argument("--oversubscribe", action="store_true",
                   help="run more than 8 ranks per core on a host anyway (refused otherwise)")
    return p


def settings(args: Any) -> tuple[dict[str, Workload], int]:
    """The workloads (with --tiny, --epochs, --lrs applied) and k; ValueError names the fix."""
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    bad = [n for n in names if n not in WORKLOADS]
    if not names or bad:
        raise ValueError(f"--workloads {args.workloads!r}: unknown {bad or 'empty'}; use a comma list of {', '.join(WORKLOADS)}")
    if args.np < 2 or args.epochs < 0 or args.evals < 1 or args.k < 0 or args.eval_every < 0 or args.seed < 0:
        raise ValueError(f"need --np >= 2, --epochs >= 0, --evals >= 1, --k >= 0, --eval-every >= 0, --seed >= 0 "
                         f"(got {args.np}, {args.epochs}, {args.evals}, {args.k}, {args.eval_every}, {args.seed}); "
                         f"e.g. --np 2 --epochs 3")
    if not 0 <= args.retry_busy < 1 or args.retries < 0:
        raise ValueError(f"--retry-busy {args.retry_busy} must be in [0, 1) and --retries {args.retries} >= 0; "
                         f"e.g. --retry-busy 0.1 --retries 2")
    if not (math.isfinite(args.sync_seconds) and args.sync_seconds >= 0) or not (
            args.slow_rank_factor == 0 or args.slow_rank_factor >= 1):
        raise ValueError(f"--sync-seconds {args.sync_seconds} must be >= 0 and --slow-rank-factor "
                         f"{args.slow_rank_factor} 0 or >= 1; e.g. --sync-seconds 0.5 --slow-rank-factor 2")
    if args.slow_rank_factor and "mlp" in names:
        raise ValueError("--slow-rank-factor wraps a MODULE:ATTR model; the mlp workload's is built in: "
                         "use --workloads cnn,resnet")
    if not 0 < args.warmup_fraction < 1:
        raise ValueError(f"--warmup-fraction {args.warmup_fraction} must be in (0, 1); e.g. 0.25")
    try:
        lr, mom = (float(x) for x in args.tuned_outer.split(","))
        assert lr > 0 and 0 <= mom < 1
        args.tuned_outer = (lr, mom)
    except (ValueError, AssertionError):
        raise ValueError(f"--tuned-outer {args.tuned_outer!r} is not LR,MOMENTUM with LR > 0 and 0 <= MOMENTUM < 1; "
                         f"e.g. --tuned-outer 1.0,0.5") from None
    k = args.k or (TINY_K if args.tiny else 16)
    if args.eval_every % k:
        raise ValueError(f"--eval-every {args.eval_every} is not a multiple of k={k}: replicas would be evaluated "
                         f"between syncs; use --eval-every {k * max(1, args.eval_every // k)}")
    chosen = {n: WORKLOADS[n] for n in names}
    if args.slow_rank_factor:
        chosen = {n: Workload(**{**w.__dict__, "flags": throttled(w.flags, args.slow_rank_factor, args.np - 1)})
                  for n, w in chosen.items()}
    if args.tiny:
        chosen = {n: Workload(**{**w.__dict__, **TINY[n]}) for n, w in chosen.items()}
    if args.epochs:
        chosen = {n: Workload(**{**w.__dict__, "epochs": args.epochs}) for n, w in chosen.items()}
    given: dict[str, list[float]] = {}
    for entry in (e.strip() for e in args.lrs.split(",") if e.strip()):
        name, _, value = entry.rpartition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = math.nan
        if (name and name not in chosen) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"--lrs entry {entry!r} is not LR or WORKLOAD=LR with LR > 0 and WORKLOAD one of "
                             f"{', '.join(chosen)}; e.g. --lrs 0.01,0.03 or --lrs cnn=0.003,mlp=0.03")
        for n in [name] if name else chosen:
            given.setdefault(n, []).append(lr)
    return {n: Workload(**{**w.__dict__, "lrs": tuple(given.get(n, w.lrs))}) for n, w in chosen.items()}, k


def plan_matrix(args: Any, out: Path) -> tuple[dict[str, Workload], int, str | None, dict[str, dict[str, Any]]]:
    """Workloads, k, hosts and per workload its steps, warm-up, eval period, flags and strategies;
    every run's `hvdtrain train` arguments are validated here (ValueError/ConfigError)."""
    from hvdtrain.cli import check_train_args
    workloads, k = settings(args)
    hosts = hosts_from_env(args.np) if args.hosts_from_env else None
    check_capacity(args.np, hosts, args.oversubscribe)
    keys = {key for key, _ in strategies(k, k, True, seconds=1.0)}
    wanted = {s.strip() for s in args.strategies.split(",") if s.strip()} | {"horovod"}
    if args.strategies and not wanted <= keys:
        raise ValueError(f"--strategies {args.strategies!r}: unknown {sorted(wanted - keys)}; use some of "
                         f"{', '.join(sorted(keys))}")
    if "seconds" in wanted and not args.sync_seconds:
        raise ValueError("--strategies seconds needs --sync-seconds T (e.g. 0.5)")
    plan = {}
    for name, w in workloads.items():
        steps = total_steps(name, w, args.np)
        if steps < 2 * k:
            raise ValueError(f"workload {name} has {steps} steps at --np {args.np}, fewer than 2 k = {2 * k}; "
                             f"use more --epochs or a smaller --k")
        warmup = min(multiple_of(k, args.warmup_fraction * steps, k), k * ((steps - 1) // k))
        every = args.eval_every or multiple_of(k, steps / args.evals, k)
        runs = [(key, v) for key, v in strategies(k, warmup, hosts is not None, args.tuned_outer,
                                                  args.sync_seconds, max(1, every // k))
                if not args.strategies or key in wanted]
        common = [*w.flags, "--epochs", str(w.epochs), "--batch-size", str(w.batch), "--seed", str(args.seed),
                  "--eval-every", str(every)]
        plan[name] = {"steps": steps, "warmup": warmup, "eval_every": every, "common": common, "runs": runs}
        # mlp: the runs read the folder main() writes once; checked here as the built-in set it holds
        data = ["--data", "regression", "--rows", str(w.size)] if name == "mlp" else []
        for lr in w.lrs:
            for _, v in runs:
                check_train_args([*common, *data, *v.flags, "--lr", str(lr), "--out", str(out)])
    return workloads, k, hosts, plan


def run_group(args: Any, name: str, lr: float, runs: list[tuple[str, Variant]], argv: list[str],
              env: dict[str, str], hosts: str | None, out: Path) -> list[dict[str, Any]]:
    """Every strategy at one (workload, lr); with --retry-busy again while others loaded the CPU."""
    tries: list[list[dict[str, Any]]] = []
    while not tries or (busy(tries[-1]) > args.retry_busy > 0 and len(tries) <= args.retries):
        if tries:
            print(f"# {name} lr {lr:g}: other processes took {100 * busy(tries[-1]):.0f}% of the CPU during a "
                  f"run; running the group again", flush=True)
        group = []
        for key, v in runs:
            slug = f"{name}/lr{lr:g}/{v.label.replace(' ', '_').replace('=', '').replace('/', '-')}"
            cell = run_cell(v, args.np, [*argv, "--lr", str(lr)], env, hosts, out / "runs" / slug,
                            out / "logs" / f"{slug.replace('/', '-')}.log", args.timeout)
            group.append({"workload": name, "lr": lr, "key": key, "strategy": v.label, "flags": v.flags,
                          "attempt": len(tries) + 1, **cell})
            if "error" in cell:
                sys.stderr.write(f"hvdtrain: {name} lr {lr:g} {v.label}: {cell['error']}\n")
        tries.append(group)
    return min(tries, key=busy)  # the quietest attempt: the same losses (seeded), cleaner times


@ends_its_jobs("hvdtrain bench convergence")
def main(argv: list[str]) -> int:
    from hvdtrain.tools.bench_allreduce import link_shaping
    from hvdtrain.tools.machine import machine
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()  # ranks (on other hosts too) get absolute paths
    try:  # everything is checked before anything is launched or written
        workloads, k, hosts, plan = plan_matrix(args, out)
    except (ValueError, ConfigError) as exc:
        sys.stderr.write(f"hvdtrain: error: {exc}\n")
        return 2
    shaping = link_shaping() if hosts else None
    label = args.network_label or (f"{hosts} ({shaping['summary'] if shaping else 'no cluster info'})"
                                   if hosts else "one host (shared memory)")
    load_before = os.getloadavg()
    cells: list[dict[str, Any]] = []
    for name, w in workloads.items():
        data = []
        if name == "mlp":  # written once here, not by every rank of every run
            folder = D.builtin_folder(out, "regression", w.size, args.seed)
            if not (folder / "meta.json").is_file():
                D.make_dataset("regression", folder, rows=w.size, seed=args.seed)
            data = ["--data", str(folder)]
        env = {**w.env, **({"HVDTRAIN_IMAGES": str(w.size)} if name == "resnet" else {})}
        for lr in w.lrs:
            cells += run_group(args, name, lr, plan[name]["runs"], [*plan[name]["common"], *data], env, hosts, out)
    judge(cells)
    title = (f"hvdtrain bench convergence: {args.np} ranks, {label}, k={k}, seed {args.seed}"
             + (" (tiny)" if args.tiny else ""))
    meta = {**machine(), "load_before": load_before, "load_after": os.getloadavg(),
            "network": {"label": label, "hosts": hosts or "local", "link_shaping": shaping},
            "rank_env": rank_env(args.np, hosts),
            "settings": {**vars(args), "k": k},
            "workloads": {n: {**w.__dict__, **{x: plan[n][x] for x in ("steps", "warmup", "eval_every", "common")},
                              "strategies": {key: v.flags for key, v in plan[n]["runs"]}}
                          for n, w in workloads.items()}}
    atomic_write_text(json.dumps({"meta": meta, "cells": cells}, indent=2) + "\n", out / "convergence.json")
    summary = goals(cells)
    print(f"\n{title}\n{format_table(cells)}\n\n" + "\n".join(summary))
    atomic_write_text(f"# {title}\n\n{format_table(cells, markdown=True)}\n\n" + "".join(f"- {s}\n" for s in summary)
                      + "".join(f"\n![{n}]({n})\n" for n in plot(cells, out, title)), out / "convergence.md")
    print(f"\nwrote {out}/convergence.json, {out}/convergence.md and plots")
    failed = [c for c in cells if "error" in c]
    if failed:
        sys.stderr.write(f"hvdtrain: error: {len(failed)} of {len(cells)} runs failed; see {out}/logs\n")
        return 1
    return 0
