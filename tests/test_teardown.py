"""Every launcher-side command ends its whole job (issue 15, item 2): `hvdtrain compare`, every
`hvdtrain bench` kind and `hvdtrain doctor`, signalled (SIGINT, SIGTERM, SIGHUP: to the command's
own pid, not its group, so the command itself must tear its jobs down), at their own --timeout or
on an exception, exit non-zero within TEARDOWN_LIMIT seconds (128 + the signal's number) and leave
no process of their jobs; `--np` beyond MAX_RANKS_PER_CORE ranks per core is refused before
anything is launched, with the fix.

How: every command runs in a session of its own, with a unique HVDTRAIN_TEST_MARK in its
environment (its jobs inherit it; support.procs finds them through /proc). Except where real
training is the point (compare), support/hang_ranks/ goes first on PYTHONPATH: each rank then
sleeps at interpreter start, so a test waits until the ranks exist (polled, with a deadline) and
signals the command while they do, without spending the shared cores on them. Whatever a failed
test leaves is killed by the `mark` fixture.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from hvdtrain.tools import launch
from hvdtrain.tools.launch import MAX_RANKS_PER_CORE, check_capacity, host_cores, launcher_env
from support import procs
from support.jobs import run_job

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TEARDOWN_LIMIT = 10.0  # seconds from the signal to the command's exit (issue 15)
RANKS_LIMIT = 240.0  # seconds for a command to reach its first multi-rank job (torch imports, data)


def tiny(kind: str, out: Path) -> list[str]:
    """`python -m hvdtrain` arguments of each launcher-side command on tiny settings."""
    return {
        "compare": ["compare", "--np", "2", "--out", str(out), "--rows", "2000", "--epochs", "1",
                    "--sync-every", "1"],
        "bench allreduce": ["bench", "allreduce", "--np", "2", "--out", str(out), "--max-bytes", "1024",
                            "--iters", "2", "--impls", "mpi4py"],
        "bench train": ["bench", "train", "--np", "2", "--out", str(out), "--rows", "2000", "--hidden", "8",
                        "--batch-size", "64"],
        "bench synthetic": ["bench", "synthetic", "--np", "2", "--out", str(out), "--model",
                            "hvdtrain.examples.digits_cnn:DigitsCNN", "--model-args", '{"num_classes": 10}',
                            "--channels", "1", "--image-size", "8", "--batch-size", "8", "--num-warmup-batches",
                            "1", "--num-batches-per-iter", "2", "--num-iters", "2"],
        "bench convergence": ["bench", "convergence", "--tiny", "--np", "2", "--out", str(out)],
        "bench fit": ["bench", "fit", "--out", str(out), "--epochs", "50", "--repeats", "1"],
        "doctor": ["doctor", "--json", str(out / "doctor.json")],
    }[kind]


@pytest.fixture
def mark():
    """A unique marker for this test's processes; whatever still carries it at the end is killed."""
    value = f"hvdtrain-teardown-{uuid.uuid4().hex[:12]}"
    yield value
    procs.kill_marked(value)


