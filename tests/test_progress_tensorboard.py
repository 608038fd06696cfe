"""Around a run: TensorBoard event files with --tensorboard, a tqdm bar on a terminal."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from hvdtrain.tools.launch import launcher_env
from support.jobs import run_job

RUN = [sys.executable, "-m", "hvdtrain", "train", "--backend", "single", "--data", "digits", "--model", "mlp",
       "--hidden", "32", "--optimizer", "adam", "--lr", "0.01", "--epochs", "2", "--batch-size", "32",
       "--log-every", "5", "--threads", "1"]


def test_tensorboard_events_hold_the_metrics(tmp_path):
    out = tmp_path / "o"
    result = run_job(RUN + ["--out", str(out), "--tensorboard"], timeout=120, env=launcher_env())
    assert result.returncode == 0, result.stderr[-2000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/samples_per_sec", "comm/seconds", "comm/bytes_per_step",
            "eval/loss", "eval/accuracy"} <= tags, tags
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(logged) == [r["step"] for r in rows]
    assert all(abs(logged[r["step"]] - r["loss"]) < 1e-5 * max(1, abs(r["loss"])) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert abs(acc.Scalars("eval/accuracy")[0].value - summary["eval_accuracy"]) < 1e-6


def read_terminal(leader: int, timeout: float) -> bytes:
    """What the job writes to the terminal until it closes it (EIO once no process holds the
    follower side). Never blocks past `timeout`: a hung job fails the test instead of hanging it."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"the job still held the terminal after {timeout} s; its output so far:\n"
                        f"{b''.join(chunks)[-1000:].decode(errors='replace')}")
        ready, _, _ = select.select([leader], [], [], min(left, 1.0))
        if not ready:
            continue
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the job and everything it started closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def test_progress_is_a_tqdm_bar_on_a_terminal_and_lines_otherwise(tmp_path, jobs):
    piped = run_job(RUN + ["--out", str(tmp_path / "p")], timeout=120, env=launcher_env())
    assert piped.returncode == 0 and "] step " in piped.stderr and "it/s" not in piped.stderr, piped.stderr[-2000:]
    leader, follower = pty.openpty()
    try:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
        # its own session (the jobs fixture kills it, whole, if the test fails or times out)
        proc = jobs.start(RUN + ["--out", str(tmp_path / "t")], stdout=subprocess.DEVNULL, stderr=follower,
                          env=launcher_env({"COLUMNS": "120"}))
        os.close(follower)
        follower = -1
        raw = read_terminal(leader, timeout=120)
    finally:
        for fd in (leader, follower):
            if fd >= 0:
                os.close(fd)
    code, _, _ = jobs.finish(proc, timeout=30)
    assert code == 0, raw[-1000:]
    text = raw.decode(errors="replace")
    assert "step/s" in text or "s/step" in text, text[-1000:]  # tqdm's rate, unit "step"
    assert "88/88" in text and "] step " not in text, text[-1000:]
