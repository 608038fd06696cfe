"""Finding the processes of a job a test started, by a marker, through /proc (tests/test_teardown.py,
tests/test_interrupt.py): the marker is a unique value of the environment variable
HVDTRAIN_TEST_MARK (inherited by the launchers and the ranks they start on this host) or a unique
string on the command line (an --out path: ranks on other hosts get no environment from here).

Self-contained (only the standard library), like support.jobs.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable, TypeVar

MARK_VAR = "HVDTRAIN_TEST_MARK"
HANG_RANKS = str(Path(__file__).resolve().parent / "hang_ranks")
"""Put first on PYTHONPATH: every rank of a job sleeps at start (see hang_ranks/sitecustomize.py)."""
RANK_VARS = (b"OMPI_COMM_WORLD_RANK=", b"HOROVOD_RANK=", b"PMI_RANK=", b"SLURM_PROCID=")

T = TypeVar("T")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def marked(mark: str, ranks_only: bool = False) -> list[int]:
    """Live processes (zombies do not count) whose environment has HVDTRAIN_TEST_MARK=mark or whose
    command line contains `mark`; with ranks_only, only ranks of a job (a launcher's rank variable set)."""
    found = []
    needle_env, needle_cmd = f"{MARK_VAR}={mark}".encode(), mark.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if not stat or stat.rsplit(b")", 1)[-1].split()[0] in (b"Z", b"X"):
            continue
        environ = _read(f"/proc/{entry}/environ").split(b"\0")
        if needle_env not in environ and needle_cmd not in _read(f"/proc/{entry}/cmdline"):
            continue
        if ranks_only and not any(v.startswith(RANK_VARS) for v in environ):
            continue
        found.append(int(entry))
    return found


def describe(pids: list[int]) -> str:
    """pid: command line, for a failure message."""
    lines = []
    for pid in pids:
        cmdline = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace")
        lines.append(f"{pid}: {cmdline[:160]}")
    return "; ".join(lines)


def wait_for(what: str, check: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """Poll `check` until it returns something truthy (returned) or `timeout` s pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def kill_marked(mark: str) -> None:
    """SIGKILL every process of the marker (a test's cleanup whatever happened; several passes, as a
    killed parent may have been forking)."""
    for _ in range(20):
        pids = marked(mark)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)