def start(jobs, argv: list[str], mark: str, log: Path, hang: bool = True,
          extra: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m hvdtrain ARGV` in a session of its own, output into `log`."""
    path = [procs.HANG_RANKS] if hang else []
    path += [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = launcher_env({procs.MARK_VAR: mark, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(path),
                        **(extra or {})})
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return jobs.start([PY, "-m", "hvdtrain", *argv], env=env, stdout=f, stderr=subprocess.STDOUT,
                          cwd=log.parent)


def wait_for_ranks(proc: subprocess.Popen, mark: str, log: Path) -> list[int]:
    def ranks() -> list[int]:
        assert proc.poll() is None, f"the command ended (exit {proc.returncode}) before its ranks " \
                                    f"existed:\n{log.read_text()[-3000:]}"
        return procs.marked(mark, ranks_only=True)
    return procs.wait_for("the command's ranks to exist", ranks, RANKS_LIMIT)


def signal_and_judge(proc: subprocess.Popen, sig: signal.Signals, mark: str, log: Path, prog: str) -> float:
    """Send `sig` to the command's pid; it must exit 128 + sig within TEARDOWN_LIMIT with one line
    naming the signal and no traceback, and no process of its jobs may be left. Returns the seconds."""
    sent = time.monotonic()
    os.kill(proc.pid, sig)
    try:
        code = proc.wait(timeout=TEARDOWN_LIMIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{prog} did not exit within {TEARDOWN_LIMIT:g} s of {sig.name}; left: "
                    f"{procs.describe(procs.marked(mark))}")
    seconds = time.monotonic() - sent
    text = log.read_text()
    assert code == 128 + sig, f"{prog} exited {code} after {sig.name}, not {128 + sig}:\n{text[-3000:]}"
    lines = [ln for ln in text.splitlines() if "stopped by" in ln]
    assert lines == [f"{prog}: stopped by {sig.name}; every job it started was ended"], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    left = procs.marked(mark)
    assert left == [], f"{prog} left processes of its jobs: {procs.describe(left)}"
    print(f"{prog}: {sig.name} -> exit {code} in {seconds:.2f} s, nothing left")
    return seconds


# --- signals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_compare_ends_its_training_ranks_on_signal(tmp_path, jobs, mark, sig):
    """Real training ranks (Horovod under horovodrun, the first strategy compare runs), mid-run."""
    out = tmp_path / "out"
    argv = ["compare", "--np", "2", "--out", str(out), "--rows", "20000", "--epochs", "50", "--sync-every", "1"]
    proc = start(jobs, argv, mark, tmp_path / "compare.log", hang=False)
    procs.wait_for("a training step", lambda: list(out.glob("runs/*/metrics.jsonl")) or proc.poll() is not None,
                   RANKS_LIMIT, interval=0.2)
    wait_for_ranks(proc, mark, tmp_path / "compare.log")
    signal_and_judge(proc, sig, mark, tmp_path / "compare.log", "hvdtrain compare")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_bench_allreduce_ends_its_ranks_on_signal(tmp_path, jobs, mark, sig):
    proc = start(jobs, tiny("bench allreduce", tmp_path / "out"), mark, tmp_path / "bench.log")
    wait_for_ranks(proc, mark, tmp_path / "bench.log")
    signal_and_judge(proc, sig, mark, tmp_path / "bench.log", "hvdtrain bench allreduce")


def test_ranks_in_sessions_of_their_own_are_ended_too(tmp_path, jobs, mark):
    """`horovodrun --gloo` starts each rank under a helper that calls setsid(): the ranks are not in
    the job's session, only its descendants."""
    argv = [*tiny("bench allreduce", tmp_path / "out")[:-1], "horovod-gloo"]
    proc = start(jobs, argv, mark, tmp_path / "bench.log")
    ranks = wait_for_ranks(proc, mark, tmp_path / "bench.log")
    assert any(os.getsid(pid) != os.getsid(proc.pid) for pid in ranks)
    signal_and_judge(proc, signal.SIGTERM, mark, tmp_path / "bench.log", "hvdtrain bench allreduce")


@pytest.mark.parametrize("kind", ["bench train", "bench synthetic", "bench convergence", "doctor"])
def test_command_ends_its_ranks_on_sigterm(tmp_path, jobs, mark, kind):
    proc = start(jobs, tiny(kind, tmp_path / "out"), mark, tmp_path / "command.log")
    wait_for_ranks(proc, mark, tmp_path / "command.log")
    signal_and_judge(proc, signal.SIGTERM, mark, tmp_path / "command.log", f"hvdtrain {kind}")


def test_doctor_ends_the_probes_its_threads_wait_for(tmp_path, jobs, mark):
    """doctor runs its three library probes in threads: the signal reaches the main thread only."""
    proc = start(jobs, tiny("doctor", tmp_path / "out"), mark, tmp_path / "doctor.log", hang=False)
    procs.wait_for("a probe", lambda: [p for p in procs.marked(mark) if p != proc.pid], RANKS_LIMIT)
    signal_and_judge(proc, signal.SIGTERM, mark, tmp_path / "doctor.log", "hvdtrain doctor")


def test_bench_fit_stops_on_sigterm(tmp_path, jobs, mark):
    """bench fit trains in its own process (no ranks): it stops with the same one line."""
    proc = start(jobs, tiny("bench fit", tmp_path / "out"), mark, tmp_path / "fit.log", hang=False)

    def running() -> bool:  # its main runs: the SIGTERM handler is installed (SigCgt bit 15)
        assert proc.poll() is None, (tmp_path / "fit.log").read_text()[-3000:]
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
        return bool(caught >> (signal.SIGTERM - 1) & 1)
    procs.wait_for("bench fit's main to run", running, RANKS_LIMIT)
    signal_and_judge(proc, signal.SIGTERM, mark, tmp_path / "fit.log", "hvdtrain bench fit")


# --- its own timeout, an exception ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["compare", "bench allreduce"])
def test_own_timeout_ends_the_job(tmp_path, jobs, mark, kind):
    argv = [*tiny(kind, tmp_path / "out"), "--timeout", "3"]
    proc = start(jobs, argv, mark, tmp_path / "command.log")  # its ranks hang: every run times out
    code, _, _ = jobs.finish(proc, RANKS_LIMIT)
    text = (tmp_path / "command.log").read_text()
    assert code == 1, f"exit {code}:\n{text[-3000:]}"
    assert "killed after 3 s timeout" in text or "timed out after 3 s" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert procs.marked(mark) == [], procs.describe(procs.marked(mark))


THREADED = """\
import os, signal, sys, threading, time
from hvdtrain.tools import launch

MODE = sys.argv[1]
WORKERS = []

@launch.ends_its_jobs("hvdtrain test-tool")
def main(argv):
    box = {}
    worker = threading.Thread(target=lambda: box.update(result=launch.run(["sleep", "1000"], timeout=600)))
    WORKERS.append(worker)
    worker.start()
    while not launch._live:
        time.sleep(0.01)
    print("JOB", list(launch._live)[0], flush=True)
    if MODE == "raise":
        raise RuntimeError("a bug in the tool")
    os.kill(os.getpid(), getattr(signal, MODE))
    time.sleep(60)
    return 0

try:
    code = main([])
except RuntimeError as exc:
    print("RAISED", exc, flush=True)
    code = 1
for worker in WORKERS:
    worker.join(10)
print("CODE", code, "LIVE", list(launch._live), "WORKER ALIVE", any(w.is_alive() for w in WORKERS), flush=True)
sys.exit(code)
"""


@pytest.mark.parametrize("mode", ["SIGTERM", "SIGHUP", "raise"])
def test_a_job_another_thread_waits_for_is_ended(tmp_path, mode):
    script = tmp_path / "tool.py"
    script.write_text(THREADED)
    result = run_job([PY, str(script), mode], 60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    job = int(result.stdout.split("JOB ", 1)[1].split()[0])
    assert not launch._running(job), "the job another thread waited for is still running"
    want = 1 if mode == "raise" else 128 + getattr(signal, mode)
    assert result.returncode == want, result.stdout + result.stderr
    assert "LIVE [] WORKER ALIVE False" in result.stdout, result.stdout
    if mode != "raise":
        assert result.stderr.strip() == f"hvdtrain test-tool: stopped by {mode}; every job it started was ended"


def test_descendants_in_other_sessions_are_killed_with_the_job(tmp_path):
    """A job's child that called setsid() (as Horovod's Gloo launcher does for each rank) holds the
    job's output pipe: run() must still kill it and return at the timeout."""
    marker = tmp_path / "child.pid"
    script = f"setsid sleep 1000 & echo $! > {marker}; wait"
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=launch.run(["bash", "-c", script], timeout=2)),
                              daemon=True)
    worker.start()
    worker.join(30)
    child = int(marker.read_text())
    if worker.is_alive():
        os.kill(child, signal.SIGKILL)
        worker.join(10)
        pytest.fail("run() did not return 28 s after its timeout: the setsid child was not killed")
    assert box["result"].returncode == launch.TIMEOUT_EXIT
    assert not launch._running(child), "the child in a session of its own survived"


# --- refusing more ranks than a host holds -------------------------------------------------------

NP_COMMANDS = ["compare", "bench allreduce", "bench train", "bench synthetic", "bench convergence", "doctor"]


@pytest.mark.parametrize("kind", NP_COMMANDS)
def test_too_many_ranks_are_refused_before_launching(tmp_path, mark, kind):
    most = MAX_RANKS_PER_CORE * host_cores()
    np = most * 20
    argv = [a if prev != "--np" else str(np) for prev, a in zip(["", *tiny(kind, tmp_path / "out")],
                                                               tiny(kind, tmp_path / "out"))]
    if "--np" not in argv:
        argv += ["--np", str(np)]
    env = launcher_env({procs.MARK_VAR: mark, "PYTHONPATH": str(ROOT)})
    started = time.monotonic()
    result = run_job([PY, "-m", "hvdtrain", *argv], 120, env=env, cwd=tmp_path)
    cores = host_cores()
    want = (f"--np {np} is more than {MAX_RANKS_PER_CORE} ranks per core on this host's {cores} "
            f"core{'s' if cores != 1 else ''} ({most}); use --np <= {most}, or --oversubscribe to run it anyway")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.rstrip().endswith(want), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "runs").exists() and not (tmp_path / "out" / "logs").exists()
    assert procs.marked(mark) == []
    print(f"{kind} --np {np}: refused in {time.monotonic() - started:.1f} s")


def test_capacity_rule():
    cores, most = host_cores(), MAX_RANKS_PER_CORE * host_cores()
    check_capacity(most)
    check_capacity(most + 1, oversubscribe=True)
    with pytest.raises(ValueError, match=rf"--np {most + 1} is more than {MAX_RANKS_PER_CORE} ranks per core"):
        check_capacity(most + 1)
    check_capacity(2 * most, f"h1:{most},h2:{most}")  # each host within its share
    with pytest.raises(ValueError, match=rf"puts {most + 1} ranks on h1.*give h1 <= {most} slots"):
        check_capacity(most + 2, f"h1:{most + 1},h2:1")
    check_capacity(most + 2, f"h1:{most + 1},h2:1", oversubscribe=True)
    check_capacity(2, f"h1:{most + 5},h2:1")  # the slots are a ceiling: 2 ranks go on h1
    assert cores >= 1


@pytest.mark.parametrize("module", ["compare", "bench_train", "bench_synthetic", "bench_convergence", "doctor"])
def test_every_launching_command_takes_oversubscribe(module):
    import importlib
    parser = importlib.import_module(f"hvdtrain.tools.{module}").build_parser()
    args, _ = parser.parse_known_args(["--np", "300", "--oversubscribe"])
    assert args.oversubscribe is True and args.np == 300


def test_bench_allreduce_takes_oversubscribe():
    from hvdtrain.tools.bench_allreduce import parse_args
    assert parse_args(["--np", "300", "--oversubscribe"]).oversubscribe is True
    with pytest.raises(ValueError, match="--oversubscribe"):
        parse_args(["--np", "300"])


def test_spans_hosts():
    assert not launch.spans_hosts(["mpirun", "-np", "2", "--oversubscribe", "python"])
    assert not launch.spans_hosts(["horovodrun", "-np", "2", "-H", "localhost:2", "python"])
    assert launch.spans_hosts(["mpirun", "-np", "2", "--host", "198.18.0.1:1,198.18.0.2:1", "python"])
    assert launch.spans_hosts(["horovodrun", "-np", "2", "-H", "198.18.0.1:1,localhost:1", "python"])
    assert launch.spans_hosts(["mpirun", "--hostfile", "hosts.txt", "python"])
    assert launch.spans_hosts(["srun", "-N", "2", "python"])


# --- across hosts: the launcher's own teardown ends the remote ranks -----------------------------

@pytest.fixture
def cluster(shared_cluster):
    """The first 2 hosts of the session's local cluster (tests/conftest.py); put back afterwards."""
    try:
        yield shared_cluster.get(2)
    finally:
        shared_cluster.reset()


@pytest.mark.parametrize("kind", ["compare", "bench allreduce"])
def test_ranks_on_other_hosts_are_ended_by_the_launchers_teardown(tmp_path, jobs, mark, cluster, kind):
    """SIGTERM to a command whose job spans 2 hosts of the local cluster: it gives its launcher
    SIGTERM (mpirun tells the orted daemons on the other hosts to end their ranks), then kills its
    session here; it exits within TEARDOWN_LIMIT and, soon after, nothing of the job runs on any host
    (every process in the hosts' namespaces but their sshd is gone)."""
    from support.cluster import netns_pids
    out = tmp_path / mark  # the ranks' command lines name it (remote ranks get no environment from here)
    argv = [*tiny(kind, out), "--hosts", cluster.env["HOSTS"]]
    proc = start(jobs, argv, mark, tmp_path / "command.log", extra=cluster.env)
    ranks = wait_for_ranks(proc, mark, tmp_path / "command.log")
    here = os.readlink("/proc/self/ns/net")
    procs.wait_for("a rank on another host", lambda: [p for p in procs.marked(mark, ranks_only=True)
                                                      if os.readlink(f"/proc/{p}/ns/net") != here], 60)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=TEARDOWN_LIMIT)
    exited = time.monotonic() - sent
    text = (tmp_path / "command.log").read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    sshds = {int((cluster.state / f"sshd-{ns}.pid").read_text()) for ns in cluster.hosts}

    def hosts_idle() -> bool:
        return not procs.marked(mark) and all(set(netns_pids(ns)) <= sshds for ns in cluster.hosts)
    procs.wait_for("every process of the job on every host to end", hosts_idle, 30, interval=0.2)
    print(f"{kind} across {cluster.env['HOSTS']}: SIGTERM -> exit {code} in {exited:.2f} s, every host idle "
          f"{time.monotonic() - sent:.2f} s after the signal (ranks seen: {len(ranks)})")
