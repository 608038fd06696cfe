"""Per-step metrics (OUT/metrics.jsonl), the run summary (OUT/summary.json), TensorBoard event
files (OUT/tensorboard, with --tensorboard) and the progress display: a tqdm bar when stderr is a
terminal, a line every 2 s otherwise (logs, batch jobs).

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
                 stream: TextIO | None = None, tensorboard: bool = False) -> None:
        self.enabled, self.total_steps = enabled, total_steps
        self.path = Path(out) / "metrics.jsonl"
        self.stream = stream if stream is not None else sys.stderr
        self._last_print = 0.0
        self._file = None
        self._bar: Any = None
        self._tb: Any = None
        self._step = resume_step
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # checked at start-up (tensorboard_error)
            self._tb = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if self.stream.isatty():
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total_steps, initial=resume_step, file=self.stream, unit="step",
                                 dynamic_ncols=True, leave=True)
            except ImportError:
                self._bar = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step and self.path.is_file():  # drop lines past the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        atomic_write_text("".join(line + "\n" for line in kept), self.path)
        self._file = self.path.open("a")
        self.evals_path = self.path.with_name("evals.jsonl")
        kept = []
        if resume_step and self.evals_path.is_file():
            kept = [line for line in self.evals_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        atomic_write_text("".join(line + "\n" for line in kept), self.evals_path)

    def evaluation(self, step: int, train_seconds: float, result: dict[str, float]) -> None:
        """One held-out evaluation (OUT/evals.jsonl): the step, training seconds so far, loss/accuracy."""
        if not self.enabled or not result:
            return
        with self.evals_path.open("a") as f:
            f.write(json.dumps({"step": step, "train_seconds": train_seconds, **result}) + "\n")
        if self._tb is not None:
            for key, value in result.items():
                self._tb.add_scalar(f"eval/{key.removeprefix('eval_')}", value, step)

    def steps(self, rows: list[dict[str, Any]]) -> None:
        if not self._file or not rows:
            return
        self._file.write("".join(json.dumps(r) + "\n" for r in rows))
        self._file.flush()
        if self._tb is not None:
            for r in rows:
                self._tb.add_scalar("train/loss", r["loss"], r["step"])
                self._tb.add_scalar("train/samples_per_sec", r["samples_per_sec"], r["step"])
                self._tb.add_scalar("comm/seconds", r["comm_seconds"], r["step"])
                self._tb.add_scalar("comm/bytes_per_step", r["bytes_sent"], r["step"])
            self._tb.flush()
        if self._bar is not None:
            last = rows[-1]
            self._bar.update(last["step"] - self._step)
            self._bar.set_postfix(epoch=last["epoch"], loss=f"{last['loss']:.4g}",
                                  samples_s=f"{last['samples_per_sec']:.0f}", refresh=False)
            self._step = last["step"]
        else:
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

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file:
            self._file.close()
            self._file = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def write_summary(out: str | Path, data: dict[str, Any]) -> None:
    """OUT/summary.json (rank 0): the run's last record."""
    atomic_write_text(json.dumps(data, indent=2) + "\n", Path(out) / "summary.json")


def tensorboard_error() -> str | None:
    """Why --tensorboard cannot work here, or None."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (only: can it import)
    except ImportError as exc:
        return (f"--tensorboard needs the tensorboard package ({exc}); run `make install` or "
                f"`pip install tensorboard`")
    return None
