"""Writes that fail are reported, and lose nothing: a full disk (a small tmpfs), a read-only file
system (a read-only bind mount), a folder without write permission (root without
CAP_DAC_OVERRIDE, through setpriv) and a quota (injected: this kernel's tmpfs has no quota
support) each end the run with one line naming the path and the reason, exit EXIT_WRITE, no
traceback; the previous checkpoint stays loadable, no temporary or partial file is left, and in a
2-rank job every rank ends.

Needs root (mount); every mount is undone in the fixture's teardown, every job runs in a session of
its own with a timeout and is killed with it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hvdtrain.checkpoint import atomic_torch_save, atomic_write_text, save_checkpoint
from hvdtrain.errors import EXIT_USAGE, EXIT_WRITE, WriteError
from support import jobs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts a tmpfs and read-only bind mounts")

TRAIN = ["--model", "mlp", "--hidden", "64,64", "--batch-size", "32", "--log-every", "5"]
"""A model whose checkpoint is a known size (about 28 KB: mlp 64,64 on the 2000-row regression set)."""


class Mounts:
    """Mounts made by one test; all undone (in reverse) when the test ends, pass or fail."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    def _mount(self, *args: str, target: Path) -> None:
        subprocess.run(["mount", *args], check=True, timeout=30)
        self.made.append(target)

    def tmpfs(self, folder: Path, size: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder), target=folder)
        return folder

    def read_only(self, folder: Path, tries: int = 50) -> Path:
        """Bind `folder` onto itself and remount that read-only (retried while a file is open for
        writing there: the kernel refuses a read-only remount then)."""
        self._mount("--bind", str(folder), str(folder), target=folder)
        for _ in range(tries):
            if subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], timeout=30,
                              capture_output=True).returncode == 0:
                return folder
            time.sleep(0.01)
        raise AssertionError(f"could not remount {folder} read-only")

    def undo(self) -> None:
        for target in reversed(self.made):
            if subprocess.run(["umount", str(target)], timeout=30, capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(target)], timeout=30, capture_output=True)
        self.made.clear()


@pytest.fixture
def mounts(tmp_path):
    made = Mounts()
    try:
        yield made
    finally:
        made.undo()
        left = [line for line in Path("/proc/self/mounts").read_text().splitlines() if str(tmp_path) in line]
        assert not left, f"left mounted: {left}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "regression"
    result = jobs.run_job([sys.executable, "-m", "hvdtrain", "data", "make", "regression", "--rows", "2000",
                           "--out", str(folder)], timeout=120)
    assert result.returncode == 0, result.stderr
    return folder


def train(out: Path, data: Path, *extra: str, timeout: float = 300, wrap: list[str] = ()) -> subprocess.CompletedProcess:
    return jobs.run_job([*wrap, sys.executable, "-m", "hvdtrain", "train", *TRAIN, "--data", str(data),
                         "--out", str(out), *extra], timeout=timeout)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The run's one message: stderr holds it and progress lines only, and no traceback anywhere."""
    text = result.stdout + result.stderr
    assert "Traceback" not in text and "Exception in thread" not in text, text[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def no_temp_files(folder: Path) -> None:
    left = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not left, f"temporary files left: {left}"


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("ckpt-*.pt"))


