"""Horovod elastic training (`hvdtrain train --elastic`, strategies/elastic.py behind train.py's one
loop) on the local cluster
(mpi_jobs/cluster_local.sh): 3 hosts, one slot each, found by mpi_jobs/discover_hosts.sh in a hosts
file. Mid-run the test removes host 3 from the file, later puts it back; the job must shrink to 2
ranks and grow to 3 again without a restart, account for every sample it trained, and end with
the same model on every rank. A second job loses host 3's worker to SIGKILL, without warning: the
others go back to the last commit and finish as 2.

The job's own records are the evidence: OUT/elastic.jsonl (rank 0: a `world` line at every
(re)start with each rank's host and block rows, a `commit` line at every commit), its stdout,
OUT/summary.json, OUT/ranks/rank-R.json (host and SHA-256 of the final state of every rank), and
what every run writes: OUT/metrics.jsonl (one line per step, each step once) and OUT/evals.jsonl.

The tests that need no cluster come first (bad input: one line, exit 2). The cluster tests need
root; they run on the session's one cluster (3 hosts: the `shared_cluster` fixture,
tests/conftest.py, whose teardown checks that nothing is left), put back as `up` made them after
each test. A job runs under hvdtrain.tools.launch.run (own session, killed with it on timeout) in a
thread while the test edits the hosts file; HVDTRAIN_ELASTIC_STEP_SLEEP (a test-only knob) keeps the tiny job
running long enough for the changes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hvdtrain import data as D
from hvdtrain.tools.launch import launcher_env, run
from support.cluster import kill_job_of, netns_pids, procs_mentioning

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
HOROVODRUN = str(Path(PY).parent / "horovodrun")
DISCOVER = ROOT / "mpi_jobs" / "discover_hosts.sh"
HOSTS = ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
ROWS, BATCH, EPOCHS, COMMIT_EVERY, EVAL_EVERY = 3000, 8, 4, 5, 50
STEP_SLEEP = "0.02"  # seconds per step: ~500 steps (4 epochs of 125 at 3 ranks) take >= 10 s
JOB_TIMEOUT = 150  # the launcher's limit (a hang shows as exit 124)
WAIT = 90  # for each stage of the job (start, shrink, grow)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the local cluster makes network "
                                                          "namespaces, a bridge and sshds")


def hvdtrain(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "hvdtrain", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


# --- no cluster needed --------------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["--backend", "mpi"], "backend is 'mpi'"),
    (["--backend", "single"], "backend is 'single'"),
    ([], "horovodrun's elastic mode"),  # plain python: no elastic launcher (auto backend: horovod)
    (["--resume"], "does not support --resume"),
    (["--checkpoint-every", "5", "--amp", "fp16"], "--checkpoint-every (commits: --elastic-commit-every), --amp fp16"),
    (["--elastic-commit-every", "0"], "elastic_commit_every must be"),
], ids=["mpi", "single", "no-launcher", "resume", "checkpoint-eval", "commit-0"])
def test_bad_elastic_input_is_one_line_and_exit_2(args, says, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOROVOD_")}
    result = hvdtrain("train", "--elastic", "--rows", "64", "--out", str(tmp_path / "out"), *args, env=env)
    assert result.returncode == 2, result
    assert len(result.stderr.splitlines()) == 1 and says in result.stderr, result.stderr
    assert result.stderr.startswith("hvdtrain: error: ") and "Traceback" not in result.stderr


def test_bad_step_sleep_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, HOROVOD_ELASTIC="1", HOROVOD_GLOO_RENDEZVOUS_ADDR="198.18.0.254",
               HVDTRAIN_ELASTIC_STEP_SLEEP="soon")
    result = hvdtrain("train", "--elastic", "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result
    assert "HVDTRAIN_ELASTIC_STEP_SLEEP='soon'" in result.stderr, result.stderr


def test_fit_elastic_needs_the_elastic_launcher(tmp_path):
    # fit() runs the same loop; elastic=True outside horovodrun's elastic mode is one clear error.
    script = ("import torch, hvdtrain\n"
              "try:\n"
              "    hvdtrain.fit(torch.nn.Linear(10, 1), 'regression', backend='horovod', elastic=True, rows=64,\n"
              f"                 out={str(tmp_path / 'out')!r})\n"
              "except hvdtrain.ConfigError as exc:\n"
              "    print('REFUSED', exc)\n")
    result = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if not k.startswith("HOROVOD_")})
    assert result.returncode == 0 and "REFUSED --elastic needs horovodrun's elastic mode" in result.stdout, result


def test_discover_hosts_prints_the_file(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# the elastic job's hosts\n198.18.0.1:1\n\n  198.18.0.2:2  # two slots\nnode-3\n")
    by_arg = subprocess.run(["bash", str(DISCOVER), str(hosts)], capture_output=True, text=True, timeout=10)
    by_env = subprocess.run(["bash", str(DISCOVER)], capture_output=True, text=True, timeout=10,
                            env=dict(os.environ, HVDTRAIN_DISCOVERY_FILE=str(hosts)))
    for result in (by_arg, by_env):
        assert result.returncode == 0 and result.stdout == "198.18.0.1:1\n198.18.0.2:2\nnode-3\n", result
    hosts.write_text("198.18.0.1:1\n198.18.0.2:x\n")
    for args, env, says in ((["bad"], {}, "does not exist"), ([], {"HVDTRAIN_DISCOVERY_FILE": ""}, "no hosts file"),
                            ([str(hosts)], {}, "'198.18.0.2:x'")):
        result = subprocess.run(["bash", str(DISCOVER), *args], capture_output=True, text=True, timeout=10,
                                env=dict(os.environ, **env))
        assert result.returncode == 2 and result.stdout == "" and len(result.stderr.splitlines()) == 1, result
        assert says in result.stderr, result.stderr


# --- on a cluster of 3 hosts --------------------------------------------------------------------

@pytest.fixture
def cluster(shared_cluster):
    yield shared_cluster.get(3)
    shared_cluster.reset()  # the SIGKILLed worker's host: anything of the job still there is killed


def write_hosts(path: Path, hosts: list[str]) -> None:
    """Atomically: the discovery script never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{h}:1\n" for h in hosts))
    os.replace(tmp, path)


