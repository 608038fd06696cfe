"""MODULE:ATTR plug-ins through the real CLI: a user's module in the working folder, end to end at
1 and 2 ranks, and every kind of bad plug-in (one line naming MODULE:ATTR, exit 2, no traceback)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hvdtrain.tools.launch import horovodrun_cmd, launcher_env, mpirun_cmd, run
from support.jobs import run_job
from test_bad_input import check

USER_MODULE = textwrap.dedent('''
    import os
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, width=16, classes=3):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, classes))

        def forward(self, x):
            return self.body(x)

    class Wide(Net):
        def __init__(self):
            super().__init__()
            self.body[0] = nn.Linear(64, 16)

    def blobs(n=600, seed=0, classes=3):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, classes, (n,), generator=g)
        x = torch.randn(n, 4, generator=g) * 0.5 + torch.nn.functional.one_hot(y, 4).float() * 2
        return x, y

    class Blobs(torch.utils.data.Dataset):
        num_classes = 3
        def __init__(self, n, seed):
            self.x, self.y = blobs(n, seed)
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            return self.x[i], self.y[i]

    def data():
        return Blobs(600, 0), Blobs(200, 1)

    def arrays():
        return blobs(600, 0)

    def bad_labels():
        x, y = blobs(600, 0)
        return x, y + 5

    def not_data():
        return "a string"

    def smooth_loss(output, target):
        return nn.functional.cross_entropy(output, target, label_smoothing=0.1)

    def vector_loss(output, target):
        return nn.functional.cross_entropy(output, target, reduction="none")

    def not_an_optimizer(params, lr):
        return [params, lr]

    def returns_int():
        return 3

    def raises():
        raise RuntimeError("boom in the factory")

    def no_lr_optimizer(params):
        return torch.optim.SGD(params, lr=0.1)

    class LossNeedsArg(nn.Module):
        def __init__(self, margin):
            super().__init__()

    class BoomAt3(Net):
        """Raises in forward at its 3rd training step, on rank `rank` (-1: on every rank)."""
        def __init__(self, rank=-1):
            super().__init__()
            self.rank, self.steps = rank, 0

        def forward(self, x):
            if self.training and torch.is_grad_enabled():
                self.steps += 1
                mine = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
                if self.steps == 3 and self.rank in (-1, mine):
                    raise RuntimeError("boom in the user's forward at step 3")
            return super().forward(x)

    NOT_CALLABLE = 42
''')


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    (tmp_path / "mymod.py").write_text(USER_MODULE)
    (tmp_path / "broken_import.py").write_text("import torch\nraise RuntimeError('broken at import')\n")
    return tmp_path


def train(user_dir: Path, *args: str, launcher: str = "python", backend: str = "single") -> subprocess.CompletedProcess:
    argv = ["hvdtrain", "train", "--backend", backend, "--out", str(user_dir / "out"), "--threads", "1", *args]
    env = launcher_env({"PYTHONPATH": ""})
    if launcher == "python":
        return run_job([sys.executable, "-m", *argv], timeout=120, env=env, cwd=user_dir)
    cmd = mpirun_cmd(2, argv) if launcher == "mpirun" else horovodrun_cmd(2, argv)
    result = run(cmd, timeout=300, env=env, cwd=user_dir)
    return subprocess.CompletedProcess(cmd, result.returncode, result.stdout, result.stdout)


GOOD = ["--model", "mymod:Net", "--model-args", '{"width": 32}', "--data", "mymod:data", "--loss",
        "mymod:smooth_loss", "--optimizer", "torch.optim:RMSprop", "--optimizer-args", '{"alpha": 0.9}',
        "--lr", "0.01", "--epochs", "3", "--batch-size", "16"]


def test_user_plugins_one_process(user_dir):
    result = train(user_dir, *GOOD)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((user_dir / "out" / "summary.json").read_text())
    assert summary["eval_accuracy"] > 0.9, summary
    assert summary["config"]["model"]["args"] == {"width": 32}
    assert summary["parameters"] == 4 * 32 + 32 + 2 * 32 + 32 * 3 + 3  # Linear, BatchNorm, Linear


@pytest.mark.mpi
@pytest.mark.parametrize("launcher,backend", [("mpirun", "mpi"), ("horovodrun", "horovod")])
def test_user_plugins_two_ranks(user_dir, launcher, backend):
    periodic = ["--sync-every", "2"] if backend == "mpi" else []  # the MPI fallback's own setting
    result = train(user_dir, *GOOD, *periodic, launcher=launcher, backend=backend)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((user_dir / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == backend
    assert summary["eval_accuracy"] > 0.9, summary


def test_array_pair_data_and_builtin_names(user_dir):
    result = train(user_dir, "--model", "mlp", "--hidden", "16", "--data", "mymod:arrays", "--optimizer",
                   "adamw", "--lr", "0.01", "--lr-schedule", "cosine", "--warmup-steps", "5", "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((user_dir / "out" / "summary.json").read_text())
    assert summary["final_loss"] < summary["first_loss"]


# id, arguments, text the one-line error must contain
BAD = [
    ("module-missing", ["--model", "nosuchmod:Net"], "module 'nosuchmod' was not found"),
    ("attr-missing", ["--model", "mymod:Nope"], "has no attribute 'Nope'"),
    ("not-callable", ["--model", "mymod:NOT_CALLABLE"], "not callable"),
    ("not-a-module", ["--model", "mymod:returns_int"], "returned int, not a torch.nn.Module"),
    ("factory-raises", ["--model", "mymod:raises"], "RuntimeError: boom in the factory"),
    ("import-raises", ["--model", "broken_import:Net"], "RuntimeError: broken at import"),
    ("no-colon", ["--model", "mymod"], "model 'mymod' is unknown"),
    ("empty-attr", ["--model", "mymod:"], "not MODULE:ATTR"),
    ("model-args-json", ["--model", "mymod:Net", "--model-args", "{width"], "not valid JSON"),
    ("model-args-list", ["--model", "mymod:Net", "--model-args", "[1]"], "not a JSON object"),
    ("model-args-unknown", ["--model", "mymod:Net", "--model-args", '{"depth": 3}'], "depth"),
    ("model-args-builtin", ["--model", "mlp", "--model-args", '{"depth": 3}'], "applies to MODULE:ATTR models only"),
    ("shape-mismatch", ["--model", "mymod:Wide"], "failed on a batch of data mymod:data"),
    ("labels-out-of-range", ["--model", "mymod:Net", "--data", "mymod:bad_labels"], "class label"),
    ("data-not-data", ["--data", "mymod:not_data"], "returned str"),
    ("data-module-missing", ["--data", "nosuchdata:make"], "module 'nosuchdata' was not found"),
    ("loss-not-scalar", ["--loss", "mymod:vector_loss"], "scalar"),
    ("loss-missing", ["--loss", "mymod:nope"], "has no attribute 'nope'"),
    ("loss-unknown", ["--loss", "hinge"], "loss 'hinge' is unknown"),
    ("optimizer-not-optimizer", ["--optimizer", "mymod:not_an_optimizer"], "not a torch.optim.Optimizer"),
    ("optimizer-args-unknown", ["--optimizer", "adam", "--optimizer-args", '{"moment": 0.9}'],
     "calling it as Adam(params, lr=0.01, moment=0.9) raised TypeError"),
    # a keyword hvdtrain passes itself, given in --optimizer-args too: an error naming both (README: plug-ins)
    ("optimizer-args-lr", ["--optimizer", "torch.optim:AdamW", "--optimizer-args", '{"lr": 0.003}'],
     '--optimizer-args sets "lr" and so does --lr (its default 0.01); give it once: use --lr 0.003'),
    ("optimizer-args-lr-both", ["--optimizer", "adam", "--lr", "0.1", "--optimizer-args", '{"lr": 0.003}'],
     'so does --lr (0.1); give it once: use --lr 0.003'),
    ("optimizer-args-momentum", ["--optimizer", "sgd", "--optimizer-args", '{"momentum": 0.9}'],
     '--optimizer-args sets "momentum" and so does --momentum (its default 0); give it once: use --momentum 0.9'),
    ("optimizer-args-params", ["--optimizer", "adam", "--optimizer-args", '{"params": []}'],
     '--optimizer-args sets "params", which hvdtrain passes itself'),
    # a plug-in whose signature does not take what hvdtrain passes: how it was called, no traceback
    ("optimizer-signature", ["--optimizer", "mymod:no_lr_optimizer"],
     "calling it as no_lr_optimizer(params, lr=0.01) raised TypeError"),
    ("loss-signature", ["--loss", "mymod:LossNeedsArg"], "calling it as LossNeedsArg() raised TypeError"),
    ("model-signature", ["--model", "mymod:Net", "--model-args", '{"width": "wide"}'], "Net(width='wide')"),
    ("backend-not-strategy", ["--backend", "mymod:Net"], "not a SyncStrategy subclass"),
    ("amp-fp16-on-cpu", ["--amp", "fp16"], "amp fp16 needs a GPU"),
    ("amp-unknown", ["--amp", "int8"], "amp 'int8' is unknown"),
    ("lr-schedule-unknown", ["--lr-schedule", "step"], "lr_schedule 'step' is unknown"),
    ("warmup-negative", ["--warmup-steps", "-1"], "warmup_steps"),
    ("num-workers-negative", ["--num-workers", "-2"], "num_workers"),
    ("seed-negative", ["--seed", "-1"], "seed must be an integer >= 0"),
    ("outer-unknown", ["--outer-optimizer", "adam"], "outer_optimizer 'adam' is unknown"),
    ("outer-with-alpha", ["--outer-optimizer", "nesterov", "--alpha", "0.5"], "use --outer-lr instead of --alpha"),
    ("outer-lr-zero", ["--outer-optimizer", "sgd", "--outer-lr", "0"], "outer_lr must be > 0"),
    ("outer-momentum-one", ["--outer-optimizer", "sgd", "--outer-momentum", "1"], "outer_momentum"),
    ("warmup-allreduce-negative", ["--warmup-allreduce-steps", "-4"], "warmup_allreduce_steps"),
    ("hierarchy-one-value", ["--hierarchy", "4"], "K_LOCAL,K_GLOBAL"),
    ("hierarchy-not-multiple", ["--hierarchy", "4,10"], "multiple of K_LOCAL"),
    ("hierarchy-text", ["--hierarchy", "a,b"], "'a,b'"),
    ("eval-every-negative", ["--eval-every", "-1"], "eval_every"),
    ("ddp-accumulation", ["--backend", "ddp", "--backward-passes-per-step", "2"],
     "--backward-passes-per-step 2 applies to backend horovod only, but the backend is 'ddp'"),
    # Horovod's local accumulation: the loop no longer applies it to the strategies that do not take it
    ("single-accumulation", ["--backward-passes-per-step", "2"],
     "applies to backend horovod only, but the backend is 'single'"),
]


@pytest.mark.parametrize("case,args,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_plugin(user_dir, case, args, needle):
    base = {"--model": "mymod:Net", "--data": "mymod:data"}
    given = dict(zip(args[::2], args[1::2]))
    extra = [x for flag, value in base.items() if flag not in given for x in (flag, value)]
    if "--backend" in given:
        backend = given.pop("--backend")
        args = [x for flag, value in given.items() for x in (flag, value)]
    else:
        backend = "single"
    result = train(user_dir, *extra, *args, backend=backend)
    check(result, needle, mpi=False)
    assert not (user_dir / "out" / "summary.json").exists()


@pytest.mark.mpi
def test_bad_plugin_two_ranks_ends_every_rank(user_dir):
    result = train(user_dir, "--model", "mymod:Wide", "--data", "mymod:data", launcher="mpirun", backend="mpi")
    assert result.returncode == 2, result.stdout[-2000:]
    errors = [line for line in result.stdout.splitlines() if "hvdtrain: error" in line]
    assert len(errors) == 1 and "failed on a batch of data mymod:data" in errors[0], result.stdout[-2000:]
    assert "Traceback" not in result.stdout


@pytest.mark.parametrize("launcher,backend,rank", [
    pytest.param("python", "single", -1, id="one-process"),
    pytest.param("mpirun", "mpi", -1, id="two-ranks-every-rank", marks=pytest.mark.mpi),
    pytest.param("mpirun", "mpi", 1, id="two-ranks-rank-1", marks=pytest.mark.mpi)])
def test_an_error_in_the_users_code_is_one_traceback(user_dir, launcher, backend, rank):
    """The user's model raises at step 3 (after the start-up probe): its traceback, where the user
    debugs, printed once by one rank, one hvdtrain line, Open MPI's banner at most once, exit 1."""
    result = train(user_dir, "--model", "mymod:BoomAt3", "--model-args", json.dumps({"rank": rank}), "--data",
                   "mymod:data", "--batch-size", "16", launcher=launcher, backend=backend)
    out = result.stdout + (result.stderr if launcher == "python" else "")
    assert result.returncode == 1, out[-3000:]
    assert out.count("Traceback (most recent call last)") == 1, out[-6000:]
    assert out.count("RuntimeError: boom in the user's forward at step 3") == 1, out[-6000:]
    assert 'mymod.py", line' in out  # the user's own frame
    failed = 0 if rank == -1 else rank
    assert [line for line in out.splitlines() if line.startswith("hvdtrain:")] == [
        f"hvdtrain: rank {failed} failed; ending the job"], out[-3000:]
    assert out.count("MPI_ABORT was invoked") <= 1 and "more process has sent help message" not in out, out[-3000:]
    assert not (user_dir / "out" / "summary.json").exists()


