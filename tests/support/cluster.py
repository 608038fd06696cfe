"""What the cluster tests share: the session's one local cluster (SharedCluster, behind the
`shared_cluster` fixture of tests/conftest.py), running mpi_jobs/cluster_local.sh (and
cluster_slurm.sh), reading the hosts' state, and checking that nothing is left behind. Imported as
`support.cluster`."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from hvdtrain.tools.launch import kill_session, launcher_env
from support.jobs import run_job

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "mpi_jobs" / "cluster_local.sh"
KNOWN_HOSTS = Path.home() / ".ssh" / "known_hosts"
SIZE = 3  # hosts of the session's cluster: the most any test needs (elastic: 3); others use the first 2


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
    """The first `n` hosts of a cluster of `size`: HOSTS and HOSTFILE in `env` name only those."""
    n: int
    state: Path
    env: dict[str, str]  # the launcher environment after `eval "$(cluster_local.sh up SIZE)"`
    exports: str  # what `up` printed (every host of the cluster)
    size: int = 0  # hosts the cluster has (0: n)

    def __post_init__(self) -> None:
        self.size = self.size or self.n

    @property
    def hosts(self) -> list[str]:
        return [f"hvd-h{k}" for k in range(1, self.n + 1)]

    @property
    def all_hosts(self) -> list[str]:
        return [f"hvd-h{k}" for k in range(1, self.size + 1)]

    def view(self, n: int) -> "Cluster":
        """The first n hosts, as `up n` would export them (HOSTS, and a HOSTFILE of n lines)."""
        assert 1 <= n <= self.size, f"a test needs {n} hosts; the cluster has {self.size} (support.cluster.SIZE)"
        full = exported_env(self.exports)
        if n == self.size:
            return Cluster(n, self.state, dict(self.env), self.exports, self.size)
        hostfile = self.state / f"hostfile-{n}"
        hostfile.write_text("".join(Path(full["HOSTFILE"]).read_text().splitlines(keepends=True)[:n]))
        hosts = ",".join(full["HOSTS"].split(",")[:n])
        return Cluster(n, self.state, dict(self.env, HOSTS=hosts, HOSTFILE=str(hostfile)), self.exports, self.size)

    def job(self, cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
        """Run a launcher line in a session of its own (stderr into stdout); the whole session is
        killed on timeout (exit 124) and whatever of it outlives the launcher is killed too."""
        return run_job(cmd, timeout, env=launcher_env(self.env), merge_stderr=True)


def sshd_answers(state: Path, host: int, timeout: float = 15) -> bool:
    """Whether host K's sshd takes the cluster key within `timeout` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while True:
        ok = subprocess.run([str(state / "bin" / "ssh"), "-o", "BatchMode=yes", "-o", "ConnectTimeout=2",
                             f"198.18.0.{host}", "true"], capture_output=True, timeout=30).returncode == 0
        if ok or time.monotonic() > deadline:
            return ok
        time.sleep(0.2)


def restore_hosts(cluster: Cluster) -> list[str]:
    """Put every host back as `up` made it, after a test: SIGKILL whatever still runs in a host's
    namespace (ranks, orteds, sshd sessions of a job that lost its launcher or its link) but its
    sshd, bring a link that is down back up and remove link shaping. Returns what is wrong
    beyond repair (an sshd gone or not answering); empty when the hosts are fine."""
    problems = []
    for k, ns in enumerate(cluster.all_hosts, 1):
        pid_file = cluster.state / f"sshd-{ns}.pid"
        sshd = int(pid_file.read_text()) if pid_file.is_file() else None
        for pid in netns_pids(ns):
            if pid != sshd:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        link = subprocess.run(["ip", "-n", ns, "-o", "link", "show", "hvd0"], capture_output=True, text=True).stdout
        relinked = "state UP" not in link
        if relinked:
            subprocess.run(["ip", "-n", ns, "link", "set", "hvd0", "up"], check=True)
        if " htb " in subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "hvd0"],
                                     capture_output=True, text=True).stdout:
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "hvd0", "root"], check=True)
        if sshd is None or not (Path(f"/proc/{sshd}").exists() and str(cluster.state) in procs_of(sshd)):
            problems.append(f"{ns}: its sshd is gone")
        elif relinked and not sshd_answers(cluster.state, k):
            problems.append(f"{ns}: its sshd does not answer after its link came back up")
    return problems


def procs_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


class SharedCluster:
    """The session's one local cluster of SIZE hosts (host names and the bridge are machine-wide:
    one cluster at a time). Brought up on the first get(n), which hands out a view of its first n
    hosts; reset() after each test puts the hosts back; down() takes it down and checks that no
    namespace, bridge, sshd, state folder or known_hosts change is left (at the end of the session,
    or before a test that needs no cluster up; the next get() brings it up again)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.cluster, self.kh_before, self.ups = folder, None, None, 0

    def get(self, n: int) -> Cluster:
        if self.cluster is None:
            self.ups += 1
            state = self.folder / f"state-{self.ups}"
            self.kh_before = known_hosts()
            started = time.monotonic()
            # Another session's cluster (another checkout's tests) may be up: wait for it to go.
            deadline = started + 300
            while True:
                up = cluster_script("up", str(SIZE), state=state)
                if up.returncode != 2 or "already up" not in up.stderr or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert up.returncode == 0, f"up failed:\n{up.stderr}"  # a failed up cleans up after itself
            self.cluster = Cluster(SIZE, state, exported_env(up.stdout), up.stdout)
            print(f"[support.cluster] {SIZE} hosts up in {time.monotonic() - started:.1f} s")
        return self.cluster.view(n)

    def reset(self) -> None:
        """After a test: the hosts as `up` made them; a cluster beyond repair is taken down (the
        next test gets a fresh one) and the test fails here."""
        if self.cluster is None:
            return
        problems = restore_hosts(self.cluster)
        if problems:
            self.down()
            raise AssertionError(f"the shared cluster was broken by this test and taken down: {problems}")

    def down(self) -> None:
        if self.cluster is None:
            return
        state, self.cluster = self.cluster.state, None
        down = cluster_script("down", state=state)
        assert down.returncode == 0, down.stderr
        assert_nothing_left(state, self.kh_before)


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
