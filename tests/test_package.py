"""hvdtrain installs like a package: a wheel built from the sources, installed into a fresh venv
(no editable install, no checkout on sys.path), runs `hvdtrain --version` and a 2-rank
`--backend mpi` job; without Horovod `--backend horovod` is one line with the hint. The metadata is
honest: every module parses with the grammar of `python_requires`' floor.

The fresh venv takes torch, numpy and mpi4py from this venv's site-packages through a path line
(a .pth in the new venv): installing torch again would cost a minute and a GB per run. hvdtrain
itself comes only from the wheel: the path line adds a directory, not the .pth files in it, so this
venv's editable install of the checkout stays out (the test checks where hvdtrain was imported from).
"""
from __future__ import annotations

import ast
import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from support.jobs import run_job

ROOT = Path(__file__).resolve().parents[1]


def python_floor() -> tuple[int, int]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    spec = cfg["options"]["python_requires"].strip()
    assert spec.startswith(">="), spec
    major, minor = spec[2:].split(".")[:2]
    return int(major), int(minor)


def test_every_module_parses_with_the_oldest_supported_grammar():
    floor = python_floor()
    bad = []
    for path in sorted((ROOT / "hvdtrain").rglob("*.py")):
        try:
            ast.parse(path.read_text(), filename=str(path), feature_version=floor)
        except SyntaxError as exc:
            bad.append(f"{path.relative_to(ROOT)}:{exc.lineno}: {exc.msg}")
    assert bad == [], bad


def test_the_floor_is_not_lower_than_what_the_code_imports():
    # tomllib is 3.11's: a floor below it would be a promise the code breaks at import.
    uses_tomllib = any("import tomllib" in p.read_text() for p in (ROOT / "hvdtrain").rglob("*.py"))
    assert not uses_tomllib or python_floor() >= (3, 11)


def test_the_grammar_check_can_fail():
    with pytest.raises(SyntaxError):
        ast.parse("type Point = tuple[float, float]\n", feature_version=(3, 11))  # 3.12 syntax


def test_horovod_is_an_extra_not_a_requirement():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    core = cfg["options"]["install_requires"].split()
    assert not any(r.startswith("horovod") for r in core), core
    assert "horovod==0.28.1" in cfg["options.extras_require"]["horovod"].split()


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"  # a copy of the tracked tree: building in the checkout would leave build/ there
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    dist = tmp / "dist"
    built = run_job([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                     str(dist), str(src)], timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list(dist.glob("hvdtrain-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    made = run_job([base, "-m", "venv", str(venv)], timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "hvdtrain_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run_job([str(py), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                         str(wheels[0])], timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    work = tmp / "work"  # not the checkout: nothing of it on sys.path through the working directory
    work.mkdir()
    return venv, site, env, work


def test_wheel_installs_and_imports_from_the_venv_not_the_checkout(wheel_venv):
    venv, site, env, work = wheel_venv
    where = run_job([str(venv / "bin" / "python"), "-c", "import hvdtrain, hvdtrain.tools.compare; "
                     "print(hvdtrain.__file__)"], timeout=120, env=env, cwd=work)
    assert where.returncode == 0, where.stdout + where.stderr
    assert Path(where.stdout.strip()).resolve().is_relative_to(site.resolve()), where.stdout
    version = run_job([str(venv / "bin" / "hvdtrain"), "--version"], timeout=120, env=env, cwd=work)
    import hvdtrain
    assert version.returncode == 0 and version.stdout.startswith(f"hvdtrain {hvdtrain.__version__} "), version


@pytest.mark.mpi
def test_wheel_runs_a_two_rank_mpi_job(wheel_venv):
    venv, site, env, work = wheel_venv
    out = work / "run"
    job = run_job(["mpirun", "-np", "2", "--bind-to", "none", str(venv / "bin" / "python"), "-m", "mpi4py", "-m",
                   "hvdtrain", "train", "--backend", "mpi", "--rows", "800", "--batch-size", "16", "--out", str(out)],
                  timeout=300, env=env, cwd=work)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["backend"], summary["world_size"]) == ("mpi", 2), summary
    assert summary["steps_by_rank"] == [summary["steps"]] * 2 and summary["steps"] > 0, summary


def test_without_horovod_the_horovod_backend_is_one_line(wheel_venv, tmp_path):
    venv, site, env, work = wheel_venv
    hide = tmp_path / "hide"  # a horovod that cannot be imported, ahead of everything else
    (hide / "horovod").mkdir(parents=True)
    (hide / "horovod" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'horovod'\")\n")
    env = dict(env, PYTHONPATH=str(hide))
    result = run_job([str(venv / "bin" / "hvdtrain"), "train", "--backend", "horovod", "--rows", "200",
                      "--out", str(tmp_path / "h")], timeout=120, env=env, cwd=work)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Horovod" in lines[0] and "make install" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    single = run_job([str(venv / "bin" / "hvdtrain"), "train", "--backend", "single", "--rows", "200",
                      "--out", str(tmp_path / "s")], timeout=120, env=env, cwd=work)
    assert single.returncode == 0, single.stderr[-2000:]
