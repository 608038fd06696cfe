"""The local multi-host cluster (mpi_jobs/cluster_local.sh), for real: hosts are network
namespaces with their own sshd, and jobs are launched on them with plain mpirun/horovodrun.

Needs root (namespaces, a bridge, sshd). The cluster tests run on the first 2 hosts, then on all 3,
of the session's one cluster (the `shared_cluster` fixture, tests/conftest.py), whose teardown
checks that no namespace, bridge, sshd, state folder or known_hosts entry is left. The tests that
need no cluster up (bad input, a full up/down cycle of their own) ask for `no_cluster`; they come
first in the file, so they run before the shared cluster is up.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hvdtrain.tools.launch import launcher_env, mpirun_cmd, run
from support.cluster import (assert_nothing_left, bridge_exists, cluster_script, exported_env, known_hosts,
                             netns, sshds_of, tx_bytes)

if os.geteuid() != 0:
    pytest.skip("needs root: the local cluster makes network namespaces, a bridge and sshds",
                allow_module_level=True)

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "mpi_jobs" / "cluster_local.sh"
KNOWN_HOSTS = Path.home() / ".ssh" / "known_hosts"
PY = sys.executable
MIB = 2 ** 20


def train_args(n: int) -> list[str]:
    # Rows a multiple of the ranks: equal blocks, so the MPI fallback's default weights (block
    # sizes) are equal, the condition of MPI k=1 == Horovod (2000 rows on 3 ranks: 4.6e-3 apart).
    rows = 2000 + (-2000) % n
    return ["train", "--dtype", "float64", "--rows", str(rows), "--batch-size", "16", "--epochs", "1",
            "--lr", "0.05", "--seed", "3", "--threads", "1"]


def max_rel_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-300)) for k in a)


# --- no cluster up (these run first, before the shared cluster is up) --------------------------

@pytest.mark.parametrize("args", [["up", "0"], ["up", "abc"], ["up", "9"], ["up"], ["up", "2", "3"],
                                  ["shape", "--rate", "nonsense"], ["shape", "--rate", "1gbit", "--delay", "x"],
                                  ["shape", "--bogus"], ["frobnicate"], []],
                         ids=lambda a: " ".join(a) or "no-args")
def test_bad_arguments_say_one_line_and_exit_2(args, tmp_path, no_cluster):
    result = cluster_script(*args, state=tmp_path / "state")
    assert result.returncode == 2, result
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result
    assert result.stderr.startswith("cluster_local: "), result.stderr
    assert netns() == [] and not (tmp_path / "state").exists()


def test_not_root_is_refused(tmp_path):
    # setpriv drops to `nobody` for this one call; the script must refuse before touching anything.
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "bash", str(SCRIPT), "up", "1"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "needs root" in result.stderr and len(result.stderr.splitlines()) == 1, result


def test_up_then_down_leaves_nothing_behind(tmp_path, no_cluster):
    state, kh_before = tmp_path / "state", known_hosts()
    up = cluster_script("up", "1", state=state)
    try:
        assert up.returncode == 0, up.stderr
        assert netns() == ["hvd-h1"] and bridge_exists() and len(sshds_of(state)) >= 1
        # As many hosts as CPUs or fewer: each host's share is a contiguous block (one host: all of
        # them). The shared cluster's 3 hosts on this 2-core machine take the one-CPU-each branch.
        allowed = sorted(os.sched_getaffinity(0))
        assert all(sorted(os.sched_getaffinity(pid)) == allowed for pid in sshds_of(state)), allowed
    finally:
        down = cluster_script("down", state=state)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(state, kh_before)
    again = cluster_script("down", state=state)  # idempotent: nothing up is fine
    assert again.returncode == 0, again.stderr


# --- on the first 2, then all 3 hosts of the shared cluster -----------------------------------

@pytest.fixture(params=[2, 3], ids=lambda n: f"{n}hosts")
def cluster(request, shared_cluster):
    """The first n hosts (HOSTS and HOSTFILE name only them) of the session's cluster; after the
    test its hosts are put back as `up` made them (support.cluster.restore_hosts)."""
    yield shared_cluster.get(request.param)
    shared_cluster.reset()


def test_up_exports_the_launch_environment(cluster):
    for env, n in ((exported_env(cluster.exports), cluster.size), (cluster.env, cluster.n)):  # `up`'s, the view's
        addresses = [f"198.18.0.{k}" for k in range(1, n + 1)]
        assert env["HOSTS"] == ",".join(f"{a}:1" for a in addresses)
        assert Path(env["HOSTFILE"]).read_text() == "".join(f"{a} slots=1\n" for a in addresses)
        assert env["OMPI_MCA_btl_tcp_if_include"] == env["OMPI_MCA_oob_tcp_if_include"] == "198.18.0.0/24"
        assert env["HVDTRAIN_CLUSTER_DIR"] == str(cluster.state)
        assert env["OMPI_MCA_plm_rsh_agent"].startswith(str(cluster.state))
    assert (cluster.state / "env").read_text() == cluster.exports  # `source STATE/env` does the same


def test_up_twice_is_refused_with_the_fix(cluster):
    result = cluster_script("up", "1", state=cluster.state)
    assert result.returncode == 2 and "down" in result.stderr and len(result.stderr.splitlines()) == 1, result
    assert netns() == cluster.all_hosts


def test_sshd_takes_only_the_cluster_key(cluster, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    base = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5"]
    other = subprocess.run(["ssh", "-F", "/dev/null", *base[1:], "-i", str(tmp_path / "other"), "root@198.18.0.1",
                            "true"], capture_output=True, text=True, timeout=30)
    assert other.returncode == 255 and "Permission denied" in other.stderr, other
    ours = subprocess.run(["ssh", "-F", "/dev/null", *base[1:], "-i", str(cluster.state / "id_ed25519"),
                           "root@198.18.0.1", "hostname"], capture_output=True, text=True, timeout=30)
    assert ours.returncode == 0 and ours.stdout.strip() == "hvd-h1", ours


def test_ranks_run_on_different_hosts_and_traffic_crosses_their_links(cluster):
    probe = ("import os, socket; print('PROBE', os.environ['OMPI_COMM_WORLD_RANK'], socket.gethostname(), "
             "os.stat('/proc/self/ns/net').st_ino, flush=True)")
    n = cluster.n
    result = cluster.job(["mpirun", "-np", str(n), "--hostfile", cluster.env["HOSTFILE"], PY, "-c", probe], timeout=60)
    assert result.returncode == 0, result.stdout[-3000:]
    ranks = {int(r): (host, int(ino)) for r, host, ino in re.findall(r"^PROBE (\d+) (\S+) (\d+)$", result.stdout, re.M)}
    assert sorted(ranks) == list(range(n)), result.stdout
    assert [ranks[r][0] for r in range(n)] == cluster.hosts  # the hostfile's order, one slot each
    inodes = {ino for _, ino in ranks.values()}
    own_ns = os.stat("/proc/self/ns/net").st_ino
    assert len(inodes) == n and own_ns not in inodes, (ranks, own_ns)

    # A 64 MiB float64 allreduce per rank; the hosts' links must carry at least what a ring moves:
    # each of N ranks sends 2(N-1)/N of the payload (reduce-scatter + allgather). Shared memory
    # would leave the counters nearly still.
    payload = 64 * MIB
    allreduce = ("import numpy as np; from mpi4py import MPI; c = MPI.COMM_WORLD; "
                 f"a = np.full({payload // 8}, c.rank + 1.0); b = np.empty_like(a); c.Allreduce(a, b); "
                 "assert b[0] == b[-1] == c.size * (c.size + 1) / 2, b[:3]; print('ALLREDUCE OK', c.rank, flush=True)")
    before = [tx_bytes(h) for h in cluster.hosts]
    result = cluster.job(["mpirun", "-np", str(n), "--hostfile", cluster.env["HOSTFILE"], PY, "-c", allreduce], timeout=120)
    sent = sum(tx_bytes(h) for h in cluster.hosts) - sum(before)
    assert result.returncode == 0 and result.stdout.count("ALLREDUCE OK") == n, result.stdout[-3000:]
    ring_bytes = n * 2 * (n - 1) / n * payload
    print(f"{n} hosts: links carried {sent / MIB:.1f} MiB for a ring model of {ring_bytes / MIB:.1f} MiB", file=sys.stderr)
    assert sent >= 0.9 * ring_bytes, f"hosts' links carried {sent / MIB:.1f} MiB, ring model {ring_bytes / MIB:.1f} MiB"


def test_each_host_gets_its_share_of_the_cores(cluster):
    """Hosts share this machine's CPUs: each host's processes are pinned to its share, so a rank's
    default threads (cores // ranks on the host) do not oversubscribe the real cores. The shares
    are those of the whole cluster (`up` pinned them); rank k runs on host k+1 of the first n."""
    allowed = sorted(os.sched_getaffinity(0))
    probe = "import os; print('CPUS', os.environ['OMPI_COMM_WORLD_RANK'], sorted(os.sched_getaffinity(0)), flush=True)"
    n, size = cluster.n, cluster.size
    result = cluster.job(["mpirun", "-np", str(n), "--host", cluster.env["HOSTS"], "--bind-to", "none",
                          PY, "-c", probe], timeout=60)
    assert result.returncode == 0, result.stdout[-3000:]
    got = {int(r): json.loads(cpus) for r, cpus in re.findall(r"^CPUS (\d+) (\[.*\])$", result.stdout, re.M)}
    if size <= len(allowed):  # contiguous equal shares, together all the allowed CPUs
        expected = {k: allowed[k * len(allowed) // size:(k + 1) * len(allowed) // size] for k in range(n)}
    else:  # one CPU each, round robin
        expected = {k: [allowed[k % len(allowed)]] for k in range(n)}
    assert got == expected, (got, expected)


def test_shaping_limits_the_rate(cluster):
    payload, rate_bits = 16 * MIB, 100e6
    shaped = cluster_script("shape", "--rate", "100mbit", "--delay", "0.5ms", state=cluster.state)
    try:
        assert shaped.returncode == 0, shaped.stderr
        status = cluster_script("status", state=cluster.state)
        assert status.returncode == 0 and status.stdout.count(" htb") == cluster.size, status.stdout
        timed = ("import time, numpy as np; from mpi4py import MPI; c = MPI.COMM_WORLD; "
                 f"a = np.ones({payload // 8}); b = np.empty_like(a); c.Allreduce(a, b); c.Barrier(); "
                 "t = time.perf_counter(); c.Allreduce(a, b); c.Barrier(); print('SECONDS', time.perf_counter() - t, flush=True)")
        n = cluster.n
        result = cluster.job(["mpirun", "-np", str(n), "--hostfile", cluster.env["HOSTFILE"], PY, "-c", timed], timeout=120)
        assert result.returncode == 0, result.stdout[-3000:]
        seconds = max(float(s) for s in re.findall(r"^SECONDS (\S+)$", result.stdout, re.M))
        # Every rank sends at least the ring's 2(n-1)/n of the payload through its own shaped
        # egress (a ring is bandwidth-optimal), all in parallel: that is the least time it can take.
        model = 2 * (n - 1) / n * payload * 8 / rate_bits
        print(f"{n} hosts: 16 MiB allreduce at 100 Mbit/s took {seconds:.2f} s (rate model {model:.2f} s)",
              file=sys.stderr)
        assert seconds >= 0.8 * model, f"allreduce took {seconds:.2f} s, a 100 Mbit/s link needs {model:.2f} s"
    finally:
        unshaped = cluster_script("unshape", state=cluster.state)
    assert unshaped.returncode == 0, unshaped.stderr
    assert " htb" not in cluster_script("status", state=cluster.state).stdout


@pytest.mark.parametrize("cluster", [3], indirect=True, ids=["3hosts"])  # uneven ring steps; 2 hosts: the tests above
def test_training_across_hosts_matches_one_host(cluster, tmp_path):
    hostfile, hosts, np = cluster.env["HOSTFILE"], cluster.env["HOSTS"], str(cluster.n)
    train = train_args(cluster.n)
    horovodrun = str(Path(PY).parent / "horovodrun")
    runs = {  # plain launcher lines, as a user types them after `eval "$(cluster_local.sh up 2)"`
        "mpirun horovod": ["mpirun", "-np", np, "--hostfile", hostfile, PY, "-m", "mpi4py", "-m", "hvdtrain",
                           *train, "--backend", "horovod"],
        "mpirun mpi k=1": ["mpirun", "-np", np, "--hostfile", hostfile, PY, "-m", "mpi4py", "-m", "hvdtrain",
                           *train, "--backend", "mpi", "--sync-every", "1"],
        "horovodrun gloo": [horovodrun, "-np", np, "-H", hosts, "--gloo", PY, "-m", "hvdtrain", *train,
                            "--backend", "horovod"],
        "horovodrun mpi": [horovodrun, "-np", np, "-H", hosts, "--mpi", PY, "-m", "hvdtrain", *train,
                           "--backend", "horovod"],
    }
    models = {}
    for label, cmd in runs.items():
        out = tmp_path / label.replace(" ", "-").replace("=", "")
        result = cluster.job(cmd + ["--out", str(out)], timeout=240)
        assert result.returncode == 0, f"{label}:\n{result.stdout[-4000:]}"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["world_size"] == cluster.n and summary["steps"] > 0, (label, summary)
        models[label] = torch_load(out / "model.pt")
    # The same Horovod job on one host, over shared memory (no cluster environment).
    local = tmp_path / "local-horovod"
    result = run(mpirun_cmd(cluster.n, ["hvdtrain", *train, "--backend", "horovod", "--out", str(local)]),
                 timeout=240, env=launcher_env())
    assert result.returncode == 0, result.stdout[-4000:]
    models["local horovod"] = torch_load(local / "model.pt")

    errors = {label: max_rel_err(m, models["mpirun horovod"]) for label, m in models.items()}
    print(f"{cluster.n} hosts: max relative error vs cross-host Horovod (mpirun):", errors, file=sys.stderr)
    assert all(e <= 1e-12 for e in errors.values()), errors  # float64; README: measured <= 3e-14


def torch_load(path: Path) -> dict:
    import torch

    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()), path
    return {k: v.double() for k, v in state.items()}


@pytest.mark.parametrize("cluster", [2], indirect=True, ids=["2hosts"])  # 2 hosts x 2 ranks
def test_hierarchy_across_hosts_keeps_the_weights(cluster, tmp_path):
    """2 hosts x 2 ranks, unequal blocks: hierarchy K,K (host average, leaders, broadcast) gives
    exactly the global weighted average every K; with K_LOCAL < K_GLOBAL the host groups average
    among themselves in between, which neither plain k matches."""
    hosts = ",".join(f"{h.rsplit(':', 1)[0]}:2" for h in cluster.env["HOSTS"].split(","))
    train = [*train_args(4)[:4], "2002", *train_args(4)[5:]]  # 2002 rows on 4 ranks: unequal weights
    assert train[train.index("--rows") + 1] == "2002"
    models = {}
    for label, flags in {"k4": ["--sync-every", "4"], "k2": ["--sync-every", "2"],
                         "hier4,4": ["--hierarchy", "4,4"], "hier2,4": ["--hierarchy", "2,4"]}.items():
        out = tmp_path / label.replace(",", "-")
        cmd = ["mpirun", "-np", "4", "-H", hosts, PY, "-m", "mpi4py", "-m", "hvdtrain", *train,
               "--backend", "mpi", *flags, "--out", str(out)]
        result = cluster.job(cmd, timeout=240)
        assert result.returncode == 0, f"{label}:\n{result.stdout[-4000:]}"
        models[label] = torch_load(out / "model.pt")
    same, apart = max_rel_err(models["hier4,4"], models["k4"]), max_rel_err(models["hier2,4"], models["k4"])
    print(f"hierarchy across 2 hosts: 4,4 vs k=4 {same:.2e}; 2,4 vs k=4 {apart:.2e}, "
          f"vs k=2 {max_rel_err(models['hier2,4'], models['k2']):.2e}", file=sys.stderr)
    assert same <= 1e-12  # float64; measured 2.5e-15
    assert apart > 1e-6 and max_rel_err(models["hier2,4"], models["k2"]) > 1e-6
