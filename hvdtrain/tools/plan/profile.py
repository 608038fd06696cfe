"""The profile file of `hvdtrain plan`: what `--calibrate` measured, read back by `--profile FILE`.

`--calibrate` runs `hvdtrain bench allreduce` (as a job of its own, ended with this command) on
this host (`--calibrate-np` ranks: the intra-node link, shared memory here) and, with `--hosts`,
across those hosts with one rank each (the inter-node link), then fits per implementation
    t(n) = a + b n
to its rows (p50 seconds of an in-place allreduce of n bytes over p ranks), by least squares on
the relative error (weights 1/t, so 4 B and 64 MiB count alike). A ring allreduce costs
2(p-1) alpha + 2(p-1)/p n beta, so the fit gives the per-step latency alpha = a / (2(p-1)) and
the per-byte time beta = b p / (2(p-1)) of that implementation on that link: its software costs
(copies, reduction, Python) are in them, which is what the model needs. Horovod's rows start
with one HOROVOD_CYCLE_TIME wait that the overlap model adds itself, so that is taken off a
first (not below raw MPI's a). memcpy's rows give the memory bandwidth of the model's passes
(median busbw from 1 MiB up). With `--model`, one rank's compute is measured too (inputs).

File (JSON): {"hvdtrain_plan_profile": 1, "date", "machine": (hvdtrain.tools.machine.machine()), "hosts",
"shaping", "links": {"intra"|"inter": {IMPL: {alpha_us, gbit, np, points, a_us, b_s_per_byte,
max_rel_error, curve: [[bytes, p50 seconds], ...]}}}, "memcpy_gbps", "compute": {...} or null,
"sources": {...}}. The plan reads a fit at the model's gradient bytes (fit_at): alpha from the
line, beta from the measured curve at that size, because the line misses large sizes by up to 2x.

Which fit a strategy uses (STRATEGY_IMPLS, first present): horovod -> horovod-mpi, horovod-gloo,
mpi4py-tuned, mpi4py; ddp -> torch-gloo, mpi4py; mpi -> hvdtrain-mpi (FlatAverager.sync as
training runs it, weighting pass included, so the model adds none), mpi4py-tuned, mpi4py.
Flags and the profile: a link flag (--inter-gbit, --inter-latency-us, ...) is what the wire
allows; a fit is what the software achieved on the link it was measured on; a step pays the
slower of the two, term by term (Link.floor). So `--profile P --inter-gbit 0.2` predicts the
calibrated hosts on a 200 Mbit/s link, and a profile measured on a slow link cannot predict a
faster one: calibrate on the fastest link you have. Without a fit for a link, the flags (or
DEFAULT_LINKS) alone describe it. Every other flag (memcpy, compute) replaces the profile's value.
"""
from __future__ import annotations

import datetime
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hvdtrain.errors import ConfigError
from hvdtrain.tools.machine import machine
from hvdtrain.tools.plan.model import HOROVOD_CYCLE_SECONDS, Link

VERSION = 1
KEY = "hvdtrain_plan_profile"
DEFAULT_LINKS = {"intra": (40.0, 2.0), "inter": (10.0, 25.0)}
"""(Gbit/s, latency us) when neither a flag nor a profile describes a link: shared memory as
`bench allreduce` measures it on this kind of host (~5 GB/s busbw) and 10 Gbit Ethernet over TCP."""
DEFAULT_MEMCPY_GBPS = 10.0
STRATEGY_IMPLS: dict[str, tuple[str, ...]] = {
    "horovod": ("horovod-mpi", "horovod-gloo", "mpi4py-tuned", "mpi4py"),
    "ddp": ("torch-gloo", "mpi4py"),
    "mpi": ("hvdtrain-mpi", "mpi4py-tuned", "mpi4py"),
}
CALIBRATE_IMPLS = ("mpi4py", "mpi4py-tuned", "hvdtrain-mpi", "horovod-mpi", "torch-gloo", "memcpy")
WEIGHTING_INCLUDED = "hvdtrain-mpi"


# ---- fitting ----------------------------------------------------------------------------------

