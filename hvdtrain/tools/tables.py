"""The one table formatter of compare and the benchmarks: plain text (first column left-aligned,
the rest right-aligned) or Markdown."""
from __future__ import annotations

from typing import Any, Sequence

Column = tuple[str, str, str]  # (header, key in the row dict, format such as "{:.3f}")


def format_table(columns: Sequence[Column], rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    head = [name for name, _, _ in columns]
    cells = [[fmt.format(r[key]) if r.get(key) is not None else "n/a" for _, key, fmt in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    line = lambda cs: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cs, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in cells])
