"""The mpi_jobs/ entry points, run for real on tiny settings from another working directory.

The environment given to each script has no venv on PATH and no OMPI_ALLOW_RUN_AS_ROOT*, so
a pass shows the script finds the virtualenv and sets up the launcher itself. DRY_RUN=1 tests
check how the command line is built (hosts, hostfile, oversubscription) without launching.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from hvdtrain.tools.launch import run

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "mpi_jobs"
VENV_BIN = str(ROOT / ".venv" / "bin")
TINY = ["--rows", "2000", "--epochs", "1"]
SETTINGS = ("NP", "HOSTS", "HOSTFILE", "CONFIG", "OUT", "VENV", "DRY_RUN", "MPI_ARGS", "HOROVODRUN_ARGS",
            "OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "VIRTUAL_ENV")


def job(name: str, tmp_path: Path, *args: str, timeout: float = 300, **settings: str) -> subprocess.CompletedProcess:
    """Run mpi_jobs/<name>.sh from tmp_path/elsewhere with a clean environment plus `settings`."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != VENV_BIN)
    env.update(settings)
    return run(["bash", str(JOBS / f"{name}.sh"), *args], timeout=timeout, env=env, cwd=cwd)


def command_line(result: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("+ ")]
    assert len(lines) == 1, result.stdout
    return lines[0]


CONFIG = "[optim]\nlr = 0.02\n"
SYNC_EVERY = "[sync]\nsync_every = 3\n"  # the MPI fallback's setting: only in its run's file


@pytest.mark.mpi
@pytest.mark.parametrize("name,launcher,backend", [
    ("horovod_mpi", "+ horovodrun -np 2 -H localhost:2 --mpi", "horovod"),
    ("horovod_gloo", "+ horovodrun --gloo -np 2 -H localhost:2", "horovod"),
    ("mpi_fallback", "+ mpirun -np 2 --bind-to none --map-by slot", "mpi"),
], ids=["horovod_mpi", "horovod_gloo", "mpi_fallback"])
def test_training_job(name, launcher, backend, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "run.toml").write_text(CONFIG + (SYNC_EVERY if backend == "mpi" else ""))
    result = job(name, tmp_path, *TINY, NP="2", OUT="out", CONFIG="run.toml")
    assert result.returncode == 0, result.stdout[-4000:]
    line = command_line(result)
    assert line.startswith(launcher) and f"--config {tmp_path}/elsewhere/run.toml" in line, line
    summary = json.loads((tmp_path / "elsewhere" / "out" / "summary.json").read_text())
    assert summary["backend"] == backend and summary["world_size"] == 2 and summary["steps"] > 0
    assert summary["config"]["optim"]["lr"] == 0.02
    assert summary["config"]["sync"]["sync_every"] == (3 if backend == "mpi" else 1)


@pytest.mark.mpi
def test_failing_job_returns_its_exit_code(tmp_path):
    result = job("mpi_fallback", tmp_path, *TINY, "--lr", "-1", NP="2", OUT=str(tmp_path / "bad"))
    assert result.returncode == 2, result.stdout[-3000:]
    assert "lr must be > 0" in result.stdout


