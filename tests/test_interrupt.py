"""Ctrl-C is a clean stop everywhere (issue 15, item 3): SIGINT to `hvdtrain train` (one process),
to the foreground process group of `mpirun ... hvdtrain train` or `horovodrun ... hvdtrain train`
(os.killpg of the launcher's group, as a terminal sends it), or to every rank directly, stops every
rank at the same step like SIGTERM does: rank 0 prints one line, a checkpoint of that step is
written, the job exits non-zero, no rank prints a traceback and no process is left. A second
SIGINT stops at once (exit 130, one line). Under mpirun the ranks get SIGTERM from it
(comm/env.py MPIRUN gives them the time to reach the next flush and checkpoint).

Each job runs in a session of its own (the `jobs` fixture kills it whatever happens), with a unique
HVDTRAIN_TEST_MARK in its environment to find its processes (support.procs).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from hvdtrain.tools.launch import horovodrun_cmd, launcher_env, mpirun_cmd
from support import procs

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# 500 steps per epoch on one rank (250 per rank at 2): far more than a test waits for.
TRAIN = ["hvdtrain", "train", "--data", "regression", "--rows", "4000", "--batch-size", "8", "--epochs", "200"]
START_LIMIT = 240.0  # seconds for a job to log its first steps (torch, Horovod start-up; a loaded machine)
STOP_LIMIT = 60.0  # seconds from Ctrl-C to the job's exit (mpirun: 2 x MPIRUN's 5 s, then a loaded exit)
STOPPED = re.compile(r"hvdtrain: stopped at step (\d+) on request; checkpoint (\S+); rerun with --resume")


@pytest.fixture
def mark():
    value = f"hvdtrain-interrupt-{uuid.uuid4().hex[:12]}"
    yield value
    procs.kill_marked(value)


def env_for(mark: str, np: int | None = None) -> dict[str, str]:
    path = [str(ROOT), str(ROOT / "tests")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return launcher_env({procs.MARK_VAR: mark, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(path)}, np=np)


def start(jobs, cmd: list[str], mark: str, log: Path, np: int | None = None) -> subprocess.Popen:
    with open(log, "w") as f:
        return jobs.start(cmd, env=env_for(mark, np), stdout=f, stderr=subprocess.STDOUT, cwd=log.parent)


def wait_for_steps(proc: subprocess.Popen, out: Path, log: Path) -> None:
    def logged() -> bool:
        assert proc.poll() is None, f"the job ended (exit {proc.returncode}) before training:\n" \
                                    f"{log.read_text()[-3000:]}"
        metrics = out / "metrics.jsonl"
        return metrics.is_file() and metrics.stat().st_size > 0
    procs.wait_for("the first logged steps", logged, START_LIMIT, interval=0.1)


def handler_installed(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` catches `sig` (its SigCgt mask in /proc): hvdtrain's StopFlag is in place."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (sig - 1) & 1)


RANK_PREFIX = re.compile(r"\[\d+(,\d+)?\]<std(out|err)>:")
"""horovodrun's prefix of each rank's output line ([1,0]<stderr>: over MPI, [0]<stderr>: over Gloo)."""


def judge_stop(code: int, text: str, out: Path, mark: str, prefixed: bool = False) -> int:
    """Non-zero, one stop line, no rank's traceback (`prefixed`: horovodrun marks the ranks' lines;
    `horovodrun --gloo` itself raises after a rank's non-zero exit, with its own traceback), a
    loadable checkpoint of that step, the metrics up to it, nothing left running. Returns the step."""
    assert code not in (0, None), text[-3000:]
    ranks = "\n".join(ln for ln in text.splitlines() if RANK_PREFIX.match(ln)) if prefixed else text
    assert "Traceback" not in ranks, text[-4000:]
    stops = STOPPED.findall(text)
    assert len(stops) == 1, f"want one stop line, got {stops}:\n{text[-3000:]}"
    step, path = int(stops[0][0]), Path(stops[0][1])
    assert path.parent == out / "checkpoints" and path.is_file(), text[-3000:]
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == step
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == step, last  # every rank flushed up to the same step, then stopped
    left = procs.marked(mark)
    assert left == [], f"processes left: {procs.describe(left)}"
    return step


def test_ctrl_c_stops_one_process_cleanly_and_resume_finishes(tmp_path, jobs, mark):
    out = tmp_path / "out"
    log = tmp_path / "train.log"
    proc = start(jobs, [PY, "-m", *TRAIN, "--out", str(out)], mark, log)
    wait_for_steps(proc, out, log)
    sent, sent_wall = time.monotonic(), time.time()
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's foreground group
    code, _, _ = jobs.finish(proc, STOP_LIMIT)
    seconds = time.monotonic() - sent
    text = log.read_text()
    assert code == 99, f"exit {code}:\n{text[-3000:]}"
    step = judge_stop(code, text, out, mark)
    written = next((out / "checkpoints").glob("*.pt")).stat().st_mtime
    print(f"one process: SIGINT -> stopped at step {step}, checkpoint {written - sent_wall:.2f} s "
          f"after it, exit 99 after {seconds:.2f} s")
    assert [ln for ln in text.splitlines() if ln.startswith("hvdtrain:")] == [STOPPED.search(text).group(0)]
    # --resume continues from the checkpoint and finishes (2 epochs: 1000 steps)
    resumed = subprocess.run([PY, "-m", *TRAIN[:-1], "2", "--out", str(out), "--resume"], env=env_for(mark),
                             capture_output=True, text=True, timeout=300, start_new_session=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_step"] == step and summary["steps"] == 1000, summary


def test_second_ctrl_c_stops_at_once(tmp_path, jobs, mark):
    out = tmp_path / "out"
    log = tmp_path / "train.log"
    # no flush (so no clean stop) for a long time: only the second Ctrl-C can end it
    proc = start(jobs, [PY, "-m", *TRAIN, "--out", str(out), "--log-every", "100000"], mark, log)
    # StopFlag is in place once SIGUSR1 is caught (Python itself catches SIGINT from its start)
    procs.wait_for("hvdtrain's StopFlag", lambda: proc.poll() is None and handler_installed(proc.pid, signal.SIGUSR1),
                   START_LIMIT)
    sent = time.monotonic()
    while proc.poll() is None and time.monotonic() - sent < 30:  # the first sets the flag, a later one ends it
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.2)
    code, _, _ = jobs.finish(proc, STOP_LIMIT)
    text = log.read_text()
    assert code == 130, f"exit {code}:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    assert [ln for ln in text.splitlines() if ln.startswith("hvdtrain:")] == [
        "hvdtrain: interrupted again; stopped at once, without a new checkpoint"], text[-3000:]
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("*.pt"))
    assert procs.marked(mark) == []
    print(f"second SIGINT: exit 130 after {time.monotonic() - sent:.2f} s")


def launch_line(launcher: str, out: Path, extra: list[str]) -> list[str]:
    argv = [*TRAIN, "--out", str(out), *extra]
    if launcher == "mpirun-mpi":
        return mpirun_cmd(2, [*argv, "--backend", "mpi"])
    if launcher == "mpirun-horovod":
        return mpirun_cmd(2, [*argv, "--backend", "horovod"])
    pytest.importorskip("horovod.torch")
    return horovodrun_cmd(2, [*argv, "--backend", "horovod"], gloo=launcher == "horovodrun-gloo")


@pytest.mark.mpi
# The MPI fallback under mpirun and Horovod under horovodrun --gloo: the two agreement paths
# (MPI and Horovod collectives) and the two ways a launcher forwards SIGINT.
@pytest.mark.parametrize("launcher", ["mpirun-mpi", "horovodrun-gloo"])
def test_ctrl_c_to_the_launchers_group_stops_every_rank_at_one_step(tmp_path, jobs, mark, launcher):
    out = tmp_path / "out"
    log = tmp_path / "job.log"
    proc = start(jobs, launch_line(launcher, out, []), mark, log, np=2)
    wait_for_steps(proc, out, log)
    sent, sent_wall = time.monotonic(), time.time()
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in the terminal: the launcher's group
    code, _, _ = jobs.finish(proc, STOP_LIMIT)
    seconds = time.monotonic() - sent
    text = log.read_text()
    step = judge_stop(code, text, out, mark, prefixed=launcher.startswith("horovodrun"))
    ckpt = next((out / "checkpoints").glob("*.pt"))
    print(f"{launcher}: Ctrl-C -> every rank stopped at step {step}, checkpoint "
          f"{ckpt.stat().st_mtime - sent_wall:.2f} s after it; exit {code} after {seconds:.2f} s")


@pytest.mark.mpi
def test_ctrl_c_with_slow_steps_still_checkpoints_under_mpirun(tmp_path, jobs, mark):
    """Windows of --log-every steps of ~2 s: longer than Open MPI's default 1 s between its SIGTERM
    and SIGKILL (the ranks were killed mid-run, no checkpoint); hvdtrain's MPIRUN setting gives them
    the time to reach the flush."""
    out = tmp_path / "out"
    log = tmp_path / "job.log"
    slow = ["--model", "support.slow_model:SlowNet", "--model-args", '{"delay": 0.02}', "--log-every", "100"]
    proc = start(jobs, launch_line("mpirun-mpi", out, slow), mark, log, np=2)
    wait_for_steps(proc, out, log)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    code, _, _ = jobs.finish(proc, STOP_LIMIT)
    step = judge_stop(code, log.read_text(), out, mark)
    print(f"slow steps under mpirun: stopped at step {step}, exit {code} after {time.monotonic() - sent:.2f} s")


@pytest.mark.mpi
def test_ctrl_c_to_every_rank_stops_them_at_one_step(tmp_path, jobs, mark):
    """Ranks in the terminal's foreground group (a launcher that keeps them in its group) get the
    SIGINT themselves: before, a KeyboardInterrupt in the middle of a collective (traceback, abort)."""
    out = tmp_path / "out"
    log = tmp_path / "job.log"
    proc = start(jobs, launch_line("mpirun-mpi", out, []), mark, log, np=2)
    wait_for_steps(proc, out, log)
    ranks = procs.marked(mark, ranks_only=True)
    assert len(ranks) == 2, procs.describe(ranks)
    for pid in ranks:
        os.kill(pid, signal.SIGINT)
    code, _, _ = jobs.finish(proc, STOP_LIMIT)
    text = log.read_text()
    judge_stop(code, text, out, mark)
    assert code == 99, f"exit {code}:\n{text[-3000:]}"