def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """(a, b, worst relative error) of t = a + b n over (n, t) points, least squares on t's
    relative error; a >= 0 and b >= 0 (a negative one is refitted as 0)."""
    import numpy as np
    pts = [(float(n), float(t)) for n, t in points if t > 0]
    if len(pts) < 2:
        raise ValueError(f"need at least 2 sizes to fit latency and bandwidth, got {len(pts)}")
    n = np.array([p[0] for p in pts])
    t = np.array([p[1] for p in pts])
    w = 1.0 / t
    A = np.stack([np.ones_like(n), n], axis=1) * w[:, None]
    a, b = np.linalg.lstsq(A, t * w, rcond=None)[0]
    if a < 0:
        a, b = 0.0, float(np.sum(n * t * w * w) / np.sum(n * n * w * w))
    if b < 0:
        a, b = float(np.sum(t * w * w) / np.sum(w * w)), 0.0
    worst = float(np.max(np.abs(a + b * n - t) / t))
    return float(a), float(b), worst


def fit_impl(rows: Sequence[dict[str, Any]], impl: str, floor_a: float | None = None) -> dict[str, Any]:
    """Per-step alpha and beta of one implementation from its bench rows (all of one np)."""
    mine = [r for r in rows if r.get("impl") == impl]
    p = int(mine[0]["np"])
    if p < 2:
        raise ValueError(f"{impl}: rows of {p} rank(s) say nothing about a link")
    a, b, worst = fit_line([(r["bytes"], r["p50_us"] * 1e-6) for r in mine])
    a_fit = a
    if impl.startswith("horovod"):
        a = max(a - HOROVOD_CYCLE_SECONDS, floor_a if floor_a is not None else 0.0, 0.0)
    alpha = a / (2 * (p - 1))
    beta = b * p / (2 * (p - 1))
    curve = sorted((float(r["bytes"]), r["p50_us"] * 1e-6) for r in mine if r["p50_us"] > 0)
    return {"alpha_us": alpha * 1e6, "gbit": 8.0 / (beta * 1e9) if beta > 0 else 1e6, "np": p,
            "points": len(mine), "a_us": a_fit * 1e6, "b_s_per_byte": b, "max_rel_error": worst,
            "curve": [[n, t] for n, t in curve],
            **({"cycle_subtracted_us": HOROVOD_CYCLE_SECONDS * 1e6} if impl.startswith("horovod") else {})}


