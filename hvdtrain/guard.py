"""Failing fast instead of hanging: startup agreement between ranks and a collective watchdog."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
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


def end_job_after_error(rank: int, size: int, abort: Callable[[int], None], code: int,
                        collective_timeout: float = 0.0) -> None:
    """Call inside `except`: an exception hvdtrain did not turn into a ConfigError (the user's model,
    Dataset or loss raised while training; or a bug) keeps its traceback, where one debugs it,
    printed once for the whole job with one line after it; then every rank is ended.

    Rank 0 prints at once; the others wait a few seconds first. When the same error hit every rank
    (the usual case: the same code on the same kind of data), rank 0's abort ends them before they
    repeat it (and Open MPI prints its MPI_ABORT banner once); when it hit other ranks only, the
    lowest of them prints. A rank whose collective failed because another rank died (Horovod shut
    down, a peer's connection closed) waits for the launcher to end it, and prints one line only if
    it is not ended. The waits stay under the watchdog's timeout, so a rank waiting for the failed
    one in a collective does not end the job first with a message that hides the error."""
    exc = sys.exc_info()[1]
    consequence = exc is not None and _peer_failed(exc)
    if size > 1 and (rank != 0 or consequence):
        _quiet_on_termination(code)  # the launcher ends the others after an abort: print nothing then
        wait = 10.0 if consequence else min(5.0 + 0.5 * (rank - 1), 10.0)
        time.sleep(min(wait, collective_timeout / 2) if collective_timeout > 0 else wait)
    if consequence:
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        sys.stderr.write(f"hvdtrain: rank {rank}: the job's communication failed ({type(exc).__name__}: "
                         f"{text}); another rank or its host ended first, see its output; ending the job\n")
    else:
        traceback.print_exc()
        sys.stderr.write(f"hvdtrain: rank {rank} failed; ending the job\n")
    sys.stderr.flush()
    abort(code)


#: what a collective raises on the ranks left behind when another rank died (not their own error)
_PEER_FAILURE_TYPES = ("HorovodInternalError",)
_PEER_FAILURE_TEXT = ("Horovod has been shut down", "Connection reset by peer", "Connection closed by peer")


def _peer_failed(exc: BaseException) -> bool:
    return type(exc).__name__ in _PEER_FAILURE_TYPES or any(t in str(exc) for t in _PEER_FAILURE_TEXT)


def _quiet_on_termination(code: int) -> None:
    """While a failed rank waits: SIGTERM (how mpirun and horovodrun end the other ranks after an
    abort; Open MPI sends SIGKILL only odls_base_sigkill_timeout s later), SIGINT or SIGHUP ends
    this process at once, without the traceback another rank has printed already."""
    def leave(signum: int, frame: Any) -> None:
        os._exit(code)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            signal.signal(sig, leave)
        except ValueError:  # not the main thread (fit called from a thread): the wait alone
            return
