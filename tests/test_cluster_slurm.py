"""Two-node Slurm on the local cluster (mpi_jobs/cluster_slurm.sh), for real: a slurmd in each
network-namespace host hvd-h1, hvd-h2 and slurmctld beside them; slurm/train_cpu.sbatch runs one
rank per host with `srun --mpi=pmix`, and a SIGTERM checkpoints, requeues and resumes the job.

Needs root. The module brings up its own cluster (2 hosts + Slurm: Slurm's nodes are every host
of the cluster, and `cluster_local.sh down` stopping Slurm is part of what is tested), after taking
the session's shared cluster down (host names are machine-wide); it is always taken down after its
tests, and the teardown checks that no namespace, Slurm daemon, job step, sshd or state folder is
left.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.cluster import cluster_script, exported_env, netns, procs_mentioning

if os.geteuid() != 0:
    pytest.skip("needs root: the local cluster makes network namespaces, sshds and Slurm daemons",
                allow_module_level=True)

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SLURM = ROOT / "mpi_jobs" / "cluster_slurm.sh"
TRAIN_CPU = ROOT / "slurm" / "train_cpu.sbatch"
HOSTS = ["hvd-h1", "hvd-h2"]
JOB_TIMEOUT = 240  # seconds for one `sbatch --wait` (the jobs take ~15-40 s here)
# One rank on each of the two nodes, nothing that asks for a GPU.
TWO_NODES = ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10"]
# Printed by every task before it starts (srun's task prolog: a `print ...` line goes to its stdout).
TASK_PROLOG = '#!/bin/sh\necho "print TASK rank=$SLURM_PROCID host=$(hostname) netns=$(readlink /proc/self/ns/net)"\n'


def slurmstepds() -> list[int]:
    """slurmstepd processes in the cluster's hosts (their namespaces are ours alone)."""
    pids = []
    for ns in netns():
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in out:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "slurmstepd":
                    pids.append(int(pid))
            except OSError:
                pass
    return pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_nothing_left(state: Path) -> None:
    assert netns() == [], f"namespaces left: {netns()}"
    assert procs_mentioning(str(state)) == [], f"daemons left: {procs_mentioning(str(state))}"
    assert not state.exists(), f"state folder {state} left"


# --- no cluster needed (before the module's cluster is up) --------------------------------------

@pytest.mark.parametrize("args", [[], ["frobnicate"], ["up", "extra"], ["up"]], ids=lambda a: " ".join(a) or "no-args")
def test_bad_arguments_or_no_cluster_say_one_line_and_exit_2(args, tmp_path):
    """`up` without a local cluster is refused with the command that makes one."""
    state = tmp_path / "state"
    result = cluster_script(*args, state=state, script=CLUSTER_SLURM)
    assert result.returncode == 2 and result.stdout == "", result
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("cluster_slurm: "), result.stderr
    if args == ["up"]:
        assert "cluster_local.sh up" in result.stderr, result.stderr
    assert not state.exists() and procs_mentioning(str(state)) == []


def test_bad_port_is_refused(tmp_path):
    result = cluster_script("up", state=tmp_path, script=CLUSTER_SLURM,
                            env=dict(os.environ, HVDTRAIN_CLUSTER_SLURM_PORT="99"))
    assert result.returncode == 2 and "HVDTRAIN_CLUSTER_SLURM_PORT='99'" in result.stderr, result


# --- on 2 hosts with Slurm ------------------------------------------------------------------------

