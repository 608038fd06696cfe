"""Plots for `hvdtrain compare`: loss vs step, loss vs training time, cumulative bytes vs step.

One PNG per view, every strategy a line, so the cost of each strategy (time, bytes) sits next
to what it buys (loss). Titles carry the rank count and the run settings because a PNG is
often looked at without its report. matplotlib is imported here only; `hvdtrain compare`
skips the plots when it is missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from hvdtrain.checkpoint import atomic_write  # noqa: E402
from hvdtrain.errors import writing  # noqa: E402

Series = tuple[list[float], list[float]]
STYLES = ("-", "--", ":", "-.")


def settings_line(summary: dict[str, Any]) -> str:
    """The settings a reader needs to interpret a curve, from a run's summary.json."""
    cfg = summary.get("config", {})
    model, optim = cfg.get("model", {}), cfg.get("optim", {})
    name = model.get("name", "?")
    if name == "mlp":
        name += " " + ",".join(str(h) for h in model.get("hidden", ()))
    return (f"{summary.get('world_size', '?')} ranks, {name}, batch {cfg.get('batch_size', '?')}/rank, "
            f"{optim.get('name', '?')} lr {optim.get('lr', '?')}, {cfg.get('epochs', '?')} epoch(s), "
            f"{summary.get('threads_per_rank', '?')} thread(s)/rank")


def step_seconds(summary: dict[str, Any], row: dict[str, Any]) -> float:
    """Seconds one step took: samples per step / the window's samples/s (all ranks together)."""
    cfg = summary.get("config", {})
    micro = cfg.get("sync", {}).get("backward_passes_per_step", 1)
    per_step = cfg.get("batch_size", 1) * micro * summary.get("world_size", 1)
    rate = row.get("samples_per_sec") or 0.0
    return per_step / rate if rate > 0 else 0.0


def cumulative(values: Sequence[float]) -> list[float]:
    total, out = 0.0, []
    for v in values:
        total += v
        out.append(total)
    return out


def loss_vs_step(r: dict[str, Any]) -> Series:
    return [m["step"] for m in r["metrics"]], [m["loss"] for m in r["metrics"]]


def loss_vs_time(r: dict[str, Any]) -> Series:
    seconds = cumulative([step_seconds(r["summary"], m) for m in r["metrics"]])
    return seconds, [m["loss"] for m in r["metrics"]]


def bytes_vs_step(r: dict[str, Any]) -> Series:
    mb = cumulative([m.get("bytes_sent", 0) / 1e6 for m in r["metrics"]])
    return [m["step"] for m in r["metrics"]], mb


VIEWS: list[tuple[str, str, str, str, Callable[[dict[str, Any]], Series], bool]] = [
    # (file, heading, x label, y label, series, log y)
    ("loss_vs_step.png", "training loss vs step", "step", "loss (mean over ranks)", loss_vs_step, True),
    ("loss_vs_time.png", "training loss vs training time", "seconds (sum of step times)",
     "loss (mean over ranks)", loss_vs_time, True),
    ("bytes_vs_step.png", "bytes sent per rank (cumulative) vs step", "step", "MB sent by one rank",
     bytes_vs_step, False),
]


def compare_plots(results: list[dict[str, Any]], out: Path, title: str) -> list[str]:
    """Write one PNG per view into `out`; return their file names (for report.md links). Each PNG
    is written beside its name and renamed when complete; a failed write is a WriteError."""
    out = Path(out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in results if r.get("metrics")]
    if not runs:
        return []
    settings = settings_line(runs[0]["summary"])
    names = []
    for name, heading, xlabel, ylabel, series, log_y in VIEWS:
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, r in enumerate(runs):  # line styles differ so identical curves (k=1 vs Horovod) both show
            x, y = series(r)
            ax.plot(x, y, label=r["label"], linewidth=1.4, linestyle=STYLES[i % len(STYLES)])
        positive = all(v > 0 for r in runs for v in series(r)[1])
        if log_y and positive:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{heading}; {settings}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            atomic_write(out / name, "wb", lambda f: fig.savefig(f, format="png", dpi=100))
        finally:
            plt.close(fig)
        names.append(name)
    return names