def records(out: Path) -> list[dict]:
    path = out / "elastic.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


class Job:
    """The elastic job of a test, started by hvdtrain.tools.launch.run (own session, killed with it on
    timeout) in a thread, so the test can change the hosts while it runs."""

    def __init__(self, cluster, tmp_path: Path) -> None:
        self.hosts_file, self.out = tmp_path / "hosts", tmp_path / "out"
        write_hosts(self.hosts_file, HOSTS)
        env = launcher_env(dict(cluster.env, HVDTRAIN_DISCOVERY_FILE=str(self.hosts_file),
                                HVDTRAIN_ELASTIC_STEP_SLEEP=STEP_SLEEP))
        cmd = [HOROVODRUN, "--gloo", "-np", "3", "--min-np", "2", "--max-np", "3",
               "--host-discovery-script", str(DISCOVER), "--network-interface", "hvd0",
               PY, "-m", "hvdtrain", "train", "--backend", "horovod", "--elastic",
               "--elastic-commit-every", str(COMMIT_EVERY), "--data", "regression", "--rows", str(ROWS),
               "--batch-size", str(BATCH), "--epochs", str(EPOCHS), "--lr", "0.02", "--seed", "3",
               "--eval-every", str(EVAL_EVERY), "--log-every", "3",
               "--threads", "1", "--out", str(self.out)]
        self.done: dict = {}
        self.started = time.monotonic()
        self.marks: dict[str, float] = {}
        self.thread = threading.Thread(target=self._run, args=(cmd, env), daemon=True)
        self.thread.start()

    def _run(self, cmd: list[str], env: dict[str, str]) -> None:
        self.done["result"] = run(cmd, timeout=JOB_TIMEOUT, env=env, cwd=ROOT)

    def wait_for(self, what: str, ok) -> None:
        """Until ok(records) holds; fail (with the job's output) if the job ends first or WAIT passes."""
        deadline = time.monotonic() + WAIT
        while not ok(records(self.out)):
            alive = self.thread.is_alive()
            if alive and time.monotonic() <= deadline:
                time.sleep(0.2)
                continue
            if not alive and ok(records(self.out)):  # its last records came as it ended
                break
            kill_job_of(self.out)
            self.thread.join(30)
            output = self.done["result"].stdout[-6000:] if "result" in self.done else "(no output)"
            why = "ended" if not alive else f"did not get there in {WAIT} s"
            pytest.fail(f"elastic job {why} before {what}; records {records(self.out)[-5:]}\n{output}")
        self.marks[what] = round(time.monotonic() - self.started, 1)

    def result(self) -> subprocess.CompletedProcess:
        self.thread.join(JOB_TIMEOUT + 30)
        assert not self.thread.is_alive(), "hvdtrain.tools.launch.run did not return"
        result = self.done["result"]
        print(f"elastic job: {time.monotonic() - self.started:.1f} s; stages at {self.marks}", file=sys.stderr)
        assert result.returncode == 0, result.stdout[-8000:]
        return result


