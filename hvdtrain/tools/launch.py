"""Building and running launcher command lines (mpirun, horovodrun) from Python.

Used by `hvdtrain compare`, the benchmarks and the tests: every job gets a timeout and runs in
its own process group, so a hung rank is killed with the whole job. Without `hosts` every
rank runs on this host; with `hosts` ("H1:slots,H2:slots", checked by parse_hosts) mpirun gets
`--host` and horovodrun `-H`, and paths handed to the ranks must be visible on every host.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from hvdtrain.comm.env import EVERY_JOB, MCA_PREFIX, job_env_defaults

TIMEOUT_EXIT = 124


def launcher_env(extra: dict[str, str] | None = None, np: int | None = None,
                 hosts: str | None = None) -> dict[str, str]:
    """The environment for mpirun/horovodrun: hvdtrain's MPI/Horovod settings for `np` ranks on
    `hosts` (comm.env.job_env_defaults: in place before the ranks start, as some are read at
    process start; without `np` only the layout-independent ones, and each rank adds the rest;
    a value the user exported wins), root allowed (containers, CI), venv first on PATH."""
    env = dict(os.environ)
    for key, value in job_env_defaults(np, hosts).items():
        env.setdefault(key, value)
    if os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


FORWARD_VARS = ("PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS",
                *(k for k in EVERY_JOB if not k.startswith(MCA_PREFIX)))
"""What ranks on other hosts need from the launcher's environment: mpirun sends OMPI_* by
itself and the rest only with `-x` (horovodrun forwards its whole environment)."""
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


def parse_hosts(hosts: str, np: int | None = None) -> str:
    """Check `H1:slots,H2:slots` (`H` alone is one slot) and return it with every slot count
    written out, as mpirun --host and horovodrun -H take it. With `np`, the slots must hold np
    ranks: across hosts a rank too many is refused rather than oversubscribed.
    ValueError names the bad entry and the fix."""
    fix = "use e.g. --hosts 198.18.0.1:1,198.18.0.2:1 (HOST:SLOTS, comma-separated)"
    entries: dict[str, int] = {}
    for entry in hosts.split(","):
        name, colon, slots = entry.strip().partition(":")
        if not _HOST.fullmatch(name) or (colon and not (re.fullmatch("[0-9]+", slots) and int(slots) >= 1)):
            raise ValueError(f"--hosts {hosts!r}: entry {entry!r} is not HOST or HOST:SLOTS with "
                             f"SLOTS >= 1; {fix}")
        if name in entries:
            raise ValueError(f"--hosts {hosts!r} names {name!r} twice; give each host once "
                             f"with its slot count; {fix}")
        entries[name] = int(slots) if colon else 1
    total = sum(entries.values())
    if np is not None and np > total:
        raise ValueError(f"--np {np} needs {np} slots but --hosts {hosts!r} gives {total}; "
                         f"add slots (HOST:2) or hosts, or use --np {total}")
    return ",".join(f"{h}:{n}" for h, n in entries.items())


def host_args(hosts: str, env: dict[str, str] | None = None) -> list[str]:
    """mpirun flags that place ranks on `hosts` and hand them FORWARD_VARS from `env`."""
    env = launcher_env() if env is None else env
    return ["--host", hosts, *(a for v in FORWARD_VARS if v in env for a in ("-x", v))]


def mpirun_args(np: int, hosts: str | None = None, env: dict[str, str] | None = None) -> list[str]:
    """mpirun flags for np ranks on this host (allow more ranks than cores), or on `hosts`
    (see parse_hosts; `env` is the job's environment, default launcher_env()); never pinned."""
    where = host_args(hosts, env) if hosts else ["--oversubscribe"]
    return ["mpirun", "-np", str(np), *where, "--bind-to", "none"]


def mpirun_cmd(np: int, argv: Sequence[str], python_module: bool = True, hosts: str | None = None) -> list[str]:
    """`mpirun ... python -m mpi4py -m <argv>`: an uncaught exception on one rank aborts all."""
    if python_module:
        return mpirun_args(np, hosts) + [sys.executable, "-m", "mpi4py", "-m", *argv]
    return mpirun_args(np, hosts) + list(argv)


def horovodrun_cmd(np: int, argv: Sequence[str], gloo: bool = False, python_module: bool = True,
                   hosts: str | None = None) -> list[str]:
    """horovodrun of np ranks on this host, or on `hosts` (see parse_hosts)."""
    exe = shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or "horovodrun"
    cmd = [exe, "-np", str(np), "-H", hosts or f"localhost:{np}"]
    mpi_args = "--bind-to none" if hosts else "--oversubscribe --bind-to none"
    cmd += ["--gloo"] if gloo else ["--mpi", f"--mpi-args={mpi_args}"]
    return cmd + ([sys.executable, "-m", *argv] if python_module else list(argv))


def run(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None,
        cwd: str | Path | None = None, capture: bool = True) -> subprocess.CompletedProcess:
    """Run a job in a session of its own; on timeout kill the whole session and return exit code
    124. Whatever of the session outlives the launcher, or an interrupted wait (Ctrl-C), is killed
    too: no rank of the job is left running."""
    proc = subprocess.Popen(list(cmd), env=env or launcher_env(), cwd=cwd, text=True,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.STDOUT if capture else None, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(list(cmd), proc.returncode, out or "")
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, _ = proc.communicate()
        note = f"\n[hvdtrain.tools.launch] killed after {timeout:.0f} s timeout\n"
        return subprocess.CompletedProcess(list(cmd), TIMEOUT_EXIT, (out or "") + note)
    finally:
        kill_session(proc.pid)


def kill_session(leader: int) -> None:
    """SIGKILL every process of the session `leader` started: its process group is not enough,
    since mpirun puts each ssh child in a process group of its own (and they hold our pipe)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == leader:
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:  # gone already, or not ours to see
            pass
