"""`hvdtrain plan --validate [--hosts "$HOSTS"]`: the plan's predictions against real jobs.

The grid (issue 17): 1 host with 2 ranks, and 2 hosts of the local cluster with one core each
(`mpi_jobs/cluster_local.sh up 2`: network namespaces with sshd, each host pinned to its share of
the cores); the hosts' link unshaped, then `shape --rate` 1gbit, 200mbit, 50mbit; strategies
`horovod`, `mpi` k=1 and k=16; the built-in `mlp` on the built-in regression set (10 features, 1
output) at about 1M parameters (hidden 1000,1000) and 20M (3162,3162,3162). 6 one-host and 24
two-host configurations. `--tiny` (CI): one small MLP, horovod and mpi k=1 and k=4, unshaped only.

Per configuration: `hvdtrain train` with one torch thread per rank, batch VALIDATE_BATCH per rank, as
many steps as make about SECONDS_PER_RUN of training by the prediction (at least 8, and two syncs
of the largest k), `--rows` = steps x batch x ranks (one epoch). Measured: summary.json's
`samples_per_sec` (all ranks' samples over the training loop's seconds: start-up, data loading and
the final average and evaluation excluded). Every configuration of one link setting runs once per
round, rounds repeated `--repeats` times (interleaved: hvdtrain.tools.stats), the median kept.

Predicted: `hvdtrain plan`'s own functions with a profile calibrated on the same hosts (unshaped;
`--profile` to reuse one), its fits read at the model's gradient bytes (profile.fit_at), and each
model's compute measured here: the forward/backward/optimizer split timed in-process
(inputs.measure_compute), scaled to the step time of one-rank `hvdtrain train --backend single`
runs of the same model and batch (the loop's own costs included), two at once for the one-host
rows (their 2 ranks share the cores' memory bandwidth and cache), one for the two-host rows. A
shaped link is calibrated again under its shaping (bench allreduce across the hosts, sizes up to
about a second per allreduce: calibrate_link; OUT/profile-LINK.json), with the flag `--inter-gbit
RATE` on top (the slower of both, profile.py): shaped links deliver well under their nominal rate
here. Both Horovod overlap policies are predicted (`bucket`, the default, and `cycle`); errors use
the default.
Writes OUT/validate.json and prints predicted vs measured with the relative error of each, the
median |error| and the worst.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hvdtrain.errors import ConfigError
from hvdtrain.tools import tables
import hvdtrain.tools.plan.model as M
from hvdtrain.tools.stats import interleaved_order, median

FEATURES, OUTPUTS = 10, 1          # the built-in regression set
VALIDATE_BATCH = 64
SECONDS_PER_RUN = 20.0
MIN_STEPS, MAX_STEPS = 8, 4000
MODELS = {"mlp-1M": (1000, 1000), "mlp-20M": (3162, 3162, 3162)}
TINY_MODELS = {"mlp-tiny": (64, 64)}
LINKS: tuple[tuple[str, float | None], ...] = (("unshaped", None), ("1gbit", 1.0), ("200mbit", 0.2), ("50mbit", 0.05))
STRATEGIES: tuple[tuple[str, int | None], ...] = (("horovod", None), ("mpi k=1", 1), ("mpi k=16", 16))
TINY_STRATEGIES: tuple[tuple[str, int | None], ...] = (("horovod", None), ("mpi k=1", 1), ("mpi k=4", 4))
SHAPED_IMPLS = ("mpi4py", "hvdtrain-mpi", "horovod-mpi")
CLUSTER_SCRIPT = Path(__file__).resolve().parents[3] / "mpi_jobs" / "cluster_local.sh"


@dataclass(frozen=True)
class Config:
    link: str                 # "local" (one host: shared memory) or a LINKS label
    gbit: float | None        # the shaped rate (None: unshaped / local)
    hosts: int                # 1 (2 ranks) or 2 (one rank each)
    model: str
    hidden: tuple[int, ...]
    strategy: str
    k: int | None             # the MPI fallback's k; None for horovod

    @property
    def label(self) -> str:
        where = "1 host x2" if self.hosts == 1 else f"2 hosts {self.link}"
        return f"{where} {self.model} {self.strategy}"


def mlp_sizes(hidden: Sequence[int], features: int = FEATURES, outputs: int = OUTPUTS) -> tuple[int, ...]:
    """hvdtrain.models.MLP's parameter tensors in parameters() order (weight, bias per layer)."""
    sizes, width = [], features
    for h in (*hidden, outputs):
        sizes += [width * h, h]
        width = h
    return tuple(sizes)


