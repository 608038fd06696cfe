"""The install step is idempotent, and what it built is really there."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def freeze() -> str:
    return subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True,
                          check=True).stdout


def test_second_install_changes_nothing_and_says_so():
    before = freeze()
    site = sorted(p.name for p in Path(__import__("torch").__file__).parents[1].iterdir())
    result = subprocess.run(["bash", str(ROOT / "mpi_jobs" / "install.sh")], capture_output=True, text=True,
                            timeout=300, env={**__import__("os").environ, "HVDTRAIN_VENV": str(VENV_BIN.parent)})
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout, result.stdout
    assert "building" not in result.stdout and "pip install" not in result.stdout
    assert freeze() == before
    assert sorted(p.name for p in Path(__import__("torch").__file__).parents[1].iterdir()) == site


def test_horovod_check_build_lists_pytorch_mpi_gloo():
    out = subprocess.run([str(VENV_BIN / "horovodrun"), "--check-build"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    lines = {line.strip() for line in out.splitlines()}
    for name in ("PyTorch", "MPI", "Gloo"):
        assert f"[X] {name}" in lines, out


def test_horovod_is_built_against_the_installed_torch():
    import horovod.torch as hvd  # the extension loads only when compiled for this torch ABI
    assert hvd.mpi_built() and hvd.gloo_built()
