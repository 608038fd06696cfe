"""Per-step metrics (OUT/metrics.jsonl), the run summary (OUT/summary.json) and the progress line.

Only rank 0 writes; other ranks build a `MetricsLog(enabled=False)` and every call is a no-op.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from hvdtrain.checkpoint import atomic_write_text


class MetricsLog:
    def __init__(self, out: str | Path, enabled: bool, total_steps: int, resume_step: int = 0,
                 stream: TextIO | None = None) -> None:
        self.enabled, self.total_steps = enabled, total_steps
        self.path = Path(out) / "metrics.jsonl"
        self.stream = stream if stream is not None else sys.stderr
        self._last_print = 0.0
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step and self.path.is_file():  # drop lines past the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        atomic_write_text("".join(line + "\n" for line in kept), self.path)
        self._file = self.path.open("a")

    def steps(self, rows: list[dict[str, Any]]) -> None:
        if not self._file or not rows:
            return
        self._file.write("".join(json.dumps(r) + "\n" for r in rows))
        self._file.flush()
        self._progress(rows[-1])

    def _progress(self, row: dict[str, Any]) -> None:
        now = time.monotonic()
        done = row["step"] >= self.total_steps
        if not done and now - self._last_print < 2.0:
            return
        self._last_print = now
        width = 24
        filled = int(width * row["step"] / max(1, self.total_steps))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] step {row['step']}/{self.total_steps} "
                f"epoch {row['epoch']} loss {row['loss']:.5g} {row['samples_per_sec']:.0f} samples/s")
        tty = self.stream.isatty()
        self.stream.write(("\r" + line + ("\n" if done else "")) if tty else line + "\n")
        self.stream.flush()

    def summary(self, data: dict[str, Any]) -> None:
        if self.enabled:
            atomic_write_text(json.dumps(data, indent=2) + "\n", self.path.parent / "summary.json")

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