def grid(two_hosts: bool, tiny: bool = False) -> list[Config]:
    """The configurations: one-host ones, then two-host ones per link setting (with `two_hosts`)."""
    models = TINY_MODELS if tiny else MODELS
    strategies = TINY_STRATEGIES if tiny else STRATEGIES
    links = LINKS[:1] if tiny else LINKS
    out = [Config("local", None, 1, m, h, s, k) for m, h in models.items() for s, k in strategies]
    if two_hosts:
        out += [Config(link, gbit, 2, m, h, s, k) for link, gbit in links for m, h in models.items()
                for s, k in strategies]
    return out


def predict(cfg: Config, compute: M.Compute, profile: dict[str, Any] | None, fusion: str = "bucket") -> dict[str, Any]:
    """The plan's samples/s and step seconds for one configuration (the same links, settings and
    model functions as `hvdtrain plan`; a shaped link is --inter-gbit on top of the profile)."""
    from hvdtrain.tools.plan.profile import DEFAULT_MEMCPY_GBPS, LinkFlags, strategy_links
    shape = M.ModelShape(mlp_sizes(cfg.hidden), 4, cfg.model)
    base = "horovod" if cfg.k is None else "mpi"
    links = strategy_links(base, cfg.hosts, profile, LinkFlags(inter_gbit=cfg.gbit), shape.nbytes)
    cl = M.Cluster(cfg.hosts, 2 if cfg.hosts == 1 else 1, links.intra, links.inter)
    memcpy = (profile or {}).get("memcpy_gbps") or DEFAULT_MEMCPY_GBPS
    st = M.Settings(memcpy_bytes_per_second=memcpy * 1e9, fusion=fusion, weighting_pass=links.weighting_pass)
    pred = M.horovod(shape, compute, cl, st) if cfg.k is None else M.mpi(shape, compute, cl, st, cfg.k)
    return {"samples_per_second": pred.samples_per_second, "step_seconds": pred.step_seconds,
            "comm_fraction": pred.exposed_comm_seconds / pred.step_seconds}