def test_disk_full_at_a_later_checkpoint_keeps_the_previous_and_resume_finishes(tmp_path, mounts, data):
    small = mounts.tmpfs(tmp_path / "small", "48k")  # the first checkpoint fits, a later one does not
    out = small / "run"
    result = train(out, data, "--checkpoint-every", "10", "--epochs", "2")
    assert result.returncode == EXIT_WRITE, result.stderr[-3000:]
    line = one_line(result)
    kept = checkpoints(out)
    assert kept, "not even the first checkpoint fitted: make the tmpfs larger"
    step = torch.load(kept[-1], weights_only=True)["step"]  # the previous checkpoint loads
    failed = out / "checkpoints" / f"ckpt-{step + 10:08d}.pt"
    assert line == (f"hvdtrain: error: cannot write {failed}: No space left on device (ENOSPC); free space "
                    f"or choose another --out"), line
    assert not failed.exists()
    no_temp_files(small)
    assert all(json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines())  # whole lines

    roomy = tmp_path / "roomy"
    shutil.copytree(out, roomy)
    resumed = train(roomy, data, "--checkpoint-every", "10", "--epochs", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((roomy / "summary.json").read_text())
    assert summary["start_step"] == step and summary["steps"] > step


def test_disk_full_at_the_end_leaves_no_partial_model(tmp_path, mounts, data):
    small = mounts.tmpfs(tmp_path / "small", "64k")  # metrics and the last checkpoint fit; model.pt does not
    out = small / "run"
    result = train(out, data, "--epochs", "2")
    assert result.returncode == EXIT_WRITE, result.stderr[-3000:]
    assert one_line(result) == (f"hvdtrain: error: cannot write {out / 'model.pt'}: No space left on device "
                                f"(ENOSPC); free space or choose another --out")
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()
    torch.load(checkpoints(out)[-1], weights_only=True)
    no_temp_files(small)


def test_disk_full_while_logging_cuts_back_to_whole_lines(tmp_path, mounts, data):
    small = mounts.tmpfs(tmp_path / "small", "8k")
    out = small / "run"
    result = train(out, data, "--epochs", "3", "--log-every", "1")
    assert result.returncode == EXIT_WRITE, result.stderr[-3000:]
    assert one_line(result) == (f"hvdtrain: error: cannot write {out / 'metrics.jsonl'}: No space left on "
                                f"device (ENOSPC); free space or choose another --out")
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(row) for row in text.splitlines())


def test_disk_full_under_tensorboard_is_one_line(tmp_path, mounts, data):
    """TensorBoard writes in a thread of its own: its error is reported once, by the run."""
    small = mounts.tmpfs(tmp_path / "small", "16k")
    out = small / "run"
    result = train(out, data, "--epochs", "3", "--log-every", "1", "--tensorboard")
    assert result.returncode == EXIT_WRITE, result.stderr[-3000:]
    line = one_line(result)
    assert line.startswith(f"hvdtrain: error: cannot write {out}/") and "(ENOSPC)" in line, line


