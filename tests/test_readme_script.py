"""The README's "Your own model and data" script, exactly as printed, under real launchers."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from hvdtrain.tools.launch import horovodrun_cmd, launcher_env, mpirun_cmd, run
from support.jobs import run_job

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_script() -> str:
    text = README.read_text()
    section = text[text.index("## Your own model and data"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train_mine.py"
    path.write_text(readme_script())
    return path


def accuracy(output: str) -> float:
    found = re.findall(r"eval accuracy ([0-9.]+) after (\d+) steps", output)
    assert len(found) == 1, output[-3000:]  # printed by rank 0 only
    return float(found[0][0])


def test_readme_script_one_process(script):
    result = run_job([sys.executable, str(script), "single"], timeout=300, env=launcher_env(), cwd=script.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert accuracy(result.stdout) > 0.95
    summary = json.loads((script.parent / "runs" / "mine" / "summary.json").read_text())
    assert summary["backend"] == "single" and summary["config"]["sync"]["sync_every"] == 1  # mpi's setting


@pytest.mark.mpi
@pytest.mark.parametrize("launcher,backend", [("horovodrun", "horovod"), ("horovodrun", "mpi"), ("mpirun", "mpi"),
                                              ("mpirun", "horovod")])
def test_readme_script_two_ranks(script, launcher, backend):
    argv = [str(script), backend]
    cmd = (horovodrun_cmd(2, argv, python_module=False) if launcher == "horovodrun"
           else mpirun_cmd(2, argv, python_module=False))
    cmd.insert(cmd.index(str(script)), sys.executable)
    result = run(cmd, timeout=300, env=launcher_env(), cwd=script.parent)
    assert result.returncode == 0, result.stdout[-3000:]
    assert accuracy(result.stdout) > 0.95
    summary = json.loads((script.parent / "runs" / "mine" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == backend
    assert summary["config"]["sync"]["sync_every"] == (4 if backend == "mpi" else 1)
