"""Building and running launcher command lines (mpirun, horovodrun) from Python.

Used by `hvdtrain compare`, the benchmarks and the tests: every job gets a timeout and runs in
its own process group, so a hung rank is killed with the whole job.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

TIMEOUT_EXIT = 124


def launcher_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for mpirun/horovodrun: root allowed (containers, CI), venv first on PATH."""
    env = dict(os.environ)
    # torch reads this once, at its first allocation: huge pages for big buffers make MPI's
    # shared-memory copies ~1.5x faster here (measurements in comm/allreduce_impls.py).
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def mpirun_args(np: int) -> list[str]:
    """mpirun flags for np ranks on this host: allow more ranks than cores, do not pin to cores."""
    return ["mpirun", "-np", str(np), "--oversubscribe", "--bind-to", "none"]


def mpirun_cmd(np: int, argv: Sequence[str], python_module: bool = True) -> list[str]:
    """`mpirun ... python -m mpi4py -m <argv>`: an uncaught exception on one rank aborts all."""
    if python_module:
        return mpirun_args(np) + [sys.executable, "-m", "mpi4py", "-m", *argv]
    return mpirun_args(np) + list(argv)


def horovodrun_cmd(np: int, argv: Sequence[str], gloo: bool = False, python_module: bool = True) -> list[str]:
    exe = shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or "horovodrun"
    cmd = [exe, "-np", str(np), "-H", f"localhost:{np}"]
    cmd += ["--gloo"] if gloo else ["--mpi", "--mpi-args=--oversubscribe --bind-to none"]
    return cmd + ([sys.executable, "-m", *argv] if python_module else list(argv))


def run(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None,
        cwd: str | Path | None = None, capture: bool = True) -> subprocess.CompletedProcess:
    """Run a job; on timeout kill its whole process group and return exit code 124."""
    proc = subprocess.Popen(list(cmd), env=env or launcher_env(), cwd=cwd, text=True,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.STDOUT if capture else None, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(list(cmd), proc.returncode, out or "")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        note = f"\n[hvdtrain.launch] killed after {timeout:.0f} s timeout\n"
        return subprocess.CompletedProcess(list(cmd), TIMEOUT_EXIT, (out or "") + note)