def test_read_only_out_fails_fast_with_one_line(tmp_path, mounts, data):
    out = tmp_path / "run"
    first = train(out, data, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    mounts.read_only(out)
    result = train(out, data, "--epochs", "1", "--overwrite", timeout=120)
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    assert one_line(result) == (f"hvdtrain: error: output folder {str(out)!r} is not writable (Read-only file "
                                f"system); choose another --out")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_built_in_data_that_does_not_fit_is_one_line_before_training(tmp_path, mounts):
    small = mounts.tmpfs(tmp_path / "small", "8k")
    out = small / "run"
    result = jobs.run_job([sys.executable, "-m", "hvdtrain", "train", "--out", str(out), "--epochs", "1"], timeout=300)
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    line = one_line(result)
    assert line.startswith(f"hvdtrain: error: cannot write {out}/data/regression-") and line.endswith(
        ": No space left on device (ENOSPC); free space or choose another --out"), line
    assert not [p for p in (out / "data").iterdir()], "a partial data set was left"


@pytest.mark.parametrize("folder,extra", [("checkpoints", ["--checkpoint-every", "10"]),
                                          ("tensorboard", ["--tensorboard"])])
def test_read_only_folder_inside_out(tmp_path, mounts, data, folder, extra):
    out = tmp_path / "run"
    (out / folder).mkdir(parents=True)
    mounts.read_only(out / folder)
    result = train(out, data, "--epochs", "1", *extra)
    assert result.returncode == EXIT_WRITE, result.stderr[-3000:]
    line = one_line(result)
    target = out / "checkpoints" / "ckpt-00000010.pt" if folder == "checkpoints" else out / "tensorboard"
    assert line == (f"hvdtrain: error: cannot write {target}: Read-only file system (EROFS); choose another "
                    f"--out on a writable file system"), line


def test_out_turned_read_only_mid_run(tmp_path, mounts, data):
    out = tmp_path / "run"
    proc = jobs.start([sys.executable, "-m", "hvdtrain", "train", *TRAIN, "--data", str(data), "--out", str(out),
                       "--epochs", "60", "--log-every", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 1000):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the remount"
            time.sleep(0.05)
        mounts.read_only(out)
        code, stdout, stderr = jobs.finish(proc, timeout=300)
    finally:
        jobs.kill_session(proc.pid)
    result = subprocess.CompletedProcess(proc.args, code, stdout, stderr)
    assert code == EXIT_WRITE, stderr[-3000:]
    assert one_line(result) == (f"hvdtrain: error: cannot write {out / 'metrics.jsonl'}: Read-only file system "
                                f"(EROFS); choose another --out on a writable file system")
    assert all(json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines())


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
def test_no_permission_is_one_line(tmp_path, data):
    """Root writes anywhere; without CAP_DAC_OVERRIDE (setpriv) it meets a folder's permissions."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints").chmod(0o555)
    caps = "-dac_override,-dac_read_search"
    result = train(out, data, "--epochs", "1", "--checkpoint-every", "10",
                   wrap=["setpriv", "--bounding-set", caps, "--inh-caps", caps, "--"])
    assert result.returncode == EXIT_WRITE, result.stderr[-3000:]
    assert one_line(result) == (f"hvdtrain: error: cannot write {out}/checkpoints/ckpt-00000010.pt: Permission "
                                f"denied (EACCES); make it writable for this user or choose another --out")


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["mpi", "horovod"])
def test_disk_full_on_rank_0_ends_every_rank(tmp_path, mounts, data, backend):
    from hvdtrain.tools.launch import launcher_env, mpirun_cmd

    small = mounts.tmpfs(tmp_path / "small", "48k")
    out = small / "run"
    cmd = mpirun_cmd(2, ["hvdtrain", "train", "--backend", backend, *TRAIN, "--data", str(data), "--out", str(out),
                         "--checkpoint-every", "10", "--epochs", "3"])
    proc = jobs.start(cmd, env=launcher_env(np=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        try:
            stdout, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            raise AssertionError("the job did not end: a rank was left waiting") from None
        time.sleep(1.0)
        left = session_processes(proc.pid)
    finally:
        jobs.kill_session(proc.pid)
    assert not left, f"still running after mpirun exited: {left}"
    assert proc.returncode == EXIT_WRITE, stdout[-3000:]
    assert "Traceback" not in stdout
    errors = [line for line in stdout.splitlines() if line.startswith("hvdtrain: error")]
    assert len(errors) == 1 and "(ENOSPC); free space or choose another --out" in errors[0], stdout[-3000:]
    assert f"cannot write {out}/checkpoints/ckpt-" in errors[0]
    for ckpt in checkpoints(out):
        torch.load(ckpt, weights_only=True)
    no_temp_files(small)


def session_processes(leader: int) -> list[str]:
    """Live processes of the session `leader` started (their command lines)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != leader:
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                continue
            found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError):
            continue
    return found


# --- in-process: the mapping itself (errors that cannot be produced for real here) --------------

def test_quota_exceeded_in_torch_writer_is_a_write_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    """torch.save reports a failed write as `RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos`; the OSError beneath it (here EDQUOT, which no file system here enforces) is what
    the user sees. The old file stays, and no temporary file is left."""
    path = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    real_open = os.fdopen

    class Quota:
        def __init__(self, f):
            self.f, self.budget = f, 64

        def write(self, data):
            self.budget -= len(data)
            if self.budget < 0:
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Quota(real_open(fd, mode)))
    with pytest.raises(WriteError) as caught:
        atomic_torch_save({"w": torch.zeros(100_000)}, path)
    monkeypatch.undo()
    assert str(caught.value) == (f"cannot write {path}: Disk quota exceeded (EDQUOT); free space within your "
                                 f"quota or choose another --out")
    assert caught.value.errno == errno.EDQUOT and caught.value.filename == str(path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_failed_checkpoint_prunes_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save_checkpoint(folder, step, {"step": step})
    monkeypatch.setattr("hvdtrain.checkpoint._torch_save",
                        lambda obj, f: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(WriteError, match=r"ckpt-00000040\.pt: No space left on device \(ENOSPC\)"):
        save_checkpoint(folder, 40, {"step": 40})
    assert [p.name for p in sorted(folder.iterdir())] == [f"ckpt-{s:08d}.pt" for s in (10, 20, 30)]


def test_compare_plots_on_a_read_only_folder(tmp_path, mounts, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from hvdtrain.tools import compare
    from hvdtrain.tools.plots import compare_plots

    folder = tmp_path / "report"
    folder.mkdir()
    atomic_write_text("old\n", folder / "loss_vs_step.png")
    mounts.read_only(folder)
    rows = [{"step": s, "loss": 1.0 / s, "samples_per_sec": 100.0, "bytes_sent": 10} for s in (1, 2, 3)]
    results = [{"label": "mpi k=1", "metrics": rows, "summary": {"world_size": 2, "config": {}}}]
    with pytest.raises(WriteError, match=r"loss_vs_step\.png: Read-only file system \(EROFS\)"):
        compare_plots(results, folder, "title")
    assert (folder / "loss_vs_step.png").read_text() == "old\n"

    monkeypatch.setattr(compare, "_main", lambda argv: compare_plots(results, folder, "title"))
    assert compare.main([]) == EXIT_WRITE  # `hvdtrain compare` ends with one line
    err = capsys.readouterr().err
    assert err.startswith(f"hvdtrain: error: cannot write {folder}/loss_vs_step.png: Read-only") and err.count("\n") == 1


@pytest.mark.parametrize("which", ["summary.json", "evals.jsonl"])
@pytest.mark.parametrize("how", ["full", "read-only"])
def test_summary_and_evals_writes_fail_with_the_path_and_the_reason(tmp_path, mounts, which, how):
    """The run's last records: a full disk or a read-only file system is a WriteError naming the
    file and the reason, and leaves neither a partial file nor a temporary one. (The CLI turns a
    WriteError into one line and EXIT_WRITE: test_disk_full_at_the_end_leaves_no_partial_model.)"""
    from hvdtrain.metrics import MetricsLog, write_summary
    small = mounts.tmpfs(tmp_path / "small", "8k")
    log = MetricsLog(small, enabled=True, total_steps=1, stream=open(os.devnull, "w"))
    assert log.error is None  # metrics.jsonl and evals.jsonl created (empty) while there was room
    if how == "full":
        filler = small / "filler"
        with pytest.raises(OSError):
            with open(filler, "wb") as f:
                while True:
                    f.write(b"x" * 1024)
                    f.flush()
        reason = "No space left on device (ENOSPC)"
    else:
        mounts.read_only(small)
        reason = "Read-only file system (EROFS)"
    record = {"eval_loss": 0.5, "note": "y" * 20000}  # more than the 8k file system holds
    if which == "summary.json":
        with pytest.raises(WriteError) as failed:
            write_summary(small, record)
        error = failed.value
    else:
        log.evaluation(1, 0.1, record)
        error = log.error
        assert log.failed
    assert isinstance(error, WriteError) and error.path == str(small / which), error
    assert f"cannot write {small / which}: {reason}" in str(error), str(error)
    if which == "summary.json":
        assert not (small / which).exists()
    else:
        assert (small / which).read_text() in ("",) or (small / which).read_text().endswith("\n")
    no_temp_files(small)
