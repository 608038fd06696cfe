"""Faults in real multi-rank jobs: a rank dies, raises or stalls; preemption; NaN losses.

Every job must end by itself (non-zero) well within the limits, never hang."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hvdtrain.tools.launch import TIMEOUT_EXIT, horovodrun_cmd, launcher_env, mpirun_cmd, mpirun_args
from support.jobs import run_job

ROOT = Path(__file__).resolve().parents[1]
RUNNER = str(ROOT / "tests" / "support" / "fault_runner.py")
TRAIN = ["--rows", "40000", "--epochs", "50", "--batch-size", "32", "--log-every", "5"]
pytestmark = pytest.mark.mpi


def launch(launcher: str, argv: list[str]) -> list[str]:
    if launcher == "horovodrun":
        return horovodrun_cmd(2, argv)
    return mpirun_cmd(2, argv)


def runner_cmd(launcher: str, mode: str, rank: int, step: int, args: list[str]) -> list[str]:
    argv = [RUNNER, mode, str(rank), str(step), "--", "train", *args]
    python = [sys.executable] + (["-m", "mpi4py"] if launcher == "mpirun" else []) + argv
    if launcher == "horovodrun":
        return horovodrun_cmd(2, python, python_module=False)
    return mpirun_args(2) + python


# Each launcher/backend pair once, and each way of failing under both launchers and both
# backends (the full 3 x 2 product cost 100 s for no path the pairs do not reach).
@pytest.mark.parametrize("launcher,backend,mode", [("mpirun", "mpi", "raise"), ("mpirun", "horovod", "exit"),
                                                   ("horovodrun", "horovod", "raise"), ("mpirun", "mpi", "exit")])
def test_failing_rank_ends_the_job(tmp_path, launcher, backend, mode):
    args = ["--backend", backend, "--out", str(tmp_path / "out"), *TRAIN, "--checkpoint-every", "5"]
    start = time.monotonic()
    result = run_job(runner_cmd(launcher, mode, 1, 12, args), timeout=120, env=launcher_env(), merge_stderr=True)
    elapsed = time.monotonic() - start
    print(f"{mode} on rank 1 under {launcher}/{backend}: job exited {result.returncode} after {elapsed:.1f} s")
    assert result.returncode not in (0, TIMEOUT_EXIT), result.stdout[-3000:]
    assert elapsed < 60, f"took {elapsed:.1f} s"
    ckpt = sorted((tmp_path / "out" / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert torch.load(ckpt, weights_only=True)["step"] == 10  # the last one before the fault, intact


def rank_pid(out: Path, rank: int) -> int | None:
    """The pid of the process that is rank `rank` of the job writing to `out`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmdline and b"python" in cmdline[0] and (
                f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ or f"HOROVOD_RANK={rank}".encode() in environ):
            return int(proc.name)
    return None


def start_job(jobs, launcher: str, backend: str, out: Path, extra: list[str] = ()) -> subprocess.Popen:
    """The job in a session of its own; the `jobs` fixture kills the whole session when the test
    ends, so a failed assert below never leaves ranks running."""
    argv = ["hvdtrain", "train", "--backend", backend, "--out", str(out), *TRAIN, *extra]
    return jobs.start(launch(launcher, argv), env=launcher_env())


def wait_for_steps(jobs, job: subprocess.Popen, out: Path, steps: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        if job.poll() is not None:
            pytest.fail(f"job ended early: {finish(jobs, job, 10)[1][-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"training did not start in time: {finish(jobs, job, 0.1)[1][-2000:]}")


def finish(jobs, job: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for the job; past `timeout` its whole session is killed (exit TIMEOUT_EXIT)."""
    code, out, _ = jobs.finish(job, timeout)
    return code, out


@pytest.mark.parametrize("launcher,backend", [("mpirun", "mpi"), ("horovodrun", "horovod")])
def test_sigkilled_rank_ends_the_job_within_30s(tmp_path, jobs, launcher, backend):
    out = tmp_path / "out"
    job = start_job(jobs, launcher, backend, out, ["--checkpoint-every", "5"])
    wait_for_steps(jobs, job, out, 12)
    pid = rank_pid(out, 1)
    assert pid, "rank 1 not found"
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    code, text = finish(jobs, job, 60)
    elapsed = time.monotonic() - killed
    print(f"SIGKILL of rank 1 under {launcher}/{backend}: exit {code} after {elapsed:.1f} s")
    assert code not in (0, TIMEOUT_EXIT), text[-2000:]
    assert elapsed < 30
    ckpt = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert torch.load(ckpt, weights_only=True)["step"] % 5 == 0


@pytest.mark.parametrize("launcher,backend", [("mpirun", "mpi"), ("mpirun", "horovod")])
def test_stalled_rank_is_ended_by_the_watchdog(tmp_path, launcher, backend):
    args = ["--backend", backend, "--out", str(tmp_path / "out"), *TRAIN, "--collective-timeout", "5"]
    start = time.monotonic()
    result = run_job(runner_cmd(launcher, "stall", 1, 8, args), timeout=120, env=launcher_env(), merge_stderr=True)
    elapsed = time.monotonic() - start
    print(f"stall on rank 1 under {launcher}/{backend}: exit {result.returncode} after {elapsed:.1f} s")
    assert result.returncode not in (0, TIMEOUT_EXIT), result.stdout[-3000:]
    assert "did not complete within 5 s" in result.stdout


@pytest.mark.parametrize("launcher,backend", [("mpirun", "mpi"), ("horovodrun", "horovod")])
def test_preemption_checkpoints_and_resume_finishes(tmp_path, jobs, launcher, backend):
    out = tmp_path / "out"
    job = start_job(jobs, launcher, backend, out, ["--epochs", "1"])
    wait_for_steps(jobs, job, out, 12)
    pid = rank_pid(out, 1)
    assert pid, "rank 1 not found"
    os.kill(pid, signal.SIGUSR1)  # as Slurm's --signal would, to one rank or all
    code, text = finish(jobs, job, 60)
    assert code == 99, text[-3000:]
    ckpt = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    stopped_at = torch.load(ckpt, weights_only=True)["step"]
    assert stopped_at >= 12
    resumed = run_job(launch(launcher, ["hvdtrain", "train", "--backend", backend, "--out", str(out), *TRAIN,
                                        "--epochs", "1", "--resume"]),
                      timeout=300, env=launcher_env(), merge_stderr=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_step"] == stopped_at and summary["steps"] > stopped_at


@pytest.mark.parametrize("backend", ["mpi", "horovod"])
def test_nan_loss_stops_every_rank_with_a_message(tmp_path, backend):
    out = tmp_path / "out"
    result = run_job(mpirun_cmd(2, ["hvdtrain", "train", "--backend", backend, "--out", str(out), "--rows", "4000",
                                    "--lr", "1e12", "--log-every", "1"]),
                     timeout=120, env=launcher_env(), merge_stderr=True)
    assert result.returncode == 3, result.stdout[-3000:]
    assert "loss became NaN/Inf on rank 0 at step" in result.stdout
    assert "Traceback" not in result.stdout
