"""The user-facing error types and every exit code hvdtrain's commands and job scripts use (kept
here, at the bottom of the import graph, so every module and the slurm/ scripts read them from
one place: `python -c 'from hvdtrain.errors import EXIT_PREEMPTED; print(EXIT_PREEMPTED)'`)."""
from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Iterator

EXIT_OK = 0
"""The run finished."""
EXIT_FAILED = 1
"""A rank failed (an exception or a crash); the job was ended on every rank."""
EXIT_USAGE = 2
"""Bad input: a setting, a file or the launch; one line on stderr names the value and the fix."""
EXIT_NUMERICAL = 3
"""The loss became NaN/Inf; every rank stopped together."""
EXIT_WRITE = 74
"""A file could not be written (disk full, read-only, no permission, quota): one line names the
path and the reason; every rank stopped; the previous checkpoint is intact (74: sysexits' EX_IOERR)."""
EXIT_PREEMPTED = 99
"""SIGTERM/SIGUSR1 (preemption, a time limit) or Ctrl-C: every rank stopped at the same step and a
checkpoint was written; resume with --resume."""
EXIT_INTERRUPTED = 130
"""A second Ctrl-C: stopped at once, without a new checkpoint (the last one stays); 128 + SIGINT."""

EXIT_CODES = {"done": EXIT_OK, "a rank failed": EXIT_FAILED, "bad input": EXIT_USAGE,
              "NaN/Inf": EXIT_NUMERICAL, "write failed": EXIT_WRITE, "preempted": EXIT_PREEMPTED,
              "interrupted": EXIT_INTERRUPTED}
"""What each exit code means, as the README's `Exit codes:` line lists them."""


class ConfigError(ValueError):
    """A user-facing configuration error: one line naming the value and the fix.

    The CLI prints it and exits EXIT_USAGE (2); `hvdtrain.fit` raises it on every rank.
    """


class WriteError(OSError):
    """A file of the run (checkpoint, metrics, summary, model, plots, TensorBoard) could not be
    written. `str()` is the one line to print: the path, the reason and what to do.

    An OSError (errno, strerror and filename are the failed write's), so code that catches OSError
    around `hvdtrain.fit` still catches it. The CLI prints it and exits EXIT_WRITE; in a multi-rank
    job it is raised on every rank together (`everywhere`), so no rank waits for the one that failed.
    """

    def __init__(self, path: str, code: int | None, reason: str, message: str, everywhere: bool = False) -> None:
        super().__init__(code, reason, path)
        self.path, self.reason, self.message, self.everywhere = path, reason, message, everywhere

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # type: ignore[no-untyped-def]  (OSError's would drop the message)
        return type(self), (self.path, self.errno, self.reason, self.message, self.everywhere)


_FIXES = {errno.ENOSPC: "free space or choose another --out",
          errno.EDQUOT: "free space within your quota or choose another --out",
          errno.EROFS: "choose another --out on a writable file system",
          errno.EACCES: "make it writable for this user or choose another --out",
          errno.EPERM: "make it writable for this user (or not immutable) or choose another --out"}


def write_error(path: str | Path, exc: OSError) -> WriteError:
    """The WriteError for `exc` raised while writing `path`: 'cannot write PATH: REASON (ENAME); FIX'."""
    code = exc.errno
    reason = exc.strerror or str(exc) or type(exc).__name__
    name = f" ({errno.errorcode[code]})" if code in errno.errorcode else ""
    fix = _FIXES.get(code, "check the file system or choose another --out")  # type: ignore[arg-type]
    return WriteError(str(path), code, reason, f"cannot write {path}: {reason}{name}; {fix}")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Around a write of `path`: an OSError becomes the WriteError naming `path`."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise write_error(path, exc) from None