@dataclass
class SlurmCluster:
    state: Path
    env: dict[str, str]  # the shell after `eval "$(cluster_local.sh up 2)"; eval "$(cluster_slurm.sh up)"`

    def squeue(self) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True, timeout=30)
        return out.stdout.split()

    def cancel_all(self) -> None:
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory, shared_cluster):
    shared_cluster.down()  # one cluster at a time; a later test that asks for hosts brings it up again
    state = tmp_path_factory.mktemp("cluster-slurm") / "state"
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base["HVDTRAIN_CLUSTER_SLURM_PORT"] = str(free_port())
    started = time.monotonic()
    try:
        up = cluster_script("up", "2", state=state, env=base)
        assert up.returncode == 0, f"cluster up failed:\n{up.stderr}"
        env = exported_env(up.stdout, base)
        slurm_up = cluster_script("up", state=state, env=env, script=CLUSTER_SLURM)
        assert slurm_up.returncode == 0, f"cluster_slurm.sh up failed:\n{slurm_up.stderr}"
        assert re.fullmatch(r"export SLURM_CONF=\S+\n", slurm_up.stdout), slurm_up.stdout
        env = exported_env(slurm_up.stdout, env)
        print(f"2 hosts with Slurm up in {time.monotonic() - started:.1f} s", file=sys.stderr)
        yield SlurmCluster(state, env)
    finally:
        # `cluster_local.sh down` stops Slurm too (slurmctld is outside the hosts' namespaces).
        down = cluster_script("down", state=state, env=base)
        assert down.returncode == 0, down.stderr
        assert slurmstepds() == []
        assert_nothing_left(state)


def submit(cluster: SlurmCluster, workdir: Path, settings: dict[str, str]) -> subprocess.Popen:
    export = ",".join(["ALL"] + [f"{k}={v}" for k, v in settings.items()])
    cmd = ["sbatch", "--wait", *TWO_NODES, f"--export={export}", str(TRAIN_CPU)]
    return subprocess.Popen(cmd, cwd=workdir, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_job(cluster: SlurmCluster, proc: subprocess.Popen, timeout: float = JOB_TIMEOUT) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        cluster.cancel_all()
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"sbatch --wait did not return in {timeout} s: {proc.communicate()[0]}")


def job_logs(workdir: Path, job: str) -> str:
    out, err = workdir / f"hvdtrain-cpu-{job}.out", workdir / f"hvdtrain-cpu-{job}.err"
    assert out.is_file() and err.is_file(), sorted(os.listdir(workdir))
    return f"--- {out.name}\n{out.read_text()}--- {err.name}\n{err.read_text()}"


def job_id(text: str) -> str:
    m = re.search(r"Submitted batch job (\d+)", text)
    assert m, text
    return m.group(1)


def assert_trained(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_loss"] < summary["first_loss"], summary
    return summary


def test_sbatch_two_nodes_runs_one_rank_on_each_host(slurm_cluster, tmp_path):
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=slurm_cluster.env, capture_output=True,
                           text=True, timeout=30).stdout.split("\n")
    assert sorted(ln.split()[0] for ln in nodes if ln.strip()) == HOSTS, nodes
    prolog = tmp_path / "task_prolog.sh"
    prolog.write_text(TASK_PROLOG)
    prolog.chmod(0o755)
    out = tmp_path / "run"
    started = time.monotonic()
    # SLURM_TASK_PROLOG reaches the script's srun (as --task-prolog would) through sbatch --export.
    proc = submit(slurm_cluster, tmp_path, {"HVDTRAIN_ROWS": "2048", "HVDTRAIN_EPOCHS": "2",
                                            "HVDTRAIN_BATCH_SIZE": "32", "HVDTRAIN_OUT": str(out),
                                            "SLURM_TASK_PROLOG": str(prolog)})
    text = wait_job(slurm_cluster, proc)
    logs = job_logs(tmp_path, job_id(text))
    print(f"2-node sbatch job: {time.monotonic() - started:.1f} s", file=sys.stderr)
    assert proc.returncode == 0, f"{text}\n{logs}"
    assert "nodes=hvd-h[1-2] ntasks=2" in logs and "srun --mpi=pmix hvdtrain train --backend horovod" in logs, logs
    tasks = {int(r): (h, ns) for r, h, ns in re.findall(r"^TASK rank=(\d+) host=(\S+) netns=(\S+)$", logs, re.M)}
    assert sorted(tasks) == [0, 1], logs
    assert sorted(h for h, _ in tasks.values()) == HOSTS, tasks
    own_ns = os.readlink("/proc/self/ns/net")
    assert len({ns for _, ns in tasks.values()} | {own_ns}) == 3, (tasks, own_ns)  # two hosts, neither ours
    assert_trained(out)


