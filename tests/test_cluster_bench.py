"""`hvdtrain compare` and `hvdtrain bench allreduce` across hosts, on the local cluster
(mpi_jobs/cluster_local.sh: hosts are network namespaces with their own sshd).

Needs root (namespaces, a bridge, sshd). Bad `--hosts` values are checked first, with no cluster;
the rest run on the first 2 hosts of the session's one cluster (the `shared_cluster` fixture,
tests/conftest.py: its teardown checks that no namespace, bridge, sshd, state folder or
known_hosts entry is left), put back as `up` made them after each test.
What proves the jobs really ran across hosts: every rank process of every compare run is seen in
a host's network namespace (both hosts, none in the launcher's), and the hosts' links carry at
least the ring model's bytes of a raw mpi4py bench run.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hvdtrain.tools.bench_allreduce import byte_sizes, iterations
from hvdtrain.tools.allreduce_impls import DEFAULT_IMPLS
from hvdtrain.tools.launch import launcher_env
from hvdtrain.strategies import variants
from support.cluster import Cluster, cluster_script, tx_bytes

if os.geteuid() != 0:
    pytest.skip("needs root: the local cluster makes network namespaces, a bridge and sshds",
                allow_module_level=True)

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MIB = 2 ** 20
HOSTS = ["hvd-h1", "hvd-h2"]


# --- bad --hosts: one line, exit 2, nothing launched (no cluster needed) ----------------------------

BAD_HOSTS = {
    "empty": "",
    "zero slots": "198.18.0.1:0",
    "slots not a number": "198.18.0.1:two",
    "no host name": ":1",
    "host twice": "198.18.0.1:1,198.18.0.1:1",
    "space in name": "198.18.0.1 :1",
    "empty entry": "198.18.0.1:1,,198.18.0.2:1",
    "fewer slots than --np 2": "198.18.0.1:1",
}


def tool_argv(tool: str, hosts: str, out: Path) -> list[str]:
    if tool == "compare":
        return ["compare", "--np", "2", "--hosts", hosts, "--out", str(out), "--rows", "2000"]
    return ["bench", "allreduce", "--np", "2", "--hosts", hosts, "--out", str(out)]


@pytest.mark.parametrize("tool", ["compare", "bench"])
@pytest.mark.parametrize("hosts", list(BAD_HOSTS.values()), ids=list(BAD_HOSTS))
def test_bad_hosts_say_one_line_and_launch_nothing(tool, hosts, tmp_path, monkeypatch, capsys):
    from hvdtrain.cli import main

    def no_launch(*args, **kwargs):
        raise AssertionError(f"launched {args[0] if args else kwargs} for --hosts {hosts!r}")

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    out = tmp_path / "out"
    assert main(tool_argv(tool, hosts, out)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured
    assert captured.err.startswith("hvdtrain") and "--hosts" in captured.err, captured.err
    assert not out.exists(), "nothing may be written before the hosts are valid"


def test_bad_hosts_from_the_command_line(tmp_path):
    """The same through the real CLI process, once per tool."""
    for tool in ("compare", "bench"):
        result = subprocess.run([PY, "-m", "hvdtrain", *tool_argv(tool, "h1:1,h1:2", tmp_path / tool)],
                                capture_output=True, text=True, timeout=120, env=launcher_env())
        assert result.returncode == 2 and result.stdout == "", result
        assert result.stderr.splitlines() == [result.stderr.strip()] and "names 'h1' twice" in result.stderr
        assert not (tmp_path / tool).exists()


# --- on 2 hosts of the shared cluster ------------------------------------------------------------------------

@pytest.fixture
def cluster(shared_cluster):
    """The first 2 hosts of the session's cluster; put back as `up` made them after the test."""
    yield shared_cluster.get(2)
    shared_cluster.reset()


