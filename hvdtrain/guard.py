"""Failing fast instead of hanging: startup agreement between ranks and a collective watchdog."""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable

from hvdtrain.errors import ConfigError


def disagreements(records: list[dict[str, Any]]) -> list[str]:
    """Fields where some rank's record differs from rank 0's, as 'field: rank 0 has X, rank 2 has Y'."""
    problems = []
    for key in sorted(set().union(*records)):
        values = [rec.get(key) for rec in records]
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            others = ", ".join(f"rank {r} has {values[r]!r}" for r in odd[:3])
            problems.append(f"{key}: rank 0 has {values[0]!r}, {others}")
    return problems


def check_agreement(records: list[dict[str, Any]]) -> None:
    """Every rank calls this with the allgathered records, so every rank raises the same error."""
    problems = disagreements(records)
    if problems:
        raise ConfigError(f"ranks disagree before training ({'; '.join(problems)}); start every rank "
                          f"with the same config, code and data")


class Watchdog:
    """Ends the job when one guarded call (a collective) takes longer than `timeout` seconds.

    A rank that died or stalls leaves the others waiting in a collective forever; the watchdog
    turns that into a one-line message and `on_timeout` (the backend's abort) within the timeout.
    """

    def __init__(self, timeout: float, rank: int, on_timeout: Callable[[int], None]) -> None:
        self.timeout, self.rank, self.on_timeout = timeout, rank, on_timeout
        self._since: float | None = None
        self._what = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="hvdtrain-watchdog", daemon=True)
            self._thread.start()

    def guard(self, what: str) -> "Watchdog":
        self._what = what
        return self

    def __enter__(self) -> "Watchdog":
        self._since = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self._since = None

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout:
                sys.stderr.write(f"hvdtrain: error (rank {self.rank}): {self._what} did not complete within "
                                 f"{self.timeout:g} s (another rank died or stalled); ending the job. Raise "
                                 f"--collective-timeout if steps are legitimately this slow\n")
                sys.stderr.flush()
                self.on_timeout(1)
                return

    def close(self) -> None:
        self._stop.set()
