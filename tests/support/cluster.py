"""What the cluster tests share: running mpi_jobs/cluster_local.sh (and cluster_slurm.sh), reading
the hosts' state, and checking that nothing is left behind. Imported as `support.cluster`."""
from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hvdtrain.launch import kill_session, launcher_env, run

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "mpi_jobs" / "cluster_local.sh"
KNOWN_HOSTS = Path.home() / ".ssh" / "known_hosts"


def cluster_script(*args: str, state: Path, timeout: float = 180, script: Path = CLUSTER,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a cluster script with stdout and stderr apart, in its own session (killed on timeout)."""
    full = dict(env or os.environ, HVDTRAIN_CLUSTER_DIR=str(state))
    proc = subprocess.Popen(["bash", str(script), *args], env=full, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[test] killed after {timeout} s"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def exported_env(up_stdout: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """What `eval "$(... up)"` does to a shell's environment, taken from a real shell."""
    out = subprocess.run(["bash", "-c", 'eval "$1" && env -0', "_", up_stdout], capture_output=True,
                         text=True, check=True, env=base).stdout
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith("hvd-h")]


def netns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True).stdout
    return [int(p) for p in out.split()]


def bridge_exists() -> bool:
    return subprocess.run(["ip", "link", "show", "hvd0"], capture_output=True).returncode == 0


def procs_mentioning(text: str) -> list[str]:
    """Live processes whose command line contains `text` (zombies have an empty one)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (cmd := (proc / "cmdline").read_text()):
                found.append(f"{proc.name}: {cmd.replace(chr(0), ' ')[:150]}")
        except OSError:
            pass
    return found


def sshds_of(state: Path) -> list[int]:
    """Live sshd processes started with a config from `state`."""
    return [int(line.split(":")[0]) for line in procs_mentioning(str(state)) if "sshd" in line]


def tx_bytes(host: str) -> int:
    return int(subprocess.run(["ip", "netns", "exec", host, "cat", "/sys/class/net/hvd0/statistics/tx_bytes"],
                              capture_output=True, text=True, check=True).stdout)


def known_hosts() -> str | None:
    return KNOWN_HOSTS.read_text() if KNOWN_HOSTS.exists() else None


def assert_nothing_left(state: Path, kh_before: str | None) -> None:
    assert netns() == [], f"namespaces left: {netns()}"
    assert not bridge_exists(), "bridge hvd0 left"
    assert sshds_of(state) == [], f"sshd processes left: {sshds_of(state)}"
    assert not state.exists(), f"state folder {state} left"
    assert known_hosts() == kh_before, "~/.ssh/known_hosts was changed"


@dataclass
class Cluster:
    n: int
    state: Path
    env: dict[str, str]  # the launcher environment after `eval "$(cluster_local.sh up N)"`
    exports: str  # what `up` printed

    @property
    def hosts(self) -> list[str]:
        return [f"hvd-h{k}" for k in range(1, self.n + 1)]

    def job(self, cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
        return run(cmd, timeout=timeout, env=launcher_env(self.env))


def cluster_up(n: int, state: Path):
    """Generator for a fixture: yields a Cluster of n hosts; always takes it down and checks that
    nothing is left behind."""
    kh_before = known_hosts()
    up = cluster_script("up", str(n), state=state)
    try:
        assert up.returncode == 0, f"up failed:\n{up.stderr}"
        yield Cluster(n, state, exported_env(up.stdout), up.stdout)
    finally:
        down = cluster_script("down", state=state)
        assert down.returncode == 0, down.stderr
        assert_nothing_left(state, kh_before)


def kill_job_of(path: Path) -> None:
    """SIGKILL every process in the session of this test's launcher (a child of ours that run()
    made a session leader) that names `path`. Its process group is not enough: mpirun puts each
    of its ssh children in a process group of its own. The leader itself may be a zombie by then."""
    sessions = set()
    for line in procs_mentioning(str(path)):
        try:
            sid = os.getsid(int(line.split(":")[0]))
            if int(Path(f"/proc/{sid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                sessions.add(sid)
        except (OSError, ValueError, IndexError):
            pass
    for sid in sessions:
        kill_session(sid)
