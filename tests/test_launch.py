"""hvdtrain.tools.launch.run: a job that outlives its timeout is killed whole, even children that left
its process group (as mpirun's ssh children do), and run() returns."""
from __future__ import annotations

import threading

from hvdtrain.tools.launch import TIMEOUT_EXIT, run


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_timeout_kills_children_in_other_process_groups(tmp_path):
    marker = tmp_path / "child.pid"
    # `set -m`: the background child gets a process group of its own, and it holds our stdout pipe
    script = f"set -m; sleep 1000 & echo $! > {marker}; wait"
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=run(["bash", "-c", script], timeout=2)),
                              daemon=True)
    worker.start()
    worker.join(60)
    child = int(marker.read_text())
    if worker.is_alive():  # run() hangs on the pipe the child holds: clean up, then fail
        import os
        import signal
        os.kill(child, signal.SIGKILL)
        worker.join(10)
        raise AssertionError("run() did not return 58 s after its timeout")
    assert box["result"].returncode == TIMEOUT_EXIT and "killed after 2 s timeout" in box["result"].stdout
    assert not _alive(child), "the child in its own process group survived"


def test_a_finished_job_returns_its_code_and_output():
    result = run(["bash", "-c", "echo out; echo err >&2; exit 3"], timeout=30)
    assert result.returncode == 3 and result.stdout.split() == ["out", "err"]
