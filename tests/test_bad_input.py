"""Bad input through the real CLI, table-driven: every case must end with exit code 2, one line
on stderr naming the value and the fix, no traceback, no hang, and leave an earlier run's
outputs and checkpoints byte-for-byte untouched."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from hvdtrain.data import make_dataset
from hvdtrain.tools.launch import launcher_env, mpirun_cmd
from support.jobs import TIMEOUT_EXIT, run_job

Setup = Callable[[Path], None]  # mutates the case's data folder copy


def npy(name: str, array) -> Setup:
    return lambda d: np.save(d / name, array)


def remove(name: str) -> Setup:
    return lambda d: (d / name).unlink()


def write(name: str, data: bytes) -> Setup:
    return lambda d: (d / name).write_bytes(data)


def truncate(name: str) -> Setup:
    def f(d: Path) -> None:
        raw = (d / name).read_bytes()
        (d / name).write_bytes(raw[: len(raw) // 2])
    return f


def meta(**changes) -> Setup:
    def f(d: Path) -> None:
        m = json.loads((d / "meta.json").read_text())
        m.update(changes)
        m = {k: v for k, v in m.items() if v is not None}
        (d / "meta.json").write_text(json.dumps(m))
    return f


def both(*setups: Setup) -> Setup:
    return lambda d: [f(d) for f in setups] and None


def corrupt_ckpt(how: str) -> Setup:
    """Setups starting with ckpt act on the earlier run's newest checkpoint (in --out)."""
    def f(out: Path) -> None:
        path = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
        newest = path.with_name("ckpt-99999999.pt")
        if how == "garbage":
            newest.write_bytes(os.urandom(4096))
        elif how == "truncated":
            newest.write_bytes(path.read_bytes()[:1000])
        elif how == "foreign":
            torch.save({"weights": torch.zeros(3)}, newest)
    f.on_out = True  # type: ignore[attr-defined]
    return f


X_NAN = np.ones((600, 10), np.float32)
X_NAN[5, 3] = np.nan
Y_INF = np.ones(600, np.float32)
Y_INF[7] = np.inf

