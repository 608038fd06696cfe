"""The loop (train.py) talks to a SyncStrategy and reads none of its settings; what one strategy
needs (accumulation, averaging weights, summary fields, elastic commits) lives in the strategy."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "hvdtrain" / "train.py"


def sync_reads(source: str) -> list[str]:
    """`X.sync.<field>` and `os.environ` uses in a module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "sync":
            found.append(f"line {node.lineno}: .sync.{node.attr}")
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
            found.append(f"line {node.lineno}: {node.attr}")
    return found


def test_the_loop_reads_no_strategy_setting_and_no_environment():
    assert sync_reads(TRAIN.read_text()) == []


def test_the_checker_finds_a_strategy_setting():
    planted = "def f(cfg):\n    return cfg.sync.backward_passes_per_step, os.environ['X']\n"
    assert sync_reads(planted) == ["line 2: .sync.backward_passes_per_step", "line 2: environ"]


def test_the_loop_has_no_strategy_names():
    # It never branches on which strategy runs: no backend name as a string literal in train.py.
    names = {"horovod", "mpi", "ddp", "single", "elastic"}
    literals = {n.value for n in ast.walk(ast.parse(TRAIN.read_text()))
                if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert names & literals == set()


def _train(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "hvdtrain", "train", "--rows", "600", "--batch-size", "16",
                             "--out", str(out), *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI"))},
                            start_new_session=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((out / "summary.json").read_text())


def test_mpi_summary_fields_come_from_the_mpi_strategy_only(tmp_path):
    single = _train(tmp_path / "single", "--backend", "single")
    assert not {"sync_every", "alpha", "mpi_allreduce", "elastic", "segments"} & set(single), sorted(single)
    mpi = _train(tmp_path / "mpi", "--backend", "mpi", "--sync-every", "3", "--alpha", "0.5")
    assert (mpi["sync_every"], mpi["alpha"], mpi["mpi_allreduce"]) == (3, 0.5, "auto"), mpi


@pytest.mark.parametrize("micro", [1, 3])
def test_horovod_accumulation_is_the_strategys(tmp_path, micro):
    # 600 rows on one rank, batch 16 x `micro` backward passes per step: whole steps only.
    summary = _train(tmp_path, "--backend", "horovod", "--backward-passes-per-step", str(micro))
    assert summary["steps"] == 600 // (16 * micro) and summary["samples"] == summary["steps"] * 16 * micro, summary