def commits_in_world(index: int, size: int):
    """ok(records): the number of commits in the index-th world, if that world has `size` ranks."""
    def ok(recs: list[dict]) -> int:
        worlds = [i for i, r in enumerate(recs) if r["event"] == "world"]
        if len(worlds) <= index or recs[worlds[index]]["world_size"] != size:
            return 0
        return sum(r["event"] == "commit" for r in recs[worlds[index]:])
    return ok


def check_run(out: Path, sizes: list[int]) -> tuple[dict, list[dict]]:
    """What every elastic run must show: its worlds, each re-partitioned; every sample accounted for;
    the same model on every rank of the final world. Returns the summary and the world records."""
    summary = json.loads((out / "summary.json").read_text())
    recs = records(out)
    worlds = [r for r in recs if r["event"] == "world"]
    assert [w["world_size"] for w in worlds] == sizes, worlds
    assert summary["world_sizes"] == sizes and summary["resets"] == len(sizes) - 1, summary

    # Re-partitioned at every reset: every rank read its own block of the new world, all rows covered.
    for w in worlds:
        assert w["block_rows"] == D.block_sizes(ROWS, w["world_size"]), w

    # Samples accounted for: between two commits, steps x batch x the world size of those steps;
    # every world starts at a committed step (a reset goes back to the last commit).
    commits = [r for r in recs if r["event"] == "commit"]
    previous = {"step": 0, "samples": 0}
    for r in commits:
        trained = (r["step"] - previous["step"]) * BATCH * r["world_size"]
        assert r["samples"] - previous["samples"] == trained, (previous, r)
        previous = r
    assert {w["step"] for w in worlds[1:]} <= {c["step"] for c in commits}, (worlds, commits)
    last = commits[-1]
    assert (last["step"], last["samples"]) == (summary["steps"], summary["samples"]), (last, summary)
    segments = summary["segments"]
    assert [s["world_size"] for s in segments] == sizes, segments
    assert [s["start_step"] for s in segments] == [w["step"] for w in worlds], (segments, worlds)
    assert sum(s["steps"] for s in segments) == summary["steps"], segments
    assert sum(s["steps"] * BATCH * s["world_size"] for s in segments) == summary["samples"], segments
    assert all(s["steps"] >= 2 * COMMIT_EVERY for s in segments), segments
    assert summary["epochs"] == EPOCHS
    # An epoch is ROWS samples (within a step or two of the world at its end): ~EPOCHS x ROWS in all.
    assert abs(summary["samples"] - EPOCHS * ROWS) <= EPOCHS * 2 * 3 * BATCH, summary["samples"]

    # The same model on every rank of the final world (and in rank 0's summary).
    ranks = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank-*.json"))]
    n = sizes[-1]
    assert sorted(r["rank"] for r in ranks) == list(range(n)) and {r["world_size"] for r in ranks} == {n}, ranks
    assert sorted(r["host"] for r in ranks) == sorted(worlds[-1]["hosts"]), (ranks, worlds[-1])
    assert {r["sha256"] for r in ranks} == {summary["sha256"]}, ranks
    assert {(r["step"], r["samples"]) for r in ranks} == {(summary["steps"], summary["samples"])}, ranks
    assert summary["final_loss"] < summary["first_loss"], summary

    # What every run writes, elastic included (train.py's loop): a metrics line for every step once
    # (a reset goes back to a commit, where the metrics were flushed), evaluations on schedule.
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, summary["steps"] + 1)), [m["step"] for m in metrics][-20:]
    assert all(m["loss"] == m["loss"] and m["samples_per_sec"] > 0 for m in metrics), metrics[:3]
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert evals and evals[-1]["step"] == summary["steps"] and evals[-1]["eval_loss"] == summary["eval_loss"], evals
    assert all(e["step"] % EVAL_EVERY == 0 for e in evals[:-1]) and len(evals) >= 2, evals
    assert summary["backend"] == "horovod" and summary["elastic"] is True, summary

    # No worker of the job outlives it (the one that left included).
    deadline = time.monotonic() + 20
    while procs_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert procs_mentioning(str(out)) == [], procs_mentioning(str(out))
    return summary, worlds


