"""Every setting is checked against what it applies to (config.APPLIES, one table next to the
settings): a value other than the default where the setting does not apply is one ConfigError (CLI:
exit 2 and one line) naming the setting as it was given, why, and what to use instead; the same
value where it applies passes; a default never triggers, even spelled out. The CLI, TOML files and
`fit` all go through load_config, so each case is tried in all three spellings.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hvdtrain.config import (APPLIES, BY_KWARG, SETTINGS, ConfigError, describe_rule, field_default, load_config,
                             overrides_from_kwargs)

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("OMPI_COMM_WORLD_", "PMI_", "PMIX_", "SLURM_", "HOROVOD_")
TWO_RANKS = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
             "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
ELASTIC = {"backend": "horovod", "elastic": True}


def ctx(settings: dict[str, Any] | None = None, supplied: dict[str, str] | None = None,
        env: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """A run: other settings (fit keywords), fit's objects, launcher variables."""
    return settings or {}, supplied or {}, env or {}


# kwarg -> (a value other than the default, runs where it does not apply, runs where it does)
CASES: dict[str, tuple[Any, list, list]] = {
    "resume": (True, [ctx(ELASTIC)], [ctx(), ctx({"backend": "mpi"})]),
    "overwrite": (True, [ctx({"resume": True})], [ctx(), ctx(ELASTIC)]),
    "checkpoint_every": (5, [ctx(ELASTIC)], [ctx(), ctx({"backend": "mpi"})]),
    "loss": ("mse", [ctx(supplied={"loss": "MSELoss"})], [ctx(), ctx(supplied={"model": "Net"})]),
    "amp": ("fp16", [ctx(ELASTIC)], [ctx(), ctx({"backend": "horovod"})]),
    "data": ("digits", [ctx(supplied={"train_data": "Dataset"}), ctx(supplied={"train_data": "arrays"})],
             [ctx(), ctx(supplied={"model": "Net"})]),
    "rows": (64, [ctx({"data": "digits"}), ctx({"data": "mymod:make"}), ctx(supplied={"train_data": "Dataset"}),
                  ctx(supplied={"train_data": "arrays"})], [ctx(), ctx({"data": "regression"})]),
    "num_workers": (2, [ctx(), ctx({"data": "digits"}), ctx(supplied={"train_data": "arrays"})],
                    [ctx({"data": "mymod:make"}), ctx(supplied={"train_data": "Dataset"})]),
    "pin_memory": (True, [ctx(), ctx(supplied={"train_data": "arrays"})],
                   [ctx({"data": "mymod:make"}), ctx(supplied={"train_data": "Dataset"})]),
    "model": ("mlp", [ctx(supplied={"model": "Net"})], [ctx()]),
    "model_args": ({"width": 8}, [ctx(), ctx({"model": "mlp"}), ctx(supplied={"model": "Net"})],
                   [ctx({"model": "mymod:Net"})]),
    "hidden": ((8, 8), [ctx(), ctx({"model": "mymod:Net"}), ctx(supplied={"model": "Net"})], [ctx({"model": "mlp"})]),
    "optimizer": ("adam", [ctx(supplied={"optimizer": "partial"})], [ctx()]),
    "optimizer_args": ({"weight_decay": 0.1}, [ctx(supplied={"optimizer": "partial"})],
                       [ctx(), ctx({"optimizer": "adam"}), ctx({"optimizer": "torch.optim:RMSprop"})]),
    "lr": (0.1, [ctx(supplied={"optimizer": "partial"})], [ctx(), ctx({"optimizer": "mymod:Opt"})]),
    "momentum": (0.9, [ctx({"optimizer": "adam"}), ctx({"optimizer": "torch.optim:SGD"}),
                       ctx(supplied={"optimizer": "partial"})], [ctx(), ctx({"optimizer": "sgd"})]),
    "scale_lr": (True, [ctx(), ctx({"backend": "mpi"})],
                 [ctx({"backend": "horovod"}), ctx({"backend": "ddp"}), ctx({"backend": "mymod:Sync"})]),
    "lr_schedule": ("cosine", [ctx(ELASTIC), ctx(supplied={"scheduler": "StepLR"})], [ctx(), ctx({"backend": "mpi"})]),
    "warmup_steps": (5, [ctx(ELASTIC), ctx(supplied={"scheduler": "StepLR"})], [ctx(), ctx({"backend": "ddp"})]),
    "backend": ("single", [ctx(env=TWO_RANKS)], [ctx(), ctx(env={**TWO_RANKS, "OMPI_COMM_WORLD_SIZE": "1",
                                                                    "OMPI_COMM_WORLD_LOCAL_SIZE": "1"})]),
    "sync_every": (4, [ctx(), ctx({"backend": "horovod"}), ctx({"backend": "ddp"}),
                       ctx({"backend": "mpi", "hierarchy": (2, 4)}),
                       ctx({"backend": "mpi", "sync_every_seconds": 2.0})],
                   [ctx({"backend": "mpi"}), ctx({"backend": "mymod:Sync"}), ctx({"backend": "mpi", "alpha": 0.5})]),
    "alpha": (0.5, [ctx(), ctx({"backend": "horovod"}), ctx(ELASTIC)], [ctx({"backend": "mpi"})]),
    "weights": ((0.25, 0.75), [ctx({"backend": "ddp"}), ctx({"backend": "mpi", "sync_every_seconds": 1.0})],
                [ctx({"backend": "mpi"}), ctx({"backend": "mpi", "hierarchy": (2, 4)})]),
    "mpi_allreduce": ("ring", [ctx(), ctx({"backend": "horovod"})], [ctx({"backend": "mpi"})]),
    "warmup_allreduce_steps": (3, [ctx({"backend": "horovod"}), ctx({"backend": "mpi", "sync_every_seconds": 1.0})],
                               [ctx({"backend": "mpi"})]),
    "outer_optimizer": ("nesterov", [ctx(), ctx({"backend": "ddp"})],
                        [ctx({"backend": "mpi"}), ctx({"backend": "mpi", "sync_every_seconds": 1.0})]),
    "outer_lr": (0.5, [ctx({"backend": "mpi"}), ctx({"backend": "horovod"})],
                 [ctx({"backend": "mpi", "outer_optimizer": "sgd"})]),
    "outer_momentum": (0.5, [ctx({"backend": "mpi"}), ctx({"backend": "single"})],
                       [ctx({"backend": "mpi", "outer_optimizer": "nesterov"})]),
    "hierarchy": ((2, 4), [ctx({"backend": "horovod"}), ctx({"backend": "mpi", "sync_every_seconds": 1.0})],
                  [ctx({"backend": "mpi"})]),
    "sync_every_seconds": (2.0, [ctx(), ctx({"backend": "horovod"})], [ctx({"backend": "mpi"})]),
    "fp16": (True, [ctx({"backend": "mpi"}), ctx({"backend": "ddp"})], [ctx({"backend": "horovod"}), ctx(ELASTIC)]),
    "backward_passes_per_step": (2, [ctx(), ctx({"backend": "ddp"}), ctx({"backend": "mpi"})],
                                 [ctx({"backend": "horovod"}), ctx({"backend": "mymod:Sync"})]),
    "elastic": (True, [ctx({"backend": "mpi"}), ctx({"backend": "single"}), ctx({"backend": "mymod:Sync"})],
                [ctx({"backend": "horovod"}), ctx()]),
    "elastic_commit_every": (5, [ctx(), ctx({"backend": "horovod"})], [ctx(ELASTIC)]),
}