# id, extra CLI args, setup, text the message must contain
CASES: list[tuple[str, list[str], Setup | None, str]] = [
    ("data-missing-folder", ["--data", "/nonexistent/data"], None, "/nonexistent/data"),
    ("data-no-meta", [], remove("meta.json"), "meta.json"),
    ("data-meta-not-json", [], write("meta.json", b"{oops"), "meta.json"),
    ("data-meta-bad-task", [], meta(task="ranking"), "'ranking'"),
    ("data-X-missing", [], remove("X.npy"), "X.npy"),
    ("data-y-missing", [], remove("y.npy"), "y.npy"),
    ("data-eval-missing", [], remove("eval_X.npy"), "eval_X.npy"),
    ("data-X-empty-file", [], write("X.npy", b""), "X.npy"),
    ("data-X-truncated", [], truncate("X.npy"), "X.npy"),
    ("data-X-corrupt", [], write("X.npy", os.urandom(2048)), "X.npy"),
    ("data-y-truncated", [], truncate("y.npy"), "y.npy"),
    ("data-lengths-differ", [], npy("y.npy", np.zeros(599, np.float32)), "599"),
    ("data-X-int", [], npy("X.npy", np.ones((600, 10), np.int64)), "int64"),
    ("data-X-1d", [], npy("X.npy", np.ones(600, np.float32)), "(600,)"),
    ("data-X-3d", [], npy("X.npy", np.ones((600, 10, 2), np.float32)), "(600, 10, 2)"),
    ("data-X-no-rows", [], npy("X.npy", np.ones((0, 10), np.float32)), "(0, 10)"),
    ("data-y-3d", [], npy("y.npy", np.ones((600, 1, 1), np.float32)), "(600, 1, 1)"),
    ("data-y-int-regression", [], npy("y.npy", np.ones(600, np.int64)), "int64"),
    ("data-X-nan", [], npy("X.npy", X_NAN), "NaN or Inf"),
    ("data-y-inf", [], npy("y.npy", Y_INF), "NaN or Inf"),
    ("data-eval-features", [], npy("eval_X.npy", np.ones((60, 7), np.float32)), "7 features"),
    ("data-classes-missing", [], both(meta(task="classification"), npy("y.npy", np.zeros(600, np.int64)),
                                        npy("eval_y.npy", np.zeros(60, np.int64))),
     "n_classes"),
    ("data-labels-float", [], meta(task="classification", n_classes=3), "class labels must be integers"),
    ("data-batch-too-big", ["--batch-size", "5000"], None, "5000"),
    ("lr-zero", ["--lr", "0"], None, "lr must be > 0, got 0.0"),
    ("lr-negative", ["--lr", "-1"], None, "-1.0"),
    ("lr-nan", ["--lr", "nan"], None, "nan"),
    ("lr-text", ["--lr", "fast"], None, "'fast'"),
    ("epochs-zero", ["--epochs", "0"], None, "epochs must be an integer >= 1, got 0"),
    ("epochs-negative", ["--epochs", "-3"], None, "-3"),
    ("batch-zero", ["--batch-size", "0"], None, "batch_size"),
    ("sync-every-zero", ["--sync-every", "0"], None, "sync_every must be an integer >= 1, got 0"),
    ("alpha-zero", ["--alpha", "0"], None, "alpha must be in (0, 1], got 0.0"),
    ("alpha-above-one", ["--alpha", "1.5"], None, "1.5"),
    ("alpha-negative", ["--alpha", "-0.1"], None, "-0.1"),
    ("weights-negative", ["--weights=-0.5,1.5"], None, "[-0.5, 1.5]"),
    ("weights-sum", ["--weights", "0.2,0.2"], None, "sum 0.4"),
    ("weights-text", ["--weights", "a,b"], None, "'a,b'"),
    ("momentum-one", ["--momentum", "1.0"], None, "momentum"),
    ("unknown-backend", ["--backend", "nccl"], None, "'nccl'"),
    ("unknown-model", ["--model", "resnet"], None, "'resnet'"),
    ("unknown-optimizer", ["--optimizer", "lbfgs"], None, "'lbfgs'"),
    ("unknown-partition", ["--partition", "striped"], None, "'striped'"),
    ("unknown-dtype", ["--dtype", "float16"], None, "'float16'"),
    ("unknown-mpi-allreduce", ["--mpi-allreduce", "tree"], None, "'tree'"),
    ("hidden-text", ["--model", "mlp", "--hidden", "wide"], None, "'wide'"),
    ("hidden-zero", ["--model", "mlp", "--hidden", "0"], None, "hidden"),
    ("rows-zero", ["--data", "regression", "--rows", "0"], None, "rows"),
    ("log-every-zero", ["--log-every", "0"], None, "log_every"),
    ("threads-negative", ["--threads", "-1"], None, "threads"),
    ("checkpoint-every-negative", ["--checkpoint-every", "-5"], None, "checkpoint_every"),
    ("timeout-negative", ["--collective-timeout", "-1"], None, "collective_timeout"),
    ("unknown-flag", ["--learning-rate", "0.1"], None, "--learning-rate"),
    ("toml-missing", ["--config", "/nonexistent.toml"], None, "/nonexistent.toml"),
    ("toml-malformed", ["--config", "{tmp}/bad.toml"], None, "not valid TOML"),
    ("toml-unknown-key", ["--config", "{tmp}/unknown.toml"], None, "learning_rate"),
    ("toml-unknown-section-key", ["--config", "{tmp}/section.toml"], None, "sync.k"),
    ("toml-wrong-type", ["--config", "{tmp}/type.toml"], None, "'three'"),
    ("toml-section-not-table", ["--config", "{tmp}/table.toml"], None, "[optim] table"),
    ("ckpt-other-model", ["--model", "mlp", "--hidden", "8"], None, "another model"),
    ("ckpt-garbage", [], corrupt_ckpt("garbage"), "ckpt-99999999.pt"),
    ("ckpt-truncated", [], corrupt_ckpt("truncated"), "ckpt-99999999.pt"),
    ("ckpt-foreign", [], corrupt_ckpt("foreign"), "not an hvdtrain checkpoint"),
    ("out-not-a-folder", ["--out", "{tmp}/file.txt/run"], None, "not writable"),
    ("out-has-checkpoints", ["--no-resume"], None, "--resume to continue"),
    ("resume-without-checkpoint", ["--out", "{tmp}/empty-out"], None, "found no checkpoint"),
    ("horovod-missing", ["--backend", "horovod", "{hide:horovod}"], None, "Horovod"),
    ("mpi4py-missing", ["--backend", "mpi", "{hide:mpi4py}"], None, "mpi4py"),
]
MPI_CASES: list[tuple[str, list[str], Setup | None, str]] = [
    ("more-ranks-than-samples", ["--data", "{tmp}/one-row"], None, "1 samples but 2 ranks"),
    ("weights-wrong-length", ["--weights", "0.2,0.3,0.5"], None, "3 values but 2 ranks"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A data folder and an earlier, finished run (outputs + checkpoints) that must survive."""
    root = tmp_path_factory.mktemp("bad-input")
    data = make_dataset("regression", root / "data", rows=600, seed=0)
    make_dataset("regression", root / "one-row-src", rows=1, seed=0)
    out = root / "earlier-run"
    done = run_job([sys.executable, "-m", "hvdtrain", "train", "--backend", "single", "--data", str(data),
                    "--out", str(out), "--batch-size", "32", "--checkpoint-every", "5"], timeout=300)
    assert done.returncode == 0, done.stderr
    return root, data, out


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def prepare(tmp: Path, root: Path, data: Path, earlier: Path, args: list[str], setup: Setup | None):
    case_data, out = tmp / "data", tmp / "out"
    shutil.copytree(data, case_data)
    shutil.copytree(earlier, out)
    shutil.copytree(root / "one-row-src", tmp / "one-row")
    (tmp / "bad.toml").write_text("epochs = = 3\n")
    (tmp / "unknown.toml").write_text("learning_rate = 0.1\n")
    (tmp / "section.toml").write_text("[sync]\nk = 4\n")
    (tmp / "type.toml").write_text('epochs = "three"\n')
    (tmp / "table.toml").write_text("optim = 3\n")
    (tmp / "file.txt").write_text("a file, not a folder\n")
    (tmp / "empty-out").mkdir()
    if setup is not None:
        setup(out if getattr(setup, "on_out", False) else case_data)
    env = launcher_env({"PYTHONPATH": ""})
    final: list[str] = ["--data", str(case_data), "--out", str(out), "--batch-size", "32", "--resume"]
    for a in args:
        if a.startswith("{hide:"):  # a module that fails to import, as on a machine without it
            name = a[6:-1]
            fake = tmp / "hidden" / name
            fake.mkdir(parents=True)
            (fake / "__init__.py").write_text(f'raise ImportError("No module named {name}")\n')
            env["PYTHONPATH"] = str(tmp / "hidden")
        elif a == "--no-resume":
            final.remove("--resume")
        else:
            final.append(a.replace("{tmp}", str(tmp)))
    return final, env, out


def check(result: subprocess.CompletedProcess, needle: str, mpi: bool) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("hvdtrain: error")]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    assert len(errors) == 1, result.stderr
    if not mpi:
        assert result.stderr.strip() == errors[0], result.stderr
    assert needle in errors[0], errors[0]
    assert ";" in errors[0], f"no fix given: {errors[0]}"


@pytest.mark.parametrize("case,args,setup,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(base, tmp_path, case, args, setup, needle):
    root, data, earlier = base
    argv, env, out = prepare(tmp_path, root, data, earlier, args, setup)
    before = snapshot(out)
    result = run_job([sys.executable, "-m", "hvdtrain", "train", "--backend", "single", *argv], timeout=120,
                     env=env)
    check(result, needle, mpi=False)
    assert snapshot(out) == before, "the earlier run's files changed"


@pytest.mark.mpi
@pytest.mark.parametrize("case,args,setup,needle", MPI_CASES, ids=[c[0] for c in MPI_CASES])
def test_bad_input_multi_rank(base, tmp_path, case, args, setup, needle):
    root, data, earlier = base
    argv, env, out = prepare(tmp_path, root, data, earlier, args, setup)
    before = snapshot(out)
    cmd = mpirun_cmd(2, ["hvdtrain", "train", "--backend", "mpi", *argv])
    result = run_job(cmd, timeout=120, env=env)
    check(result, needle, mpi=True)
    assert snapshot(out) == before


def test_there_are_at_least_50_cases():
    assert len(CASES) + len(MPI_CASES) >= 50


@pytest.mark.mpi
def test_mpi_backend_under_gloo_launcher_is_a_clear_error(tmp_path):
    """horovodrun --gloo starts no MPI world: each rank would train alone; refuse instead."""
    from hvdtrain.tools.launch import horovodrun_cmd
    cmd = horovodrun_cmd(2, ["hvdtrain", "train", "--backend", "mpi", "--rows", "500", "--out", str(tmp_path)],
                         gloo=True)
    result = run_job(cmd, timeout=120, env=launcher_env())
    assert result.returncode not in (0, TIMEOUT_EXIT), result.stdout[-2000:] + result.stderr[-2000:]
    text = result.stdout + result.stderr
    assert "started this process as rank 1 of 2" in text and "sees rank 0 of 1" in text, text[-2000:]
    assert "<stderr>:Traceback" not in text and not (tmp_path / "summary.json").exists()  # ranks: no traceback