@needs_root
@pytest.mark.mpi
def test_elastic_job_shrinks_to_2_and_grows_back_to_3(cluster, tmp_path):
    job = Job(cluster, tmp_path)
    try:
        job.wait_for("6 commits at 3 ranks", lambda recs: commits_in_world(0, 3)(recs) >= 6)
        write_hosts(job.hosts_file, HOSTS[:2])  # host 3 leaves
        job.wait_for("4 commits at 2 ranks", lambda recs: commits_in_world(1, 2)(recs) >= 4)
        write_hosts(job.hosts_file, HOSTS)  # and comes back
        job.wait_for("2 commits at 3 ranks again", lambda recs: commits_in_world(2, 3)(recs) >= 2)
        result = job.result()
    finally:
        kill_job_of(job.out)  # only a failed test leaves anything to kill
    summary, worlds = check_run(job.out, [3, 2, 3])
    assert "world size 3 -> 2" in result.stdout and "world size 2 -> 3" in result.stdout, result.stdout[-4000:]
    assert [sorted(w["hosts"]) for w in worlds] == [["hvd-h1", "hvd-h2", "hvd-h3"], ["hvd-h1", "hvd-h2"],
                                                   ["hvd-h1", "hvd-h2", "hvd-h3"]], worlds
    # The leaving worker was ended by Horovod at the reset (0.28.1 aborts it in hvd.init), saying why.
    assert "198.18.0.3[0] has been removed from elastic job" in result.stdout, result.stdout[-4000:]


@needs_root
@pytest.mark.mpi
def test_elastic_job_goes_on_without_a_killed_worker(cluster, tmp_path):
    # No warning this time: host 3's worker is SIGKILLed mid-run. The others fail in a collective,
    # go back to the last commit and go on as 2 (Horovod blacklists the host; it stays in the file).
    job = Job(cluster, tmp_path)
    try:
        job.wait_for("8 commits at 3 ranks", lambda recs: commits_in_world(0, 3)(recs) >= 8)
        victims = [pid for pid in netns_pids("hvd-h3") if b"hvdtrain" in _cmdline(pid)]
        assert victims, "no hvdtrain worker on hvd-h3"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        job.wait_for("4 commits at 2 ranks", lambda recs: commits_in_world(1, 2)(recs) >= 4)
        result = job.result()
    finally:
        kill_job_of(job.out)
    summary, worlds = check_run(job.out, [3, 2])
    assert sorted(worlds[1]["hosts"]) == ["hvd-h1", "hvd-h2"], worlds
    assert "world size 3 -> 2" in result.stdout, result.stdout[-4000:]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