BAD = [(k, i) for k, (_, bad, _) in CASES.items() for i in range(len(bad))]
GOOD = [(k, i) for k, (_, _, good) in CASES.items() for i in range(len(good))]


@pytest.fixture
def launcher(monkeypatch: pytest.MonkeyPatch):
    """No launcher variables but the case's own."""
    for key in list(os.environ):
        if key.startswith(LAUNCHER_VARS):
            monkeypatch.delenv(key)

    def set_env(env: dict[str, str]) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    return set_env


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def toml_text(settings: dict[str, Any]) -> str:
    top, sections = [], {}
    for kwarg, value in settings.items():
        s = BY_KWARG[kwarg]
        line = f"{s.key} = {toml_value(value)}"
        (sections.setdefault(s.section, []) if s.section else top).append(line)
    return "\n".join(top + [f"[{name}]\n" + "\n".join(lines) for name, lines in sections.items()]) + "\n"


def test_every_rule_has_cases_and_names_a_setting():
    assert set(CASES) == set(APPLIES)
    assert set(APPLIES) <= set(BY_KWARG)
    for kwarg, rule in APPLIES.items():
        assert all(k in BY_KWARG for k in (*rule.not_with, *([rule.needs] if rule.needs else []))), kwarg
        value = CASES[kwarg][0]
        assert value != field_default(BY_KWARG[kwarg]), kwarg