def test_example_resnet18_is_torchvisions_architecture():
    from hvdtrain.examples.resnet import resnet18
    model = resnet18()
    # torchvision's weights metadata for resnet18: num_params 11,689,512
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    # 20 convolutions (1 stem + 16 in blocks + 3 downsample), 20 BatchNorms (2 parameters + 3
    # buffers each), fc weight and bias
    assert len(model.state_dict()) == 20 + 20 * 5 + 2
    assert model(torch_randn(2, 3, 32, 32)).shape == (2, 1000)


def torch_randn(*shape):
    import torch
    return torch.randn(*shape)


@pytest.mark.mpi
def test_example_resnet18_on_generated_images_two_ranks(tmp_path):
    env = launcher_env({"HVDTRAIN_IMAGES": "64", "HVDTRAIN_IMAGE_SIZE": "16"})
    argv = ["hvdtrain", "train", "--backend", "horovod", "--model", "hvdtrain.examples.resnet:resnet18",
            "--model-args", '{"num_classes": 10}', "--data", "hvdtrain.examples.images:image_datasets",
            "--batch-size", "8", "--epochs", "1", "--optimizer", "sgd", "--lr", "0.01", "--out", str(tmp_path / "o")]
    result = run(horovodrun_cmd(2, argv), timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["parameters"] == 11_181_642 and summary["steps"] == 4 and "eval_accuracy" in summary
