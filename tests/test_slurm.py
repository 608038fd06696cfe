"""End to end: every slurm/*.sbatch script submitted to a real single-node Slurm.

A module fixture starts slurmctld + slurmd on this machine with mpi_jobs/slurm_local.sh (in a
private state dir, on free ports) and always stops them. Jobs run with tiny settings and the
GPU requests overridden on the sbatch command line, as a user on a CPU node would.
Needs root (the local daemons run as root); skipped otherwise.
"""
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "slurm"
SLURM_LOCAL = ROOT / "mpi_jobs" / "slurm_local.sh"
JOB_TIMEOUT = 300  # seconds for one `sbatch --wait`
PREEMPTED = 99  # hvdtrain's exit code for "checkpointed on a signal, resume me"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the local slurmctld/slurmd need root (run the tests as root, e.g. in CI)"
)

# Training runs just long enough to show a falling loss; overrides a CPU-only node needs.
TINY = {"HVDTRAIN_ROWS": "2048", "HVDTRAIN_EPOCHS": "2", "HVDTRAIN_BATCH_SIZE": "32"}
NO_GPU = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-task=0", "--time=10"]


def _free_port_pair() -> int:
    """A port P with P and P+1 free (slurmctld, slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free TCP ports found")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment (SLURM_CONF=...) of a running single-node Slurm; daemons stopped afterwards."""
    state = tmp_path_factory.mktemp("slurm-state")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_LOCAL_PORT"] = str(_free_port_pair())
    try:
        started = subprocess.run(
            ["bash", str(SLURM_LOCAL), "start", str(state)],
            env=env, capture_output=True, text=True, timeout=900,
        )
        assert started.returncode == 0, f"slurm_local.sh start failed:\n{started.stderr}"
        m = re.search(r"^export SLURM_CONF=(\S+)$", started.stdout, re.M)
        assert m, f"slurm_local.sh start printed no SLURM_CONF:\n{started.stdout}"
        env["SLURM_CONF"] = m.group(1)
        yield env
    finally:
        _cancel_all(env)
        subprocess.run(["bash", str(SLURM_LOCAL), "stop", str(state)], env=env, timeout=120)


def _cancel_all(env):
    if "SLURM_CONF" in env:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True, timeout=30)


def _export(settings: dict) -> str:
    for k, v in settings.items():
        assert "," not in v, f"--export cannot carry a comma: {k}={v}"
    return ",".join(["ALL"] + [f"{k}={v}" for k, v in settings.items()])


def _job_id(text: str) -> str:
    m = re.search(r"Submitted batch job (\d+)", text)
    assert m, f"no job id in sbatch output:\n{text}"
    return m.group(1)


def _logs(workdir: Path, job_name: str, job_id: str) -> str:
    """The job's %x-%j.out and %x-%j.err, which must exist under those names."""
    out, err = workdir / f"{job_name}-{job_id}.out", workdir / f"{job_name}-{job_id}.err"
    assert out.is_file() and err.is_file(), f"expected {out.name} and {err.name} in {sorted(os.listdir(workdir))}"
    return f"--- {out.name}\n{out.read_text()}--- {err.name}\n{err.read_text()}"


def submit_wait(env, script: str, workdir: Path, options=(), settings=None, timeout=JOB_TIMEOUT):
    """`sbatch --wait` from workdir; returns (exit code, job id, sbatch's output)."""
    cmd = ["sbatch", "--wait", *options, f"--export={_export(settings or {})}", str(SLURM_DIR / script)]
    try:
        p = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        _cancel_all(env)
        pytest.fail(f"{script} did not finish in {timeout}s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")
    return p.returncode, _job_id(p.stdout + p.stderr), p.stdout + p.stderr


def assert_trained(out: Path, world_size: int):
    summary_path = out / "summary.json"
    assert summary_path.is_file(), f"no summary.json in {out}: {sorted(os.listdir(out))}"
    summary = json.loads(summary_path.read_text())
    assert summary["world_size"] == world_size, summary
    if summary["start_step"] == 0:  # a resumed run's first_loss is its first step after the resume
        assert summary["final_loss"] < summary["first_loss"], summary
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(losses) >= 2 and losses[-1] < losses[0], f"loss did not decrease: first {losses[:1]}, last {losses[-1:]}"
    return summary


def assert_hvdtrain_mpi_settings(summary):
    """Open MPI in the ranks holds hvdtrain's settings (hvdtrain/comm/env.py; both tasks on one node),
    as rank 0 read them back through MPI_T into the summary (tests/test_settings_reach_mpi.py does
    the same under mpirun and horovodrun)."""
    from hvdtrain.comm.env import MCA_PREFIX, job_env_defaults
    want = {k[len(MCA_PREFIX):]: int(v) for k, v in job_env_defaults(2).items() if k.startswith(MCA_PREFIX)}
    assert summary.get("mpi_settings") == want, summary.get("mpi_settings")


def test_train_gpu_script_on_cpu_node(slurm, tmp_path):
    """train.sbatch (2 nodes x 4 GPUs by default) runs on one GPU-less node with command-line overrides."""
    out = tmp_path / "run"
    rc, job, text = submit_wait(slurm, "train.sbatch", tmp_path, NO_GPU, {**TINY, "HVDTRAIN_OUT": str(out)})
    logs = _logs(tmp_path, "hvdtrain", job)
    assert rc == 0, f"{text}\n{logs}"
    assert "srun --mpi=pmix hvdtrain train --backend horovod" in logs
    summary = assert_trained(out, world_size=2)
    assert summary["backend"] == "horovod"
    assert_hvdtrain_mpi_settings(summary)


