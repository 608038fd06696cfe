"""Per-step metrics (OUT/metrics.jsonl), the run summary (OUT/summary.json), TensorBoard event
files (OUT/tensorboard, with --tensorboard) and the progress display: a tqdm bar when stderr is a
terminal, a line every 2 s otherwise (logs, batch jobs).

Only rank 0 writes; other ranks build a `MetricsLog(enabled=False)` and every call is a no-op.

A write that fails (disk full, read-only, no permission, quota) does not raise where it happens:
the log keeps the WriteError in `error` and writes nothing more, and the loop raises it on every
rank at the ranks' next meeting point (train._flush), so rank 0 never leaves the others waiting.
Appends that fail are cut back to the last whole line. TensorBoard writes in a background thread
of its own: its OSError reaches the next add/flush here (and its thread's traceback is silenced),
so it too ends the run with one line; a TensorBoard event file may then end in a torn record,
which TensorBoard's reader skips.
"""
from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from hvdtrain.checkpoint import append_text, atomic_write_text
from hvdtrain.errors import WriteError, writing


def _kept_lines(path: Path, resume_step: int) -> list[str]:
    """Lines of a JSONL file up to the step we resume from (a torn last line is dropped)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue
    return kept


_previous_hook = threading.excepthook


def _quiet_tensorboard(args: Any) -> None:
    """threading.excepthook: TensorBoard's writer thread's OSError is reported by MetricsLog as one
    line when the next add/flush raises it, not as a traceback of its own."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
        return
    _previous_hook(args)


class MetricsLog:
    def __init__(self, out: str | Path, enabled: bool, total_steps: int, resume_step: int = 0,
                 stream: TextIO | None = None, tensorboard: bool = False) -> None:
        self.enabled, self.total_steps = enabled, total_steps
        self.path = Path(out) / "metrics.jsonl"
        self.stream = stream if stream is not None else sys.stderr
        self._last_print = 0.0
        self._bar: Any = None
        self._tb: Any = None
        self._step = resume_step
        self.error: WriteError | None = None
        """The first write that failed (the loop raises it on every rank), else None."""
        self.evals_path = self.path.with_name("evals.jsonl")
        self.tb_path = Path(out) / "tensorboard"
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # checked at start-up (tensorboard_error)
            global _previous_hook
            if threading.excepthook is not _quiet_tensorboard:
                _previous_hook, threading.excepthook = threading.excepthook, _quiet_tensorboard
            self._try(self.tb_path, lambda: setattr(self, "_tb", SummaryWriter(
                str(self.tb_path), purge_step=resume_step + 1 if resume_step else None)))
        if self.stream.isatty():
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total_steps, initial=resume_step, file=self.stream, unit="step",
                                 dynamic_ncols=True, leave=True)
            except ImportError:
                self._bar = None
        for path in (self.path, self.evals_path):  # drop lines past the checkpoint we resume from
            self._try(path, lambda path=path: atomic_write_text("".join(
                line + "\n" for line in (_kept_lines(path, resume_step) if resume_step and path.is_file() else [])),
                path))

    @property
    def failed(self) -> bool:
        return self.error is not None

    def _try(self, path: Path, write: Callable[[], None]) -> None:
        """Run a write of `path` unless one failed already; a failure is kept in `error` and ends
        this log's writing (the loop raises it on every rank)."""
        if self.error is not None:
            return
        try:
            with writing(path):
                write()
        except WriteError as exc:
            self.error = exc
            self._close_quietly()

    def _tb_file(self) -> Path:
        """The TensorBoard event file being written (for messages), else its folder."""
        name = getattr(getattr(getattr(self._tb, "file_writer", None), "event_writer", None), "_file_name", None)
        return Path(name) if isinstance(name, str) else self.tb_path

    def evaluation(self, step: int, train_seconds: float, result: dict[str, float]) -> None:
        """One held-out evaluation (OUT/evals.jsonl): the step, training seconds so far, loss/accuracy."""
        if not self.enabled or not result or self.error is not None:
            return
        self._try(self.evals_path, lambda: append_text(
            json.dumps({"step": step, "train_seconds": train_seconds, **result}) + "\n", self.evals_path))
        if self._tb is not None:
            self._try(self._tb_file(), lambda: self._scalars(
                [(f"eval/{key.removeprefix('eval_')}", value, step) for key, value in result.items()]))

    def _scalars(self, values: list[tuple[str, float, int]]) -> None:
        for tag, value, step in values:
            self._tb.add_scalar(tag, value, step)
        self._tb.flush()  # hvdtrain: written now, so a failure shows at the loop's next meeting point

    def steps(self, rows: list[dict[str, Any]]) -> None:
        if not self.enabled or not rows:
            return
        self._try(self.path, lambda: append_text("".join(json.dumps(r) + "\n" for r in rows), self.path))
        if self._tb is not None:
            self._try(self._tb_file(), lambda: self._scalars(
                [(tag, r[key], r["step"]) for r in rows for tag, key in
                 (("train/loss", "loss"), ("train/samples_per_sec", "samples_per_sec"),
                  ("comm/seconds", "comm_seconds"), ("comm/bytes_per_step", "bytes_sent"))
                 if r[key] is not None]))  # comm seconds: None where not measured (DDP)
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

    def _close_quietly(self) -> None:
        """After a failed write: let go of the files (their errors are the one already kept)."""
        tb, self._tb = self._tb, None
        if tb is not None:
            with contextlib.suppress(Exception):
                tb.close()

    def close(self) -> None:
        """Close the files; never raises (everything was flushed at the last meeting point, and
        a failure here is kept in `error`)."""
        if self._tb is not None:
            self._try(self._tb_file(), self._tb.close)
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def write_summary(out: str | Path, data: dict[str, Any]) -> None:
    """OUT/summary.json (rank 0): the run's last record (WriteError if it cannot be written)."""
    atomic_write_text(json.dumps(data, indent=2) + "\n", Path(out) / "summary.json")


def tensorboard_error() -> str | None:
    """Why --tensorboard cannot work here, or None."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (only: can it import)
    except ImportError as exc:
        return (f"--tensorboard needs the tensorboard package ({exc}); run `make install` or "
                f"`pip install tensorboard`")
    return None