def fit_bench(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], float | None]:
    """({impl: fit} for every multi-rank implementation in a bench's rows, memcpy GB/s or None)."""
    fits: dict[str, dict[str, Any]] = {}
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    raw_a = None
    if "mpi4py" in impls:
        raw_a = fit_line([(r["bytes"], r["p50_us"] * 1e-6) for r in rows if r["impl"] == "mpi4py"])[0]
    for impl in impls:
        if impl == "memcpy":
            continue
        try:
            fits[impl] = fit_impl(rows, impl, raw_a)
        except (ValueError, KeyError):
            continue
    big = sorted(r["busbw_gbps"] for r in rows if r["impl"] == "memcpy" and r["bytes"] >= 1 << 20)
    memcpy = big[len(big) // 2] if big else None
    return fits, memcpy


# ---- the file ---------------------------------------------------------------------------------

def new_profile() -> dict[str, Any]:
    return {KEY: VERSION, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "hosts": None, "shaping": None, "links": {"intra": {}, "inter": {}},
            "memcpy_gbps": None, "compute": None, "sources": {}}


def read_profile(path: str | Path) -> dict[str, Any]:
    """The profile at `path`; ConfigError (one line) if it is missing or not one."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--profile {path}: no such file; write one with `hvdtrain plan --calibrate "
                          f"--profile-out {path}`") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--profile {path}: cannot read it as JSON ({exc}); write it again with "
                          f"`hvdtrain plan --calibrate`") from None
    if not isinstance(data, dict) or data.get(KEY) != VERSION or not isinstance(data.get("links"), dict):
        raise ConfigError(f"--profile {path} is not an hvdtrain plan profile (version {VERSION}); write one "
                          f"with `hvdtrain plan --calibrate`")
    for kind in ("intra", "inter"):
        for impl, fit in (data["links"].get(kind) or {}).items():
            if not (isinstance(fit, dict) and _positive(fit.get("gbit")) and _nonneg(fit.get("alpha_us"))):
                raise ConfigError(f"--profile {path}: links.{kind}.{impl} needs gbit > 0 and alpha_us >= 0, got "
                                  f"{fit!r}; calibrate again")
            curve = fit.get("curve")
            if curve is not None and not (isinstance(curve, list) and all(
                    isinstance(pt, list) and len(pt) == 2 and _positive(pt[0]) and _positive(pt[1]) for pt in curve)):
                raise ConfigError(f"--profile {path}: links.{kind}.{impl}.curve must be [[bytes, seconds], ...] with "
                                  f"both > 0; calibrate again")
    if data.get("memcpy_gbps") is not None and not _positive(data["memcpy_gbps"]):
        raise ConfigError(f"--profile {path}: memcpy_gbps must be > 0, got {data['memcpy_gbps']!r}")
    return data


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and x == x and x != float("inf")


def _nonneg(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 and x == x and x != float("inf")


def write_profile(profile: dict[str, Any], path: str | Path) -> None:
    from hvdtrain.tools.plan.report import write_file
    write_file(path, json.dumps(profile, indent=1) + "\n")


# ---- links for a strategy -------------------------------------------------------------------

@dataclass(frozen=True)
class LinkFlags:
    """The link flags as given (None: not given)."""
    intra_gbit: float | None = None
    intra_latency_us: float | None = None
    inter_gbit: float | None = None
    inter_latency_us: float | None = None
    efficiency: float = 1.0

    def given(self, kind: str) -> tuple[float | None, float | None]:
        return (getattr(self, f"{kind}_gbit"), getattr(self, f"{kind}_latency_us"))


def curve_seconds(curve: Sequence[Sequence[float]], n: float) -> float:
    """The measured allreduce seconds at `n` bytes: linear between the two sizes around it, the
    last (first) segment's slope beyond the largest (below the smallest)."""
    pts = sorted((float(a), float(t)) for a, t in curve)
    if len(pts) == 1:
        return pts[0][1]
    i = next((j for j in range(1, len(pts)) if pts[j][0] >= n), len(pts) - 1)
    (n0, t0), (n1, t1) = pts[i - 1], pts[i]
    return max(t0 + (t1 - t0) * (n - n0) / (n1 - n0), 0.0) if n1 > n0 else t1


def fit_at(fit: dict[str, Any], message_bytes: float | None) -> Link:
    """A fit's link, with beta read off its measured curve at `message_bytes` when it has one: the
    fit's intercept a plus b_local n meets the measured seconds at that size, so the model at the
    calibrated rank count reproduces the curve there (a line over 4 B-64 MiB misses large sizes by
    up to 2x on this kind of host). Without a size or a curve: the fitted line."""
    alpha = fit["alpha_us"] * 1e-6
    beta = 8.0 / (fit["gbit"] * 1e9)
    curve, p = fit.get("curve"), int(fit.get("np") or 2)
    if message_bytes and message_bytes > 0 and curve and len(curve) >= 2 and p >= 2:
        b_local = (curve_seconds(curve, message_bytes) - fit.get("a_us", 0.0) * 1e-6) / message_bytes
        if b_local > 0:
            beta = b_local * p / (2 * (p - 1))
    return Link(alpha, beta)


def link_for(kind: str, strategy: str, profile: dict[str, Any] | None, flags: LinkFlags,
             message_bytes: float | None = None) -> tuple[Link, str]:
    """The link `strategy` sees for `kind` ("intra" or "inter") and where it came from; with
    `message_bytes` (the model's gradient bytes) a calibrated fit is read at that size (fit_at)."""
    gbit, latency = flags.given(kind)
    d_gbit, d_latency = DEFAULT_LINKS[kind]
    fits = (profile or {}).get("links", {}).get(kind) or {}
    impl = next((i for i in STRATEGY_IMPLS.get(strategy, ()) if i in fits), None)
    if impl is None:
        link = Link.from_gbit(gbit if gbit is not None else d_gbit, latency if latency is not None else d_latency,
                              flags.efficiency)
        return link, "flags" if (gbit is not None or latency is not None) else "default"
    link = fit_at(fits[impl], message_bytes)
    if gbit is not None or latency is not None:
        wire = Link.from_gbit(gbit if gbit is not None else 1e9, latency if latency is not None else 0.0,
                              flags.efficiency)
        return link.floor(wire), f"profile {impl} + flags"
    return link, f"profile {impl}"


def weighting_included(strategy: str, source: str) -> bool:
    """Whether the fit `source` already holds the MPI fallback's weighting pass."""
    return strategy == "mpi" and source.startswith(f"profile {WEIGHTING_INCLUDED}")


@dataclass(frozen=True)
class StrategyLinks:
    intra: Link
    inter: Link
    intra_source: str
    inter_source: str
    weighting_pass: bool   # the MPI fallback's weighting pass still to add (not in the fit)


def strategy_links(strategy: str, nodes: int, profile: dict[str, Any] | None, flags: LinkFlags,
                   message_bytes: float | None = None) -> StrategyLinks:
    """Both links of `strategy` on `nodes` nodes (fits read at `message_bytes`); the weighting pass
    is in the fit when the link that paces the allreduce (inter-node on more than one node) is
    hvdtrain-mpi's own fit."""
    intra, intra_src = link_for("intra", strategy, profile, flags, message_bytes)
    inter, inter_src = link_for("inter", strategy, profile, flags, message_bytes)
    pacing = inter_src if nodes > 1 else intra_src
    return StrategyLinks(intra, inter, intra_src, inter_src, not weighting_included(strategy, pacing))


# ---- calibration ------------------------------------------------------------------------------

def one_per_host(hosts: str) -> tuple[str, int]:
    """`--hosts` with one slot per host (the inter-node fit is for one rank per node) and the count."""
    from hvdtrain.tools.launch import parse_hosts
    try:
        names = [h.rsplit(":", 1)[0] for h in parse_hosts(hosts).split(",")]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if len(names) < 2:
        raise ConfigError(f"--hosts {hosts!r} names one host; the inter-node link needs two or more, e.g. "
                          f"--hosts 198.18.0.1,198.18.0.2")
    return ",".join(f"{h}:1" for h in names), len(names)


def bench_command(out: Path, np: int, hosts: str | None, max_bytes: int, iters: int, timeout: float,
                  impls: Sequence[str]) -> list[str]:
    cmd = [sys.executable, "-m", "hvdtrain", "bench", "allreduce", "--np", str(np), "--out", str(out),
           "--impls", ",".join(impls), "--max-bytes", str(max_bytes), "--iters", str(iters),
           "--timeout", str(timeout)]
    return cmd + (["--hosts", hosts, "--label", "plan --calibrate"] if hosts else [])


def run_bench(out: Path, np: int, hosts: str | None, max_bytes: int, iters: int, timeout: float,
              impls: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`hvdtrain bench allreduce` as a job of this command (launch.run: ended with it); its rows
    and meta. A failed implementation costs its rows only; no rows at all is a RuntimeError."""
    from hvdtrain.tools.launch import launcher_env, run
    cmd = bench_command(out, np, hosts, max_bytes, iters, timeout, impls)
    print(f"[plan] $ {' '.join(cmd)}", flush=True)
    result = run(cmd, timeout=timeout * (len(impls) + 1), env=launcher_env())
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan-calibrate.log").write_text(result.stdout)
    try:
        data = json.loads((out / "allreduce.json").read_text())
    except (OSError, ValueError):
        tail = " | ".join(result.stdout.strip().splitlines()[-5:])
        raise RuntimeError(f"bench allreduce wrote no results (exit {result.returncode}): {tail}") from None
    if not data.get("rows"):
        raise RuntimeError(f"bench allreduce measured nothing (exit {result.returncode}); see {out}/logs")
    return data["rows"], data.get("meta", {})


def calibrate(out: Path, np: int = 2, hosts: str | None = None, max_bytes: int = 64 << 20, iters: int = 50,
              timeout: float = 900.0, impls: Sequence[str] = CALIBRATE_IMPLS) -> dict[str, Any]:
    """Measure and fit: a new profile (without compute; the caller adds it)."""
    profile = new_profile()
    rows, meta = run_bench(out / "intra", np, None, max_bytes, iters, timeout, impls)
    fits, memcpy = fit_bench(rows)
    profile["links"]["intra"] = fits
    profile["memcpy_gbps"] = memcpy
    profile["sources"]["intra"] = {"bench": str(out / "intra" / "allreduce.json"), "np": np,
                                   "failed": meta.get("failed", {})}
    if hosts:
        spread, n = one_per_host(hosts)
        rows, meta = run_bench(out / "inter", n, spread, max_bytes, iters, timeout,
                               [i for i in impls if i != "memcpy"])
        profile["links"]["inter"] = fit_bench(rows)[0]
        profile["hosts"] = spread
        links = meta.get("links") or {}
        profile["shaping"] = links.get("summary") if isinstance(links, dict) else None
        profile["sources"]["inter"] = {"bench": str(out / "inter" / "allreduce.json"), "np": n,
                                       "failed": meta.get("failed", {})}
    return profile
