"""Faults across hosts of the local cluster (mpi_jobs/cluster_local.sh): a 2-host job, one rank
per host, loses one host mid-run, by its link going down or by every process on it being
SIGKILLed. The whole job must end non-zero by itself within the bound (never hang), under
mpirun (--backend mpi and horovod) and horovodrun --gloo, and the last checkpoint stays intact.

Bounds, from issue 10: link down -> within --collective-timeout + 30 s; host SIGKILLed -> 30 s.
Each job runs in a session of its own (support.jobs.run_job: the whole session is killed at a
timeout well above the bound, and whatever of it outlives the launcher) in a thread, while the
test injects the fault. Needs root. Every test runs on the first 2 hosts of the session's one
cluster (the `shared_cluster` fixture, tests/conftest.py); its teardown puts the hosts back
(link up, every leftover process on them killed, sshd answering) and checks that no process of
the test is left.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hvdtrain.tools.launch import TIMEOUT_EXIT, launcher_env
from support.cluster import kill_job_of, netns_pids, procs_mentioning
from support.jobs import run_job

if os.geteuid() != 0:
    pytest.skip("needs root: the local cluster makes network namespaces, a bridge and sshds",
                allow_module_level=True)

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
HOROVODRUN = str(Path(PY).parent / "horovodrun")
COLLECTIVE_TIMEOUT = 20
LINK_BOUND = COLLECTIVE_TIMEOUT + 30  # seconds from the link going down to the job's end
KILL_BOUND = 30  # seconds from the host's processes being killed to the job's end
START_TIMEOUT = 90  # for the job to reach MID_RUN_STEP (5-20 s here)
JOB_TIMEOUT = 180  # run_job's limit: well above both bounds (a hang shows as 124)
# Far more steps than the test waits for (156250 per rank): the job is always mid-run.
TRAIN = ["train", "--rows", "200000", "--epochs", "50", "--batch-size", "32", "--checkpoint-every", "20",
         "--collective-timeout", str(COLLECTIVE_TIMEOUT), "--log-every", "5", "--threads", "1"]
MID_RUN_STEP = 40  # the fault comes once a checkpoint of this step or later is written


def launcher_cmd(launcher: str, env: dict[str, str], out: Path) -> list[str]:
    """Plain launcher lines, as a user types them after `eval "$(cluster_local.sh up 2)"`."""
    mpirun = ["mpirun", "-np", "2", "--hostfile", env["HOSTFILE"], PY, "-m", "mpi4py", "-m", "hvdtrain", *TRAIN]
    return {
        "mpirun-mpi": mpirun + ["--backend", "mpi"],
        "mpirun-horovod": mpirun + ["--backend", "horovod"],
        "horovodrun-gloo": [HOROVODRUN, "-np", "2", "-H", env["HOSTS"], "--gloo", PY, "-m", "hvdtrain", *TRAIN,
                            "--backend", "horovod"],
    }[launcher] + ["--out", str(out)]


LAUNCHERS = ["mpirun-mpi", "mpirun-horovod", "horovodrun-gloo"]


@pytest.fixture
def cluster(shared_cluster, tmp_path):
    """The launcher environment of the first 2 hosts of the shared cluster; after the test,
    whatever happened, its job is killed and the hosts are put back as `up` made them."""
    try:
        yield shared_cluster.get(2).env
    finally:
        kill_job_of(tmp_path)  # a job still running after a failed test (none when it passed)
        # The fault's leftovers: a link down, ranks, orteds and sshd sessions on the hosts.
        shared_cluster.reset()
        deadline = time.monotonic() + 30
        while procs_mentioning(str(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert procs_mentioning(str(tmp_path)) == [], f"processes left: {procs_mentioning(str(tmp_path))}"


def last_step(out: Path) -> int:
    """The step of the newest checkpoint in `out` (0: none yet). Only the last 3 are kept, and
    steps are fast here (hundreds a second), so a given one may come and go between two looks."""
    steps = [int(p.name[5:13]) for p in (out / "checkpoints").glob("ckpt-*.pt")]
    return max(steps, default=0)


def run_with_fault(cluster: dict, launcher: str, out: Path, fault) -> tuple[subprocess.CompletedProcess, float]:
    """Start the job, call `fault()` once it is mid-run; (the job's result, seconds from fault to its end)."""
    cmd = launcher_cmd(launcher, cluster, out)
    done: dict = {}

    def job():
        done["result"] = run_job(cmd, JOB_TIMEOUT, env=launcher_env(cluster), merge_stderr=True)
        done["ended"] = time.monotonic()

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while last_step(out) < MID_RUN_STEP:
        late = time.monotonic() > deadline
        if late:  # kill it here, to show its output
            kill_job_of(out)
            thread.join(30)
        if late or not thread.is_alive():
            why = f"was killed: no checkpoint of step {MID_RUN_STEP} in {START_TIMEOUT} s" if late else "ended"
            output = done["result"].stdout[-5000:] if "result" in done else "(no output: still running)"
            pytest.fail(f"{launcher} job {why} before its mid-run checkpoint:\n{output}")
        time.sleep(0.2)
    fault()
    injected = time.monotonic()
    thread.join(JOB_TIMEOUT + 30)
    if thread.is_alive():
        # run_job kills the launcher's whole session at its timeout; should it still wait (a
        # process outside that session holding the output pipe), end the job from here.
        kill_job_of(out)
        thread.join(30)
        pytest.fail(f"{launcher} job: run_job did not return {JOB_TIMEOUT + 30} s after the fault")
    return done["result"], done["ended"] - injected


def assert_last_checkpoint_intact(out: Path) -> int:
    import torch

    last = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["step"] > 0 and last.name == f"ckpt-{ckpt['step']:08d}.pt", (last, ckpt.get("step"))
    return ckpt["step"]


@pytest.mark.parametrize("launcher", ["mpirun-mpi", "horovodrun-gloo"])  # mpirun-horovod: host_sigkilled
def test_link_down_ends_the_job_within_collective_timeout_plus_30s(cluster, tmp_path, launcher):
    out = tmp_path / "out"

    def link_down():  # host 2 drops off the network; its processes keep running, unreachable
        subprocess.run(["ip", "netns", "exec", "hvd-h2", "ip", "link", "set", "hvd0", "down"], check=True)

    result, elapsed = run_with_fault(cluster, launcher, out, link_down)
    step = assert_last_checkpoint_intact(out)
    print(f"\nlink of hvd-h2 down under {launcher}: exit {result.returncode} after {elapsed:.1f} s "
          f"(bound {LINK_BOUND} s); last checkpoint step {step}", file=sys.stderr)
    assert result.returncode not in (0, TIMEOUT_EXIT), result.stdout[-3000:]
    assert elapsed < LINK_BOUND, f"took {elapsed:.1f} s:\n{result.stdout[-3000:]}"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_host_sigkilled_ends_the_job_within_30s(cluster, tmp_path, launcher):
    out = tmp_path / "out"
    sshd = int((Path(cluster["HVDTRAIN_CLUSTER_DIR"]) / "sshd-hvd-h2.pid").read_text())

    def kill_host():  # every process of host 2 (rank, orted, sshd sessions) but its sshd listener
        victims = [pid for pid in netns_pids("hvd-h2") if pid != sshd]
        assert victims, "nothing runs on hvd-h2"
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    result, elapsed = run_with_fault(cluster, launcher, out, kill_host)
    step = assert_last_checkpoint_intact(out)
    print(f"\nevery process of hvd-h2 SIGKILLed under {launcher}: exit {result.returncode} after {elapsed:.1f} s "
          f"(bound {KILL_BOUND} s); last checkpoint step {step}", file=sys.stderr)
    assert result.returncode not in (0, TIMEOUT_EXIT), result.stdout[-3000:]
    assert elapsed < KILL_BOUND, f"took {elapsed:.1f} s:\n{result.stdout[-3000:]}"
    # The host itself is still there: its sshd answers, as for the next job.
    ssh = subprocess.run([str(Path(cluster["HVDTRAIN_CLUSTER_DIR"]) / "bin" / "ssh"), "-o", "BatchMode=yes",
                          "198.18.0.2", "hostname"], capture_output=True, text=True, timeout=30)
    assert ssh.returncode == 0 and ssh.stdout.strip() == "hvd-h2", ssh
