"""Starting jobs from tests (mpirun, horovodrun, `python -m hvdtrain`, scripts): each in a session of
its own, and every process of that session killed on timeout, on failure and when the job is done
(a rank or an ssh child left behind by a dying launcher is killed with it). Imported as
`support.jobs`; the `jobs` fixture in tests/conftest.py also kills what a test started when it ends.

Self-contained on purpose (only the standard library): the tests' process hygiene must not depend on
the package under test.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

TIMEOUT_EXIT = 124  # the exit code reported for a job killed at its timeout (as timeout(1) does)


def _session_alive(leader: int) -> list[int]:
    """Processes of the session `leader` started that are not yet dead (zombies count as dead)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != leader:
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):  # gone already, or not ours to see
            continue
        if state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def kill_session(leader: int, wait: float = 10.0) -> None:
    """SIGKILL every process whose session is `leader`'s (its process group is not enough: mpirun
    puts each ssh child in a process group of its own, and those hold the job's pipes), and wait up
    to `wait` s until none is left running: SIGKILL takes effect asynchronously, and a process forked
    while the first pass ran is caught by the next."""
    deadline = time.monotonic() + wait
    while True:
        alive = _session_alive(leader)
        if not alive or time.monotonic() > deadline:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)


def start(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text: bool = True) -> subprocess.Popen:
    """Popen in a new session (so kill_session(proc.pid) reaches every process the job starts)."""
    return subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=stdout, stderr=stderr, text=text,
                            start_new_session=True, preexec_fn=_foreground_signals)


def _foreground_signals() -> None:
    """The job starts with SIGINT, SIGQUIT and SIGHUP at their defaults, as a job started from a
    terminal does, even when the test run itself was started in the background or under nohup
    (where they are inherited ignored, and a command that keeps an ignored signal ignored, as
    hvdtrain's launcher-side commands do, would never see one)."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait for a job started by start(); on timeout kill its whole session and report
    TIMEOUT_EXIT. Whatever is still alive in the session afterwards is killed too.
    Returns (exit code, stdout, stderr); a stream not piped reads as ""."""
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = proc.communicate()
        code = TIMEOUT_EXIT
        err = (err or "") + f"\n[tests] killed after {timeout:g} s timeout\n"
        if proc.stderr is None:  # stderr merged into stdout or not captured: put the note in stdout
            out, err = (out or "") + err, ""
    except BaseException:  # KeyboardInterrupt, a failure while waiting: leave nothing running
        kill_session(proc.pid)
        raise
    finally:
        kill_session(proc.pid)  # leftovers of a job whose launcher has exited
    return code, out or "", err or ""


def run_job(cmd: Sequence[str], timeout: float, *, env: dict[str, str] | None = None,
            cwd: str | Path | None = None, merge_stderr: bool = False) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, timeout=...) for a job: in its own
    session, killed whole on timeout (exit code TIMEOUT_EXIT and a note, instead of an exception
    that leaves the ranks running). `merge_stderr` puts stderr into stdout (stderr is then "")."""
    proc = start(cmd, env=env, cwd=cwd, stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE)
    code, out, err = finish(proc, timeout)
    return subprocess.CompletedProcess(list(cmd), code, out, err)