class RankWatcher:
    """While a job runs, polls /proc: the network namespace (by host name; `launcher` is this
    process's own) of every Python process started as `python -m ...` (a rank, not horovodrun)."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, tuple[str, ...]]] = set()  # (host, argv)
        self.names = {os.stat(f"/run/netns/{h}").st_ino: h for h in HOSTS}
        self.names[os.stat("/proc/self/ns/net").st_ino] = "launcher"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            for proc in Path("/proc").iterdir():
                try:
                    if not proc.name.isdigit() or "python" not in os.readlink(proc / "exe"):
                        continue
                    argv = tuple((proc / "cmdline").read_text().split("\0")[:-1])
                    if len(argv) > 1 and argv[1] == "-m":
                        self.seen.add((self.names.get(os.stat(proc / "ns" / "net").st_ino, "other"), argv))
                except OSError:  # gone meanwhile
                    pass

    def hosts_of(self, out_dir: Path) -> set[str]:
        """Where the `hvdtrain train --out out_dir` ranks ran."""
        return {host for host, argv in self.seen if "train" in argv and "--out" in argv
                and argv[argv.index("--out") + 1] == str(out_dir)}

    def __enter__(self) -> "RankWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_compare_across_hosts(cluster, tmp_path):
    out = (tmp_path / "compare").resolve()
    hosts = cluster.env["HOSTS"]
    cmd = [PY, "-m", "hvdtrain", "compare", "--np", "2", "--hosts", hosts, "--out", str(out),
           "--rows", "2000", "--epochs", "1", "--sync-every", "1,4"]
    with RankWatcher() as watcher:
        result = cluster.job(cmd, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:]
    doc = json.loads((out / "compare.json").read_text())
    assert doc["np"] == 2 and doc["hosts"] == hosts
    expected = [v.label for v in variants([1, 4])]
    assert [r["label"] for r in doc["runs"]] == expected, "compare.json must list every strategy"
    for r in doc["runs"]:
        s = r["summary"]
        assert s["world_size"] == 2 and s["steps"] > 0 and math.isfinite(s["final_loss"]), r["label"]
        assert hosts in r["command"], r["command"]  # launched with --host / -H
        # Every run's ranks were seen in both hosts' namespaces, none in the launcher's.
        where = watcher.hosts_of(out / "runs" / r["label"].replace(" ", "_").replace("=", ""))
        assert where == set(HOSTS), (r["label"], where, sorted(watcher.seen))
    # The update rule does not depend on where the ranks are: Horovod == MPI averaging every step.
    runs = {r["label"]: r["summary"] for r in doc["runs"]}
    assert runs["horovod"]["final_loss"] == pytest.approx(runs["mpi k=1"]["final_loss"], rel=1e-5)


def available_impls() -> list[str]:
    have_hvd = importlib.util.find_spec("horovod") is not None
    return [i for i in DEFAULT_IMPLS if have_hvd or not i.startswith("horovod")]


def bench(cluster: Cluster, out: Path, impls: list[str], *extra: str) -> dict:
    cmd = [PY, "-m", "hvdtrain", "bench", "allreduce", "--np", "2", "--hosts", cluster.env["HOSTS"],
           "--out", str(out), "--impls", ",".join(impls), "--timeout", "120", *extra]
    result = cluster.job(cmd, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    return json.loads((out / "allreduce.json").read_text())


def test_bench_allreduce_across_hosts_every_implementation(cluster, tmp_path):
    impls = available_impls()
    doc = bench(cluster, tmp_path / "bench", impls, "--min-bytes", "4096", "--max-bytes", "262144",
                "--factor", "64", "--iters", "3", "--warmup", "1")
    meta, rows = doc["meta"], doc["rows"]
    assert meta["failed"] == {} and meta["hosts"] == cluster.env["HOSTS"] and meta["settings"]["np"] == 2
    # The links of every host up (the cluster's; the job's two among them), as `cluster_local.sh status` lists them.
    assert meta["links"]["summary"] == "unshaped" and sorted(meta["links"]["hosts"]) == cluster.all_hosts, meta["links"]
    # Across hosts Open MPI keeps its own allreduce choice (the forced ring is one-host only).
    assert not any(k.startswith("OMPI_MCA_coll_tuned") for k in meta["settings"]["job_env"]), meta["settings"]
    assert {r["impl"] for r in rows} == set(impls)
    for impl in impls:
        mine = [r for r in rows if r["impl"] == impl]
        assert [r["bytes"] for r in mine] == [4096, 262144], impl
        for r in mine:
            assert r["np"] == (1 if impl == "memcpy" else 2), r
            assert math.isfinite(r["busbw_gbps"]) and r["busbw_gbps"] > 0 and r["p50_us"] > 0, r


def test_bench_traffic_crosses_the_links_and_shaping_is_recorded(cluster, tmp_path):
    sizes = byte_sizes(1 * MIB, 4 * MIB, 4)
    iters, warmup = 3, 2
    shaped = cluster_script("shape", "--rate", "1gbit", state=cluster.state)
    try:
        assert shaped.returncode == 0, shaped.stderr
        before = sum(tx_bytes(h) for h in HOSTS)
        doc = bench(cluster, tmp_path / "bench", ["mpi4py"], "--min-bytes", str(sizes[0]),
                    "--max-bytes", str(sizes[-1]), "--factor", "4", "--iters", str(iters),
                    "--warmup", str(warmup), "--label", "test 1 Gbit/s")
        sent = sum(tx_bytes(h) for h in HOSTS) - before
    finally:
        unshaped = cluster_script("unshape", state=cluster.state)
    assert unshaped.returncode == 0, unshaped.stderr
    meta = doc["meta"]
    assert meta["label"] == "test 1 Gbit/s" and meta["links"]["summary"] == "htb rate 1Gbit per host", meta
    assert [r["bytes"] for r in doc["rows"]] == sizes
    # A ring allreduce has each of N ranks send 2(N-1)/N of the buffer per call; shared memory
    # would leave the hosts' links nearly still.
    n = 2
    calls = {b: sum(iterations(b, iters, warmup)) for b in sizes}
    ring = sum(n * 2 * (n - 1) / n * b * calls[b] for b in sizes)
    print(f"bench mpi4py across 2 hosts: links carried {sent / MIB:.1f} MiB, ring model {ring / MIB:.1f} MiB",
          file=sys.stderr)
    assert sent >= ring, f"hosts' links carried {sent / MIB:.1f} MiB, ring model {ring / MIB:.1f} MiB"
    # At 1 Gbit/s no row can beat the link: busbw <= 1e9/8 B/s per rank's egress.
    assert all(r["busbw_gbps"] <= 0.125 * 1.05 for r in doc["rows"]), doc["rows"]