@pytest.mark.parametrize("target", ["ranks", "batch-shell"])
def test_sigterm_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, target):
    """SIGTERM to a running 2-node job, to its ranks (`scancel --signal=TERM`, the default: every
    step's tasks) or to its batch shell (`scancel --batch`): every rank stops at the same step
    after writing one checkpoint (exit 99), the job requeues itself under the same id, and the
    second run resumes from that checkpoint and finishes."""
    out = tmp_path / "run"
    proc = submit(slurm_cluster, tmp_path, {
        # 512 steps per rank (~5 s): long enough to be caught soon after the first checkpoint (step
        # 20); 128 steps finished in 1.3 s, before scancel's signal arrived.
        "HVDTRAIN_ROWS": "32768", "HVDTRAIN_EPOCHS": "1", "HVDTRAIN_BATCH_SIZE": "32",
        "HVDTRAIN_CHECKPOINT_EVERY": "20", "HVDTRAIN_OUT": str(out)})
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not any((out / "checkpoints").glob("ckpt-*.pt")):
            assert proc.poll() is None, f"job ended before its first checkpoint:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.2)
        job = slurm_cluster.squeue()[0]
        extra = ["--batch"] if target == "batch-shell" else []
        sig = subprocess.run(["scancel", *extra, "--signal=TERM", job], env=slurm_cluster.env,
                             capture_output=True, text=True, timeout=30)
        assert sig.returncode == 0, sig.stderr
        signalled = time.monotonic()
        text = wait_job(slurm_cluster, proc, timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        slurm_cluster.cancel_all()
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    logs = job_logs(tmp_path, job)
    print(f"SIGTERM to the {target} of 2-node job {job}: requeued and finished "
          f"{time.monotonic() - signalled:.1f} s later", file=sys.stderr)
    assert job_id(text) == job and proc.returncode == 0, f"{text}\n{logs}"
    if target == "batch-shell":
        assert "got SIGTERM: asking the training step to checkpoint" in logs, logs
    # Both ranks, one per host, wrote their part of the same stop and exited "preempted".
    for node, task in zip(HOSTS, (0, 1)):
        assert f"{node}: task {task}: Exited with exit code 99" in logs, logs
    stopped = re.search(r"stopped at step (\d+) on request; checkpoint (\S+); rerun with --resume", logs)
    assert stopped, logs
    step, ckpt = int(stopped.group(1)), Path(stopped.group(2))
    # (ckpt itself may be gone by now: later checkpoints replace older ones)
    assert step > 0 and ckpt == out / "checkpoints" / f"ckpt-{step:08d}.pt", logs
    assert f"preempted (exit 99), checkpoint in {out}/checkpoints: requeueing job {job}" in logs, logs
    second_run = logs[logs.index(f"{job} (run 2): nodes=hvd-h[1-2]"):]
    assert re.search(r"running: srun --mpi=pmix .*hvdtrain train .*--resume", second_run), logs
    summary = assert_trained(out)
    assert summary["start_step"] == step and summary["steps"] == 32768 // 2 // 32, summary


def test_slurm_down_then_up_again(slurm_cluster):
    """`cluster_slurm.sh down` stops every Slurm daemon and job step and leaves the hosts up;
    `up` works again. (Runs last: the module's teardown then checks `cluster_local.sh down`.)"""
    state, env = slurm_cluster.state, slurm_cluster.env
    again = cluster_script("up", state=state, env=env, script=CLUSTER_SLURM)
    assert again.returncode == 2 and "already up" in again.stderr, again
    down = cluster_script("down", state=state, env=env, script=CLUSTER_SLURM)
    assert down.returncode == 0, down.stderr
    assert procs_mentioning(str(state / "slurm")) == [] and slurmstepds() == []
    assert not (state / "slurm").exists() and netns() == HOSTS
    up = cluster_script("up", state=state, env=env, script=CLUSTER_SLURM)
    assert up.returncode == 0, up.stderr
    status = cluster_script("status", state=state, env=env, script=CLUSTER_SLURM)
    assert status.returncode == 0 and status.stdout.count("running (pid") == 3, status.stdout
    assert re.search(r"hvd-h1 idle", status.stdout) and re.search(r"hvd-h2 idle", status.stdout), status.stdout
