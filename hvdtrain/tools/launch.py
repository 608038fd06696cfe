"""Building and running launcher command lines (mpirun, horovodrun) from Python, and ending them.

Used by `hvdtrain compare`, the benchmarks, `hvdtrain doctor` and the tests: every job gets a
timeout and runs in a session of its own, so a hung rank is killed with the whole job. Without
`hosts` every rank runs on this host; with `hosts` ("H1:slots,H2:slots", checked by parse_hosts)
mpirun gets `--host` and horovodrun `-H`, and paths handed to the ranks must be visible on every host.

Nothing a command launched outlives it: `run` ends its job however the wait ends (the timeout, an
exception, Ctrl-C), and a command's main wrapped in `ends_its_jobs` turns SIGINT, SIGTERM and SIGHUP
into `Stopped`, ends every job still running (those other threads wait for too), prints one line
and exits 128 + the signal's number. A job across hosts gets SIGTERM first, so mpirun ends its
ranks on the other hosts (their orted daemons) before its session here is killed.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from hvdtrain.comm.env import EVERY_JOB, MCA_PREFIX, MPIRUN, job_env_defaults
from hvdtrain.strategies.catalog import HOROVOD_INSTALL

TIMEOUT_EXIT = 124
MAX_RANKS_PER_CORE = 8
"""More ranks than this per core of a host is refused before launching (unless --oversubscribe):
the job would crawl, and every rank is one more process to end."""
TEARDOWN_GRACE = 3.0
"""Seconds mpirun (or horovodrun, srun) of a job across hosts gets after SIGTERM to end the ranks
on the other hosts, before its session here is killed."""


def launcher_env(extra: dict[str, str] | None = None, np: int | None = None,
                 hosts: str | None = None) -> dict[str, str]:
    """The environment for mpirun/horovodrun: hvdtrain's MPI/Horovod settings for `np` ranks on
    `hosts` (comm.env.job_env_defaults: in place before the ranks start, as some are read at
    process start; without `np` only the layout-independent ones, and each rank adds the rest;
    a value the user exported wins) and mpirun's own (comm.env.MPIRUN), root allowed
    (containers, CI), venv first on PATH."""
    env = dict(os.environ)
    for key, value in {**job_env_defaults(np, hosts), **MPIRUN}.items():
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


def check_horovod() -> None:
    """ValueError naming what is missing and the fix, before a command launches anything under
    horovodrun: the horovod package, or its horovodrun beside this Python (or on PATH)."""
    import importlib.util
    if importlib.util.find_spec("horovod") is None:
        raise ValueError(f"Horovod is not installed in {sys.prefix}; {HOROVOD_INSTALL}, "
                         f"or run only the MPI fallback and DDP (e.g. hvdtrain train --backend mpi)")
    if not (shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or shutil.which("horovodrun")):
        raise ValueError(f"horovodrun is not beside {sys.executable} nor on PATH; {HOROVOD_INSTALL}")


def host_cores() -> int:
    """Cores this process may run on (its CPU affinity, as a container or cgroup limits it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_capacity(np: int, hosts: str | None = None, oversubscribe: bool = False) -> None:
    """Refuse, before anything is launched, more than MAX_RANKS_PER_CORE ranks per core on one host:
    without `hosts` all `np` ranks run here; with `hosts` (as parse_hosts returns it) each host gets
    ranks in order up to its slots, and a host is assumed to have this host's cores. `oversubscribe`
    (the commands' --oversubscribe) says it is meant. ValueError names the numbers and the fix."""
    if oversubscribe:
        return
    cores = host_cores()
    most = MAX_RANKS_PER_CORE * cores
    what = f"{cores} core{'s' if cores != 1 else ''}"
    if hosts is None:
        if np > most:
            raise ValueError(f"--np {np} is more than {MAX_RANKS_PER_CORE} ranks per core on this host's "
                             f"{what} ({most}); use --np <= {most}, or --oversubscribe to run it anyway")
        return
    left = np
    for entry in hosts.split(","):
        name, _, slots = entry.partition(":")
        ranks = min(left, int(slots or 1))
        left -= ranks
        if ranks > most:
            raise ValueError(f"--np {np} on --hosts {hosts} puts {ranks} ranks on {name}, more than "
                             f"{MAX_RANKS_PER_CORE} per core of a host like this one ({what}: {most}); give "
                             f"{name} <= {most} slots, or --oversubscribe if it has the cores")


# --- ending jobs --------------------------------------------------------------------------------

class Stopped(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP asked a command that launches jobs to stop (see ends_its_jobs).
    A KeyboardInterrupt, so `except Exception` in a tool does not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_live: dict[int, bool] = {}
"""Jobs `run` is waiting for, in any thread: session leader's pid -> whether the job spans hosts."""
_stop: list[int] = []
"""The signal that stopped this command, once one did: `run` starts nothing more."""
_guarded = threading.Event()
"""Set while a main wrapped in ends_its_jobs runs (its signal handlers are installed)."""

_REMOTE_FLAGS = ("--host", "-host", "-H", "--hosts", "--hostfile", "-hostfile", "--machinefile",
                 "-machinefile", "--host-discovery-script")


def spans_hosts(cmd: Sequence[str]) -> bool:
    """Whether a launcher command may start ranks on other hosts (its ranks there are ended by the
    launcher itself: it gets SIGTERM and TEARDOWN_GRACE seconds before its session is killed)."""
    if not cmd:
        return False
    if Path(cmd[0]).name == "srun":
        return True
    local = {"localhost", "127.0.0.1", os.uname().nodename}
    for flag, value in zip(cmd, list(cmd[1:]) + [""]):
        if flag in _REMOTE_FLAGS:
            names = {h.strip().rsplit(":", 1)[0] for h in value.split(",") if h.strip()}
            if "file" in flag or "script" in flag or not names <= local:
                return True
    return False


def run(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None,
        cwd: str | Path | None = None, capture: bool = True) -> subprocess.CompletedProcess:
    """Run a job in a session of its own; on timeout end the whole job and return exit code 124.
    However the wait ends (the timeout, an exception, Ctrl-C, a signal turned into Stopped) the job
    is ended (end_job), and whatever of its session outlives the launcher is killed: no rank of
    the job is left running. Raises Stopped, starting nothing, once the command is stopping."""
    if _stop:
        raise Stopped(_stop[0])
    remote = spans_hosts(cmd)
    proc = subprocess.Popen(list(cmd), env=env or launcher_env(), cwd=cwd, text=True,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.STDOUT if capture else None, start_new_session=True)
    _live[proc.pid] = remote
    try:
        if _stop:  # the stop began while this job started: its handler may not have seen it
            raise Stopped(_stop[0])
        out, _ = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(list(cmd), proc.returncode, out or "")
    except subprocess.TimeoutExpired:
        end_job(proc.pid, remote)
        out, _ = proc.communicate()
        note = f"\n[hvdtrain.tools.launch] killed after {timeout:.0f} s timeout\n"
        return subprocess.CompletedProcess(list(cmd), TIMEOUT_EXIT, (out or "") + note)
    except BaseException:
        end_job(proc.pid, remote)
        raise
    finally:
        kill_session(proc.pid)  # leftovers of a job whose launcher has exited
        _live.pop(proc.pid, None)
        if proc.returncode is None:  # reap the killed launcher
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def end_job(leader: int, remote: bool) -> None:
    """End one job: a job across hosts first gets SIGTERM (mpirun then ends the ranks on the other
    hosts) and up to TEARDOWN_GRACE seconds to exit; then its session here is killed."""
    end_jobs({leader: remote})


LAUNCHERS = frozenset({"mpirun", "mpiexec", "orterun", "prterun", "horovodrun", "srun"})
"""Process names of the launchers that end a job's ranks on other hosts when they get SIGTERM."""


def end_jobs(jobs: dict[int, bool] | None = None, graceful: bool = True) -> None:
    """End the given jobs (leader pid -> spans hosts), by default every job `run` waits for in any
    thread. For a job across hosts, its leader and every launcher in it (mpirun under horovodrun's
    shell, say) get SIGTERM and up to TEARDOWN_GRACE seconds to exit, so they end the ranks on the
    other hosts (graceful=False: no wait); then kill_session for each job."""
    jobs = dict(_live) if jobs is None else jobs
    told = []
    for leader in (pid for pid, spans in jobs.items() if spans and graceful):
        for pid in {leader} | {p for p in _job_processes(leader, set()) if _name(p) in LAUNCHERS}:
            try:
                os.kill(pid, signal.SIGTERM)
                told.append(pid)
            except OSError:
                pass
    deadline = time.monotonic() + TEARDOWN_GRACE
    while told and time.monotonic() < deadline:
        told = [pid for pid in told if _running(pid)]
        time.sleep(0.05)
    for pid in jobs:
        kill_session(pid)


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _stat(pid: str) -> tuple[str, int, int] | None:
    """(state, parent pid, session id) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[3])
    except (OSError, IndexError, ValueError):
        return None


def _running(pid: int) -> bool:
    st = _stat(str(pid))
    return st is not None and st[0] not in "ZX"


def _job_processes(leader: int, known: set[int]) -> set[int]:
    """Live processes of the session `leader` started, their descendants in any session (Horovod's
    Gloo launcher puts each rank's shell in a session of its own) and those of `known` still alive."""
    table = {int(e.name): st for e in Path("/proc").iterdir() if e.name.isdigit() and (st := _stat(e.name))}
    found = {pid for pid, (_, _, sid) in table.items() if sid == leader} | (known & table.keys())
    while True:
        more = {pid for pid, (_, ppid, _) in table.items() if ppid in found} - found
        if not more:
            break
        found |= more
    return {pid for pid in found if table[pid][0] not in "ZX" and pid != os.getpid()}


def kill_session(leader: int, wait: float = 5.0) -> None:
    """SIGKILL every process of the job whose session `leader` started: its process group is not
    enough, since mpirun puts each ssh child in a process group of its own (and they hold our
    pipe), and Horovod's Gloo launcher puts ranks in sessions of their own (found as descendants).
    The processes are stopped (SIGSTOP) until no new one appears, so none forks or is orphaned
    while they are killed; then waits up to `wait` s until none is left."""
    frozen: set[int] = set()
    while new := _job_processes(leader, frozen) - frozen:
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except OSError:  # gone already, or not ours to signal
                pass
        frozen |= new
    for pid in frozen:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while any(_running(pid) for pid in frozen) and time.monotonic() < deadline:
        time.sleep(0.02)


def _on_signal(signum: int, frame: object) -> None:
    """SIGINT/SIGTERM/SIGHUP in a command wrapped by ends_its_jobs: end every job, raise Stopped.
    A second signal while the first one's teardown waits ends the jobs at once."""
    if _stop:
        end_jobs(graceful=False)
        return
    _stop.append(signum)
    end_jobs()
    raise Stopped(signum)


def ends_its_jobs(prog: str, rank_flags: Sequence[str] = ()) -> Callable[[Callable[[list[str]], int]],
                                                                             Callable[[list[str]], int]]:
    """Decorate a launcher-side command's `main(argv) -> int`: while it runs, SIGINT, SIGTERM and
    SIGHUP end every job it started (jobs of other threads too; a job across hosts through its
    launcher first) and become Stopped; the command then prints one line and returns 128 + the
    signal's number. An exception ends every job too. A signal ignored at start (nohup, a
    background job's SIGINT) stays ignored. With one of `rank_flags` in argv the process is a
    rank of a job, not the command: nothing is installed."""
    def decorate(main: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        @functools.wraps(main)
        def guarded(argv: list[str]) -> int:
            if (any(flag in argv for flag in rank_flags) or _guarded.is_set()
                    or threading.current_thread() is not threading.main_thread()):
                return main(argv)
            _stop.clear()
            _guarded.set()
            previous = {}
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) is not signal.SIG_IGN or sig == signal.SIGTERM:
                    previous[sig] = signal.signal(sig, _on_signal)
            try:
                return main(argv)
            except KeyboardInterrupt as exc:  # Stopped, or Ctrl-C before the handler was in place
                signum = getattr(exc, "signum", signal.SIGINT)
                end_jobs()  # done already by the handler, unless the interrupt came another way
                sys.stderr.write(f"{prog}: stopped by {signal.Signals(signum).name}; every job it "
                                 f"started was ended\n")
                return 128 + signum
            finally:
                end_jobs()  # an exception: the jobs other threads wait for end too
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                _guarded.clear()
        return guarded
    return decorate