def test_backend_rules_follow_the_strategies():
    """scale_lr / backward_passes_per_step apply to the strategies that declare them (the classes'
    scales_lr / takes_accumulation), read here without starting any communication library."""
    import ast
    declared: dict[str, set[str]] = {"scales_lr": set(), "takes_accumulation": set()}
    for path in (ROOT / "hvdtrain" / "strategies").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names = {t.id: v.value for a in node.body if isinstance(a, ast.Assign)
                         for t in a.targets if isinstance(t, ast.Name) and isinstance(a.value, ast.Constant)
                         for v in [a.value]}
                for attr in declared:
                    if names.get(attr) is True and isinstance(names.get("name"), str):
                        declared[attr].add(names["name"])
    assert set(APPLIES["scale_lr"].backends) == declared["scales_lr"]
    assert set(APPLIES["backward_passes_per_step"].backends) == declared["takes_accumulation"]


@pytest.mark.parametrize("kwarg,index", BAD, ids=[f"{k}-{i}" for k, i in BAD])
def test_not_applying_is_refused_in_every_spelling(kwarg, index, launcher, tmp_path):
    value, bad, _ = CASES[kwarg]
    settings, supplied, env = bad[index]
    launcher(env)
    s = BY_KWARG[kwarg]
    # fit keywords
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides_from_kwargs({**settings, kwarg: value}), origin="keyword", supplied=supplied)
    text = str(caught.value)
    assert f"{kwarg}=" in text and "\n" not in text and ";" in text, text
    assert re.search(r"appl(y|ies) to|does not support", text), text
    # command-line flags
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides_from_kwargs({**settings, kwarg: value}), supplied=supplied)
    assert s.flag in str(caught.value) and f"drop {s.flag}" in str(caught.value) or \
        "does not support" in str(caught.value), str(caught.value)
    # a TOML file: the key and the file are named
    path = tmp_path / "run.toml"
    path.write_text(toml_text({kwarg: value}))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), overrides_from_kwargs(settings), supplied=supplied)
    key = f"{s.section}.{s.key}" if s.section else s.key
    assert key in str(caught.value) and str(path) in str(caught.value), str(caught.value)


@pytest.mark.parametrize("kwarg,index", GOOD, ids=[f"{k}-{i}" for k, i in GOOD])
def test_applying_passes(kwarg, index, launcher, tmp_path):
    value, _, good = CASES[kwarg]
    settings, supplied, env = good[index]
    launcher(env)
    cfg = load_config(None, overrides_from_kwargs({**settings, kwarg: value}), origin="keyword", supplied=supplied)
    s = BY_KWARG[kwarg]
    got = getattr(getattr(cfg, s.section) if s.section else cfg, s.key)
    assert got == value
    path = tmp_path / "run.toml"
    path.write_text(toml_text({kwarg: value}))
    load_config(str(path), overrides_from_kwargs(settings), supplied=supplied)


@pytest.mark.parametrize("kwarg,index", BAD, ids=[f"{k}-{i}" for k, i in BAD])
def test_defaults_never_trigger_even_spelled_out(kwarg, index, launcher, tmp_path):
    _, bad, _ = CASES[kwarg]
    settings, supplied, env = bad[index]
    launcher(env)
    default = field_default(BY_KWARG[kwarg])
    if default is not None:
        load_config(None, overrides_from_kwargs({**settings, kwarg: default}), origin="keyword", supplied=supplied)
        path = tmp_path / "run.toml"
        path.write_text(toml_text({kwarg: default}))
        load_config(str(path), overrides_from_kwargs(settings), supplied=supplied)
    load_config(None, overrides_from_kwargs(settings), supplied=supplied)  # left out: never an error


def test_an_int_where_a_float_default_stands_is_the_default(launcher, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[sync]\nbackend = \"horovod\"\nalpha = 1\nsync_every_seconds = 0\nouter_lr = 0.7\n")
    assert load_config(str(path)).sync.alpha == 1


def test_every_violation_is_named_in_one_line(launcher):
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"sync": {"backend": "horovod", "alpha": 0.5, "sync_every": 4},
                           "model": {"hidden": [8]}})
    text = str(caught.value)
    assert "\n" not in text
    assert "--sync-every 4 and --alpha 0.5 apply to backend mpi only, but the backend is 'horovod'" in text
    assert "use --backend mpi, or drop them" in text and "--hidden 8 applies to model mlp only" in text


def test_auto_backend_says_why(launcher):
    with pytest.raises(ConfigError, match=r"the backend is 'single' \(auto: no launcher started this process\); "
                                          r"use --backend mpi, or drop --alpha"):
        load_config(None, {"sync": {"alpha": 0.5}})
    launcher(TWO_RANKS)
    with pytest.raises(ConfigError, match=r"'horovod' \(auto: a launcher started this process\)"):
        load_config(None, {"sync": {"alpha": 0.5}})


def test_readme_lists_the_table():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### What each setting applies to"):]
    rows = {}
    for line in section.splitlines()[1:]:
        if line.startswith("| `--"):
            flag, applies = (c.strip() for c in line.strip("|").split(" | "))
            rows[flag.strip("`")] = applies
        elif rows and not line.startswith("|"):
            break
    assert rows == {s.flag: describe_rule(s.kwarg) for s in SETTINGS if s.kwarg in APPLIES}


