"""What `hvdtrain plan` prints and writes: the table, crossovers, recommendations, PNG and JSON.

- table: one row per strategy and node count (tables.format_table);
- crossovers: for each strategy against Horovod (flat), the first node count at which it has more
  samples/s (at the given links), and for each node count above one the fastest inter-node link
  (of a sweep, fastest first) at which it does, each with the ratio of samples/s there;
- recommendations: per node count the strategy with the most samples/s, and when that one
  averages parameters every k > 1 steps (or on time) the fastest synchronous one too: k-step
  averaging changes what a sample buys (convergence per sample is `hvdtrain bench convergence`'s
  question, not the plan's);
- PNG: scaling efficiency vs ranks, one line per strategy (matplotlib, imported here only);
- JSON: {"meta": inputs, "rows": [...], "crossovers": [...], "recommendations": [...]}.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from hvdtrain.tools import tables

REFERENCE = "horovod"


def write_file(path: str | Path, data: str | bytes | Callable[[Any], None]) -> None:
    """Write `path` whole or not at all (a temporary file beside it, renamed when complete): text,
    bytes, or a callable that writes to the open binary file. A failure is a WriteError naming the
    path. (hvdtrain.checkpoint's writers load torch, which a plan never needs.)"""
    import os
    import tempfile

    from hvdtrain.errors import writing
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                if callable(data):
                    data(f)
                else:
                    f.write(data.encode() if isinstance(data, str) else data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
ROW_KEYS = ("strategy", "nodes", "ranks", "step_seconds", "samples_per_second", "efficiency",
            "comm_fraction", "inter_bytes_per_step")
COLUMNS = [("strategy", "strategy", "{}"), ("nodes", "nodes", "{}"), ("ranks", "ranks", "{}"),
           ("step s", "step_seconds", "{:.4g}"), ("samples/s", "samples_per_second", "{:.4g}"),
           ("efficiency", "efficiency_pct", "{:.1f}%"), ("comm", "comm_pct", "{:.1f}%"),
           ("inter MB/step/node", "inter_mb", "{:.3g}")]


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    shown = [{**r, "efficiency_pct": 100 * r["efficiency"], "comm_pct": 100 * r["comm_fraction"],
              "inter_mb": r["inter_bytes_per_step"] / 1e6} for r in rows]
    return tables.format_table(COLUMNS, shown, markdown)


def _by(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["strategy"], r["nodes"]): r for r in rows}


def node_crossovers(rows: Sequence[dict[str, Any]], reference: str = REFERENCE) -> list[dict[str, Any]]:
    """Per strategy: the first node count where it beats `reference` in samples/s (or never)."""
    by = _by(rows)
    nodes = sorted({r["nodes"] for r in rows})
    out = []
    for name in dict.fromkeys(r["strategy"] for r in rows):
        if name == reference:
            continue
        hit = next((n for n in nodes if (name, n) in by and (reference, n) in by
                    and by[name, n]["samples_per_second"] > by[reference, n]["samples_per_second"]), None)
        ratio = by[name, hit]["samples_per_second"] / by[reference, hit]["samples_per_second"] if hit else None
        out.append({"kind": "nodes", "strategy": name, "over": reference, "nodes": hit,
                    "ratio": ratio, "from_first": hit == nodes[0] if hit is not None else False})
    return out


def link_crossovers(evaluate: Callable[[float], Sequence[dict[str, Any]]], speeds: Sequence[float],
                    reference: str = REFERENCE) -> list[dict[str, Any]]:
    """`evaluate(gbit)` gives the rows at that inter-node link speed. Per strategy and node count
    above one: the fastest speed (scanning `speeds` from fast to slow) at which it beats
    `reference`, with the ratio there, or None."""
    speeds = sorted(set(speeds), reverse=True)
    tables_ = {g: _by(evaluate(g)) for g in speeds}
    first = tables_[speeds[0]]
    pairs = sorted({(name, n) for name, n in first if n > 1 and name != reference}, key=lambda x: (x[1], x[0]))
    out = []
    for name, n in pairs:
        def ahead(g: float) -> bool:
            t = tables_[g]
            return ((reference, n) in t and (name, n) in t
                    and t[name, n]["samples_per_second"] > t[reference, n]["samples_per_second"])
        hit = next((g for g in speeds if ahead(g)), None)
        ratio = (tables_[hit][name, n]["samples_per_second"] / tables_[hit][reference, n]["samples_per_second"]
                 if hit is not None else None)
        out.append({"kind": "link", "strategy": name, "over": reference, "nodes": n, "inter_gbit": hit,
                    "ratio": ratio, "from_first": hit == speeds[0] if hit is not None else False,
                    "speeds": speeds})
    return out


def crossover_lines(crossovers: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for c in crossovers:
        if c["kind"] == "nodes":
            if c["nodes"] is None:
                lines.append(f"{c['strategy']}: never faster than {c['over']} at these node counts")
            else:
                when = "already at" if c["from_first"] else "from"
                lines.append(f"{c['strategy']}: faster than {c['over']} {when} {c['nodes']} node(s), "
                             f"{c['ratio']:.2f}x its samples/s there")
        else:
            if c["inter_gbit"] is None:
                lines.append(f"{c['strategy']} at {c['nodes']} nodes: not faster than {c['over']} down to "
                             f"{min(c['speeds']):g} Gbit/s")
            else:
                when = "even at" if c["from_first"] else "at or below"
                lines.append(f"{c['strategy']} at {c['nodes']} nodes: faster than {c['over']} {when} "
                             f"{c['inter_gbit']:g} Gbit/s inter-node ({c['ratio']:.2f}x there)")
    return lines


def recommendations(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per node count: the fastest strategy; the fastest synchronous one when they differ."""
    out = []
    for n in sorted({r["nodes"] for r in rows}):
        mine = [r for r in rows if r["nodes"] == n]
        best = max(mine, key=lambda r: r["samples_per_second"])
        sync = [r for r in mine if r.get("synchronous")]
        best_sync = max(sync, key=lambda r: r["samples_per_second"]) if sync else None
        text = (f"{n} node(s), {best['ranks']} ranks: {best['strategy']} "
                f"({best['samples_per_second']:.4g} samples/s, efficiency {100 * best['efficiency']:.0f}%)")
        if best_sync is not None and best_sync is not best:
            text += (f", {best['samples_per_second'] / best_sync['samples_per_second']:.2f}x the fastest "
                     f"synchronous one ({best_sync['strategy']}, {100 * best_sync['efficiency']:.0f}%) if its "
                     f"convergence per sample holds (check with `hvdtrain bench convergence`)")
        out.append({"nodes": n, "ranks": best["ranks"], "strategy": best["strategy"],
                    "synchronous": best_sync["strategy"] if best_sync else None, "text": text})
    return out


def write_json(path: str | Path, meta: dict[str, Any], rows: Sequence[dict[str, Any]],
               crossovers: Sequence[dict[str, Any]], recs: Sequence[dict[str, Any]]) -> None:
    write_file(path, json.dumps({"meta": meta, "rows": list(rows), "crossovers": list(crossovers),
                                 "recommendations": list(recs)}, indent=1, default=str) + "\n")


def plot_efficiency(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> None:
    """Efficiency vs ranks, one line per strategy (log2 ranks)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ("-", "--", ":", "-.")
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for i, name in enumerate(dict.fromkeys(r["strategy"] for r in rows)):
            mine = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["ranks"])
            ax.plot([r["ranks"] for r in mine], [100 * r["efficiency"] for r in mine], marker="o", ms=3,
                    linestyle=styles[i % len(styles)], label=name)
        ranks = sorted({r["ranks"] for r in rows})
        if len(ranks) > 1 and ranks[0] > 0:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ranks)
            ax.set_xticklabels([str(r) for r in ranks])
        ax.set_xlabel("ranks (nodes x ranks per node)")
        ax.set_ylabel("scaling efficiency (%) vs ranks x one rank without communication")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        write_file(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