@pytest.mark.parametrize(
    "backend,launcher",
    [("mpi", "srun"), ("horovod", "mpirun"), ("horovod", "horovodrun")],
)
def test_train_cpu(slurm, tmp_path, backend, launcher):
    """train_cpu.sbatch with each launcher; the run directory defaults to runs/%x-%j in the submit dir."""
    settings = {**TINY, "HVDTRAIN_BACKEND": backend, "HVDTRAIN_LAUNCHER": launcher}
    if backend == "mpi":
        settings["HVDTRAIN_SYNC_EVERY"] = "2"
    rc, job, text = submit_wait(slurm, "train_cpu.sbatch", tmp_path, ["--ntasks=2", "--time=10"], settings)
    logs = _logs(tmp_path, "hvdtrain-cpu", job)
    assert rc == 0, f"{text}\n{logs}"
    summary = assert_trained(tmp_path / "runs" / f"hvdtrain-cpu-{job}", world_size=2)
    assert summary["backend"] == backend
    assert_hvdtrain_mpi_settings(summary)


def test_compare(slurm, tmp_path):
    out = tmp_path / "cmp"
    rc, job, text = submit_wait(
        slurm, "compare.sbatch", tmp_path, ["--ntasks=2", "--time=10"],
        {**TINY, "HVDTRAIN_SYNC_EVERY": "4", "HVDTRAIN_OUT": str(out)},
    )
    logs = _logs(tmp_path, "hvdtrain-compare", job)
    assert rc == 0, f"{text}\n{logs}"
    assert (out / "report.md").is_file() and (out / "report.md").read_text().strip(), logs
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["horovod", "mpi k=4", "ddp"], runs  # every registered strategy
    for r in runs:
        assert r["summary"]["world_size"] == 2 and r["summary"]["final_loss"] < r["summary"]["first_loss"], r


@pytest.mark.parametrize(
    "script,options,error",
    [
        # As written: 2 nodes with GPUs, on a 1-node cluster without GPUs.
        ("train.sbatch", [], r"gres|node count|node configuration"),
        ("train_cpu.sbatch", ["--ntasks=64"], r"processors|node configuration"),
        ("train_cpu.sbatch", ["--nodes=3"], r"node count|node configuration"),
        ("compare.sbatch", ["--mem=64T"], r"memory|node configuration"),
    ],
)
def test_oversized_job_is_refused(slurm, tmp_path, script, options, error):
    """A job that asks for more than the cluster has fails at submission instead of pending forever."""
    t0 = time.monotonic()
    p = subprocess.run(
        ["sbatch", *options, str(SLURM_DIR / script)],
        cwd=tmp_path, env=slurm, capture_output=True, text=True, timeout=60,
    )
    assert p.returncode != 0, f"sbatch accepted an impossible job: {p.stdout}"
    assert re.search(error, p.stderr, re.I), p.stderr
    assert time.monotonic() - t0 < 30
    queue = subprocess.run(["squeue", "-h", "--states=PENDING"], env=slurm, capture_output=True, text=True, timeout=30)
    assert queue.stdout.strip() == "", f"refused job left in the queue:\n{queue.stdout}"


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, tmp_path):
    """SIGUSR1 to the batch script (as --signal=B:USR1@120 sends before the time limit): the job
    checkpoints, exits 99, requeues itself under the same id and resumes from the checkpoint."""
    out = tmp_path / "run"
    settings = {
        # 256 steps per rank: long enough to be caught mid-run just after the first checkpoint.
        "HVDTRAIN_ROWS": "16384", "HVDTRAIN_EPOCHS": "1", "HVDTRAIN_BATCH_SIZE": "32",
        "HVDTRAIN_CHECKPOINT_EVERY": "20", "HVDTRAIN_OUT": str(out),
    }
    cmd = ["sbatch", "--wait", "--ntasks=2", "--time=10", f"--export={_export(settings)}",
           str(SLURM_DIR / "train_cpu.sbatch")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        ckpt = out / "checkpoints"
        while not any(ckpt.glob("ckpt-*.pt")):
            assert proc.poll() is None, f"job ended before its first checkpoint:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.2)
        queue = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm, capture_output=True, text=True, timeout=30)
        job = queue.stdout.split()[0]
        sig = subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, capture_output=True,
                             text=True, timeout=30)
        assert sig.returncode == 0, sig.stderr
        text, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        proc.kill()
        _cancel_all(slurm)
        raise
    assert _job_id(text) == job
    logs = _logs(tmp_path, "hvdtrain-cpu", job)
    assert proc.returncode == 0, f"{text}\n{logs}"
    assert "got SIGUSR1" in logs and f"requeueing job {job}" in logs, logs
    assert f"{job} (run 2)" in logs, f"job was not requeued:\n{logs}"
    second_run = logs[logs.index(f"{job} (run 2)"):]
    assert re.search(r"running: .*hvdtrain train .*--resume", second_run), logs
    assert_trained(out, world_size=2)