@pytest.mark.mpi
def test_compare(tmp_path):
    out = tmp_path / "cmp"
    result = job("compare", tmp_path, *TINY, "--sync-every", "1", NP="2", OUT=str(out), timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    assert command_line(result).endswith(f"compare --np 2 --out {out} --rows 2000 --epochs 1 --sync-every 1")
    report = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["horovod", "mpi k=1", "ddp"]  # the registry, k=1
    assert "| strategy |" in (out / "report.md").read_text()


@pytest.mark.mpi
@pytest.mark.parametrize("kind,args", [
    ("allreduce", ["--max-bytes", "4096", "--iters", "5", "--warmup", "1"]),
    ("train", [*TINY, "--hidden", "16", "--sync-every", "1"]),
])
def test_bench(kind, args, tmp_path):
    out = tmp_path / f"bench-{kind}"
    result = job("bench", tmp_path, kind, *args, NP="2", OUT=str(out), timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    assert command_line(result).split()[2:7] == ["bench", kind, "--np", "2", "--out"]
    reports = list(out.glob("*.json"))
    assert reports, f"no JSON written under {out}"
    for path in reports:
        json.loads(path.read_text())


# --- command lines (DRY_RUN=1: printed, not run) -------------------------------------------

def dry(name: str, tmp_path: Path, *args: str, **settings: str) -> str:
    result = job(name, tmp_path, *args, timeout=60, DRY_RUN="1", **settings)
    assert result.returncode == 0, result.stdout
    return command_line(result)


def cores(monkeypatch) -> int:
    """The cores the scripts compare NP with: `nproc`, the CPUs this process may run on (its
    affinity). nproc also obeys OMP_NUM_THREADS / OMP_THREAD_LIMIT, so those are dropped."""
    for var in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT"):
        monkeypatch.delenv(var, raising=False)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def test_oversubscribe_only_with_more_ranks_than_cores(tmp_path, monkeypatch):
    # the rule, on any machine: --oversubscribe exactly when NP > cores
    n = cores(monkeypatch)
    many = str(n + 1)
    assert "--oversubscribe" in dry("mpi_fallback", tmp_path, NP=many)
    assert "--oversubscribe" not in dry("mpi_fallback", tmp_path, NP=str(n))
    assert "--oversubscribe" not in dry("mpi_fallback", tmp_path, NP="1")
    assert f"-np {many} -H localhost:{many} --mpi --mpi-args=--oversubscribe " in dry("horovod_mpi", tmp_path, NP=many)
    assert "--mpi-args" not in dry("horovod_mpi", tmp_path, NP="1")


def test_hosts_hostfile_and_extra_launcher_flags(tmp_path, monkeypatch):
    line = dry("horovod_mpi", tmp_path, NP="8", HOSTS="host1:4,host2:4", MPI_ARGS="--mca btl_tcp_if_include eth0",
               HOROVODRUN_ARGS="--verbose")
    over = "--oversubscribe " if 8 > cores(monkeypatch) else ""  # the rule above, whatever this machine has
    assert f"-np 8 -H host1:4,host2:4 --mpi --verbose '--mpi-args={over}--mca btl_tcp_if_include eth0'" in line
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    (tmp_path / "elsewhere" / "hosts.txt").write_text("host1 slots=4\nhost2 slots=4\n")
    hostfile = f"--hostfile {tmp_path}/elsewhere/hosts.txt"
    assert hostfile in dry("mpi_fallback", tmp_path, NP="8", HOSTFILE="hosts.txt", HOSTS="ignored:1")
    assert hostfile in dry("horovod_gloo", tmp_path, NP="8", HOSTFILE="hosts.txt")
    assert "-H" not in dry("mpi_fallback", tmp_path, NP="2").split()  # mpirun: this host by default


def test_defaults_and_pass_through(tmp_path):
    line = dry("horovod_gloo", tmp_path, "--lr", "0.1", "--note", "it's")
    assert line == (f"+ horovodrun --gloo -np 2 -H localhost:2 {ROOT}/.venv/bin/hvdtrain train --backend horovod "
                    f"--out {ROOT}/runs/horovod_gloo --lr 0.1 --note 'it'\\''s'")
    assert dry("bench", tmp_path, "allreduce").endswith(f"bench allreduce --np 2 --out {ROOT}/runs/bench-allreduce")
    compare = job("compare", tmp_path, timeout=60, DRY_RUN="1", HOSTS="a:2")
    assert "HOSTS/HOSTFILE are ignored" in compare.stdout


@pytest.mark.parametrize("name,args,settings,message", [
    ("bench", [], {}, "first argument '' must be the benchmark: allreduce or train"),
    ("bench", ["sort"], {}, "first argument 'sort' must be the benchmark"),
    ("bench", ["allreduce"], {"CONFIG": "/etc/hostname"}, "CONFIG is a training configuration"),
    ("mpi_fallback", [], {"NP": "two"}, "NP='two' is not a positive integer"),
    ("horovod_mpi", [], {"VENV": "/nonexistent/venv"}, "no virtualenv at VENV=/nonexistent/venv; run `make install`"),
    ("horovod_gloo", [], {"CONFIG": "missing.toml"}, "CONFIG=missing.toml is not a file"),
    ("mpi_fallback", [], {"HOSTFILE": "nohosts"}, "HOSTFILE=nohosts is not a file"),
])
def test_bad_settings_are_one_line_exit_2(name, args, settings, message, tmp_path):
    result = job(name, tmp_path, *args, timeout=60, DRY_RUN="1", **settings)
    assert result.returncode == 2, result.stdout
    assert result.stdout.strip() == f"{name}: {result.stdout.strip().split(': ', 1)[1]}"
    assert message in result.stdout and result.stdout.count("\n") == 1, result.stdout