# --- the real entry points ----------------------------------------------------------------------

def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    return subprocess.run([sys.executable, "-m", "hvdtrain", "train", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**clean, **(env or {})})


def one_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvdtrain: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args,needles", [
    (["--alpha", "0.5"], ["--alpha 0.5 applies to backend mpi only", "use --backend mpi, or drop --alpha"]),
    (["--backend", "single", "--fp16"], ["--fp16 applies to backend horovod only"]),
    (["--hidden", "8"], ["--hidden 8 applies to model mlp only", "use --model mlp"]),
    (["--data", "digits", "--rows", "64"], ["--rows 64 applies to the built-in set 'regression' only"]),
    (["--optimizer", "adam", "--momentum", "0.9"], ["--momentum 0.9 applies to optimizer sgd only"]),
    (["--elastic-commit-every", "3"], ["--elastic-commit-every 3 applies to --elastic runs only"]),
], ids=["alpha", "fp16", "hidden", "rows", "momentum", "commit"])
def test_cli_refuses_with_one_line(args, needles, tmp_path):
    one_line(cli(*args, "--rows", "64", "--out", str(tmp_path / "out"), cwd=tmp_path) if "--rows" not in args
             else cli(*args, "--out", str(tmp_path / "out"), cwd=tmp_path), *needles)
    assert not (tmp_path / "out").exists()


def test_cli_single_under_two_ranks_is_refused(tmp_path):
    one_line(cli("--backend", "single", "--out", str(tmp_path / "o"), cwd=tmp_path, env=TWO_RANKS),
             "--backend single applies to one process only, but mpirun started 2 processes")


def test_cli_toml_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[sync]\nbackend = "single"\nhierarchy = [2, 4]\n')
    one_line(cli("--config", str(path), "--out", str(tmp_path / "o"), cwd=tmp_path),
             f"sync.hierarchy = [2, 4] in {path} applies to backend mpi only", f"drop sync.hierarchy from {path}")


def test_cli_applying_settings_and_spelled_out_defaults_train(tmp_path):
    result = cli("--backend", "single", "--model", "mlp", "--hidden", "8", "--sync-every", "1", "--alpha", "1",
                 "--mpi-allreduce", "auto", "--backward-passes-per-step", "1", "--rows", "64", "--epochs", "1",
                 "--threads", "1", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["config"]["model"]["hidden"] == [8]


def blobs(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n)


class Blobs:
    def __init__(self, n: int) -> None:
        self.x, self.y = blobs(n)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("data,kwargs,needle", [
    ("arrays", {"alpha": 0.5}, "alpha=0.5 applies to backend mpi only"),
    ("arrays", {"num_workers": 2}, "num_workers=2 applies to --data MODULE:ATTR or a Dataset given to fit only"),
    ("dataset", {"rows": 64}, "rows=64 applies to the built-in set 'regression' only, but the data is a Dataset"),
    ("digits", {"rows": 64}, "rows=64 applies to the built-in set 'regression' only"),
    ("arrays", {"outer_lr": 0.5, "backend": "single"}, "outer_lr=0.5 applies to backend mpi only"),
], ids=["alpha", "num-workers", "rows-dataset", "rows-digits", "outer-lr"])
def test_fit_raises_config_error(data, kwargs, needle, launcher, tmp_path):
    import torch

    import hvdtrain
    train = {"arrays": blobs(64), "dataset": Blobs(64), "digits": "digits"}[data]
    with pytest.raises(hvdtrain.ConfigError) as caught:
        hvdtrain.fit(torch.nn.Linear(4 if data != "digits" else 64, 3), train, out=str(tmp_path / "o"),
                     threads=1, **kwargs)
    assert needle in str(caught.value), str(caught.value)
    assert not (tmp_path / "o").exists()


def test_fit_toml_setting_replaced_by_an_object(launcher, tmp_path):
    import torch

    import hvdtrain
    path = tmp_path / "run.toml"
    path.write_text('loss = "mse"\n[optim]\nlr = 0.5\n')
    with pytest.raises(hvdtrain.ConfigError) as caught:
        hvdtrain.fit(torch.nn.Linear(4, 3), blobs(64), loss=torch.nn.CrossEntropyLoss(), config=str(path),
                     optimizer=lambda params: torch.optim.SGD(params, lr=0.1), out=str(tmp_path / "o"))
    text = str(caught.value)
    assert f"loss = \"mse\" in {path}" in text and f"optim.lr = 0.5 in {path}" in text, text