def steps_for(cfg: Config, step_seconds: float, tiny: bool, seconds: float = SECONDS_PER_RUN) -> int:
    """Steps for about SECONDS_PER_RUN of training: >= MIN_STEPS and two syncs, a multiple of k."""
    k = cfg.k or 1
    if tiny:
        return max(16, 2 * k)
    steps = int(min(MAX_STEPS, max(MIN_STEPS, 2 * k, seconds / max(step_seconds, 1e-6))))
    return -(-steps // k) * k


def host_spec(hosts: str) -> str:
    from hvdtrain.tools.plan.profile import one_per_host
    return one_per_host(hosts)[0]


def train_argv(cfg: Config | None, hidden: Sequence[int], steps: int, ranks: int, out: Path,
               backend: str) -> list[str]:
    argv = ["hvdtrain", "train", "--backend", backend, "--model", "mlp", "--hidden", ",".join(map(str, hidden)),
            "--data", "regression", "--rows", str(steps * VALIDATE_BATCH * ranks), "--batch-size", str(VALIDATE_BATCH),
            "--epochs", "1", "--threads", "1", "--seed", "0", "--out", str(out), "--overwrite"]
    if cfg is not None and cfg.k is not None:
        argv += ["--sync-every", str(cfg.k)]
    return argv


def run_train(argv: list[str], ranks: int, hosts: str | None, launcher: str, timeout: float,
              out: Path) -> dict[str, Any]:
    """One `hvdtrain train` job (launch.run: ended with this command); its summary."""
    from hvdtrain.tools.launch import horovodrun_cmd, launcher_env, mpirun_cmd, run
    if launcher == "python":
        cmd = [sys.executable, "-m", *argv]
    elif launcher == "horovodrun":
        cmd = horovodrun_cmd(ranks, argv, hosts=hosts)
    else:
        cmd = mpirun_cmd(ranks, argv, hosts=hosts)
    result = run(cmd, timeout=timeout, env=launcher_env({"OMP_NUM_THREADS": "1"}, np=ranks, hosts=hosts))
    out.mkdir(parents=True, exist_ok=True)
    (out / "launch.log").write_text(result.stdout)
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        tail = " | ".join(result.stdout.strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {result.returncode} without a summary: {tail}") from None
    if result.returncode != 0:
        raise RuntimeError(f"job in {out} exited {result.returncode}; see {out / 'launch.log'}")
    return summary


def shape_link(gbit: float | None, label: str) -> None:
    """The local cluster's links: `shape --rate LABEL`, or `unshape` (root; the cluster is up)."""
    cmd = ["bash", str(CLUSTER_SCRIPT), *(["unshape"] if gbit is None else ["shape", "--rate", label])]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed ({result.stderr.strip() or result.returncode}); is the "
                           f"local cluster up (`eval \"$(mpi_jobs/cluster_local.sh up 2)\"`, as root)?")


def single_rates(hidden: Sequence[int], steps: int, copies: int, out: Path, timeout: float) -> list[float]:
    """samples/s of `copies` one-rank `hvdtrain train --backend single` runs started together (one
    job: launch.run ends them all), one value per copy: with 2, each shares the host's cores, memory
    bandwidth and cache with the other, as each of 2 ranks on one host does."""
    from hvdtrain.tools.launch import launcher_env, run
    dirs = [out / f"c{i}" for i in range(copies)]
    cmds = [" ".join(shlex.quote(a) for a in [sys.executable, "-m", *train_argv(None, hidden, steps, 1, d, "single")])
            for d in dirs]
    script = " & ".join(cmds) + " & wait"
    result = run(["bash", "-c", script], timeout=timeout, env=launcher_env({"OMP_NUM_THREADS": "1"}))
    out.mkdir(parents=True, exist_ok=True)
    (out / "launch.log").write_text(result.stdout)
    rates = []
    for d in dirs:
        try:
            rates.append(json.loads((d / "summary.json").read_text())["samples_per_sec"])
        except (OSError, ValueError, KeyError):
            tail = " | ".join(result.stdout.strip().splitlines()[-5:])
            raise RuntimeError(f"one-rank compute run in {d} wrote no summary (exit {result.returncode}): {tail}") from None
    return rates


def model_compute(name: str, hidden: Sequence[int], out: Path, timeout: float, repeats: int,
                  tiny: bool = False, copies: int = 1) -> tuple[M.Compute, dict[str, Any]]:
    """One rank's compute for the grid: the in-process split scaled to the step of one-rank runs,
    `copies` of them at once (2 for the one-host rows, whose 2 ranks share the host; 1 for the
    two-host rows, one rank per host)."""
    from hvdtrain.tools.plan.inputs import measure_compute
    args = {"n_features": FEATURES, "n_outputs": OUTPUTS, "hidden": list(hidden)}
    split, record = measure_compute("mlp", args, VALIDATE_BATCH, threads=1, steps=5)
    steps = 16 if tiny else int(min(MAX_STEPS, max(MIN_STEPS, SECONDS_PER_RUN / 2 / split.step)))
    rates = []
    for r in range(repeats):
        rates += single_rates(hidden, steps, copies, out / f"single-{name}-x{copies}-{r}", timeout)
    step = VALIDATE_BATCH / median(rates)
    f = step / split.step
    compute = M.Compute(split.forward * f, split.backward * f, split.optimizer * f, VALIDATE_BATCH)
    return compute, {**record, "copies": copies, "single_rank_samples_per_sec": rates, "scale": f}


def link_bytes(gbit: float) -> int:
    """The largest calibration size on a shaped link: about one second per allreduce, 4 B x 4^i,
    at most 16 MiB (the model reads beyond it along the last segment: a shaped link is linear)."""
    limit, n = min(gbit * 1e9 / 8, 16 << 20), 4
    while n * 4 <= limit:
        n *= 4
    return n


def calibrate_link(prof: dict[str, Any], hosts_arg: str, gbit: float, label: str, out: Path,
                   timeout: float, tiny: bool) -> dict[str, Any]:
    """`prof` with its inter-node fits measured again on the shaped link (bench allreduce across
    the hosts as they are shaped now): shaped links deliver well under their nominal rate here
    (htb on the namespace veths), which a flag cannot know."""
    import hvdtrain.tools.plan.profile as P
    spread, n = P.one_per_host(hosts_arg)
    rows, meta = P.run_bench(out / f"calibrate-{label}", n, spread, 1 << 16 if tiny else link_bytes(gbit),
                             3 if tiny else 8, timeout, SHAPED_IMPLS)
    fits = P.fit_bench(rows)[0]
    return {**prof, "links": {**prof["links"], "inter": {**prof["links"].get("inter", {}), **fits}},
            "shaping": label, "sources": {**prof.get("sources", {}),
                                          "inter": {"bench": str(out / f"calibrate-{label}" / "allreduce.json"),
                                                    "np": n, "failed": meta.get("failed", {})}}}


COLUMNS = [("config", "label", "{}"), ("predicted", "predicted", "{:.4g}"), ("measured", "measured", "{:.4g}"),
           ("error", "error_pct", "{:+.1f}%"), ("runs", "nruns", "{}"), ("cycle pred.", "predicted_cycle", "{:.4g}")]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [abs(r["error"]) for r in results if r.get("error") is not None]
    worst = max(results, key=lambda r: abs(r["error"]) if r.get("error") is not None else -1, default=None)
    return {"configs": len(results), "measured": len(errors), "median_abs_error": median(errors) if errors else None,
            "worst_abs_error": max(errors) if errors else None, "worst": worst["label"] if worst else None}


def main_validate(args: argparse.Namespace) -> int:
    import hvdtrain.tools.plan.profile as P
    from hvdtrain.tools.plan.report import write_file
    if not args.seconds_per_run > 0:
        raise ConfigError(f"--seconds-per-run {args.seconds_per_run} must be > 0")
    if args.repeats < 1 or args.timeout <= 0:
        raise ConfigError(f"--repeats {args.repeats} must be >= 1 and --timeout {args.timeout} > 0")
    hosts = host_spec(args.hosts) if args.hosts else None
    out = Path(args.out or "plan-validate").resolve()
    configs = grid(hosts is not None, args.tiny)
    if hosts is not None:
        shape_link(None, "unshaped")
    prof = P.read_profile(args.profile) if args.profile else P.calibrate(
        out / "calibrate", 2, args.hosts, 1 << 20 if args.tiny else 64 << 20, iters=5 if args.tiny else 50,
        timeout=args.timeout)
    P.write_profile(prof, out / "profile.json")
    computes, records = {}, {}
    for name, hidden, copies in dict.fromkeys((c.model, c.hidden, 2 if c.hosts == 1 else 1) for c in configs):
        computes[name, copies], records[f"{name} x{copies}"] = model_compute(
            name, hidden, out / "runs", args.timeout, args.repeats, args.tiny, copies)
    results, profiles = [], {"local": prof, "unshaped": prof}
    by_label = {}
    try:
        for link in dict.fromkeys(c.link for c in configs):
            mine = [c for c in configs if c.link == link]
            if mine[0].hosts == 2:
                shape_link(mine[0].gbit, link)
                if mine[0].gbit is not None:
                    profiles[link] = calibrate_link(prof, args.hosts, mine[0].gbit, link, out / "calibrate",
                                                    args.timeout, args.tiny)
                    P.write_profile(profiles[link], out / f"profile-{link}.json")
            for c in mine:
                compute = computes[c.model, 2 if c.hosts == 1 else 1]
                pred = predict(c, compute, profiles[link])
                by_label[c.label] = {
                    "label": c.label, "config": c.__dict__, "profile": link,
                    "steps": steps_for(c, pred["step_seconds"], args.tiny, args.seconds_per_run),
                    "predicted": pred["samples_per_second"], "predicted_step_seconds": pred["step_seconds"],
                    "predicted_cycle": predict(c, compute, profiles[link], "cycle")["samples_per_second"]
                    if c.k is None else pred["samples_per_second"], "runs": []}
                results.append(by_label[c.label])
            for rep, c in interleaved_order(mine, args.repeats):
                r = by_label[c.label]
                ranks = 2
                run_dir = out / "runs" / c.label.replace(" ", "_").replace("=", "") / f"r{rep}"
                argv = train_argv(c, c.hidden, r["steps"], ranks, run_dir, "horovod" if c.k is None else "mpi")
                print(f"[plan] validate {c.label} (round {rep + 1}/{args.repeats}, {r['steps']} steps)", flush=True)
                summary = run_train(argv, ranks, hosts if c.hosts == 2 else None,
                                    "horovodrun" if c.k is None else "mpirun", args.timeout, run_dir)
                r["runs"].append(summary["samples_per_sec"])
    finally:
        if hosts is not None:
            shape_link(None, "unshaped")
    for r in results:
        r["measured"] = median(r["runs"]) if r["runs"] else None
        r["error"] = r["predicted"] / r["measured"] - 1 if r["measured"] else None
        r["error_pct"] = 100 * r["error"] if r["error"] is not None else None
        r["nruns"] = len(r["runs"])
    stats = summarize(results)
    print(tables.format_table(COLUMNS, results, args.markdown))
    if stats["median_abs_error"] is not None:
        print(f"\nmedian |error| {100 * stats['median_abs_error']:.1f}%, worst {100 * stats['worst_abs_error']:.1f}% "
              f"({stats['worst']}); {stats['measured']} of {stats['configs']} configurations measured")
    write_file(out / "validate.json", json.dumps({"summary": stats, "results": results, "compute": records,
                                                  "hosts": hosts, "profile": str(out / "profile.json"),
                                                  "tiny": args.tiny, "repeats": args.repeats},
                                                 indent=1, default=str) + "\n")
    print(f"[plan] wrote {out / 'validate.json'}")
    return 0 if not any(math.isnan(r["predicted"]) for r in results) else 1
