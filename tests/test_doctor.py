"""`hvdtrain doctor`: passes on a working install, fails in one clear line when a library is missing.

A missing library is simulated for real: PYTHONPATH puts first a package of the same name whose
import raises ImportError, exactly what a broken or absent install looks like to Python.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hvdtrain.tools.doctor import Check, describe, library_checks, verdict
from hvdtrain.tools.launch import launcher_env, run

SMOKES = ("mpi4py under mpirun", "Horovod under mpirun", "Horovod under horovodrun --gloo")


def doctor(tmp_path: Path, *args: str, hide: str | None = None, timeout: float = 600) -> tuple[int, str]:
    env = launcher_env({"PYTHONUNBUFFERED": "1"})
    if hide:
        fake = tmp_path / "hidden" / hide
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text(f"raise ImportError('No module named {hide!r} (hidden by the test)')\n")
        env["PYTHONPATH"] = str(tmp_path / "hidden")
    result = run([sys.executable, "-m", "hvdtrain.tools.doctor", *args], timeout=timeout, env=env, cwd=tmp_path)
    return result.returncode, result.stdout


@pytest.mark.mpi
def test_doctor_passes_here(tmp_path):
    code, out = doctor(tmp_path, "--json", "report/doctor.json", "--timeout", "240")
    last = out.strip().splitlines()[-1]
    assert code == 0, out
    assert last.startswith("hvdtrain doctor: OK — 3 launch paths pass a 2-rank allreduce"), out
    for name in SMOKES:
        assert any(line.split()[:1] == ["ok"] and name in line for line in out.splitlines()), (name, out)
    report = json.loads((tmp_path / "report" / "doctor.json").read_text())
    assert report["ok"] is True and report["verdict"] == last and report["np"] == 2
    assert {c["name"] for c in report["checks"]} >= {"torch", "Horovod", "mpi4py", "mpirun", "horovodrun",
                                                     "launcher env"}
    assert [s["name"] for s in report["smokes"]] == list(SMOKES)
    for smoke in report["smokes"]:
        assert smoke["status"] == "ok", smoke
        ranks = smoke["data"]["ranks"]
        assert [r["lib"][:2] for r in ranks] == [[0, 2], [1, 2]]
        assert all(r["got"] == [3.0] * 4 for r in ranks)
    horovod = next(c for c in report["checks"] if c["name"] == "Horovod")["data"]
    assert "PyTorch" in horovod["frameworks"] and {"MPI", "Gloo"} <= set(horovod["controllers"])


@pytest.mark.mpi
def test_doctor_fails_clearly_without_horovod(tmp_path):
    code, out = doctor(tmp_path, "--timeout", "240", hide="horovod")
    last = out.strip().splitlines()[-1]
    assert code == 1, out
    assert "Traceback" not in out, out
    assert last.startswith("hvdtrain doctor: FAILED — Horovod cannot be imported"), out
    assert "make install" in last and "mpi_jobs/install.sh" in last, last
    lines = out.splitlines()
    assert any(line.split()[:1] == ["ok"] and "mpi4py under mpirun" in line for line in lines), out
    for name in SMOKES[1:]:
        assert any(line.split()[:1] == ["skip"] and name in line and "needs Horovod" in line for line in lines), out


def test_doctor_fails_clearly_without_mpi4py(tmp_path):
    code, out = doctor(tmp_path, "--no-smoke", "--json", "r.json", hide="mpi4py", timeout=300)
    last = out.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in out, out
    assert last.startswith("hvdtrain doctor: FAILED — mpi4py cannot be imported"), out
    assert "make install" in last, last
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is False and report["smokes"] == []


def test_bad_option_is_one_line_exit_2(tmp_path):
    code, out = doctor(tmp_path, "--np", "0", timeout=120)
    assert code == 2 and out.strip().count("\n") == 0 and "--np 0" in out, out


def test_verdict_names_the_first_failure_and_its_fix():
    ok = Check("torch", "ok", "2.13.0; CPU only")
    bad = Check("mpirun", "fail", "mpirun is not on PATH", "install Open MPI")
    smoke = Check("Horovod under mpirun", "fail", "exited 1: RuntimeError: boom", "rerun it by hand")
    assert verdict([ok, bad], [smoke], True) == (
        False, "hvdtrain doctor: FAILED — mpirun is not on PATH; fix: install Open MPI (+1 more above)")
    assert verdict([ok], [smoke], True)[1] == ("hvdtrain doctor: FAILED — Horovod under mpirun: exited 1: "
                                               "RuntimeError: boom; fix: rerun it by hand")
    passed = Check("mpi4py under mpirun", "ok", "sum 6")
    warn = Check("Horovod Gloo", "warn", "built without Gloo", "rebuild")
    skipped = Check("Horovod under horovodrun --gloo", "skip", "not run: needs Horovod Gloo")
    assert verdict([ok, warn], [passed, skipped], True, np=3) == (
        True, "hvdtrain doctor: OK — 1 launch paths pass a 3-rank allreduce: mpi4py under mpirun; "
              "1 warning(s) above")
    assert verdict([ok], [], False)[1].endswith("smoke tests not run (--no-smoke)")


def test_report_lines_describe_gpus_and_builds():
    torch_gpu = {"version": "2.11.0+cu130", "cuda": True, "cuda_version": "13.0", "nccl": "2.27.3",
                 "gpus": ["NVIDIA H100 80GB HBM3 (79 GiB)"]}
    assert describe("torch", torch_gpu) == ("2.11.0+cu130; CUDA 13.0, NCCL 2.27.3, 1 GPU(s): "
                                            "NVIDIA H100 80GB HBM3 (79 GiB)")
    horovod = {"version": "0.28.1", "frameworks": ["PyTorch"], "controllers": ["MPI"], "ops": ["NCCL", "MPI"],
               "nccl": "2.18.3"}
    assert describe("Horovod", horovod) == ("0.28.1; frameworks PyTorch; controllers MPI; tensor ops NCCL, MPI "
                                            "(NCCL 2.18.3)")
    info = {"torch": torch_gpu, "horovod": horovod, "mpi": {"error": "ImportError: x"}}
    checks = {c.name: c for c in library_checks(info, launcher_env())}
    assert checks["Horovod Gloo"].status == "warn" and "Horovod NCCL" not in checks
    assert checks["mpi4py"].status == "fail" and "make install" in checks["mpi4py"].fix
    no_nccl = {**horovod, "ops": ["MPI"], "nccl": None, "controllers": ["Gloo"]}
    checks = {c.name: c for c in library_checks({**info, "horovod": no_nccl}, launcher_env())}
    assert checks["Horovod NCCL"].status == "warn" and "HVDTRAIN_WITH_NCCL=1" in checks["Horovod NCCL"].fix
    assert checks["Horovod MPI"].status == "fail"


def test_cli_runs_doctor(tmp_path):
    """`hvdtrain doctor` reaches doctor.main (wired in cli.py)."""
    result = run([sys.executable, "-m", "hvdtrain", "doctor", "--no-smoke"], timeout=300, cwd=tmp_path)
    assert "invalid choice: 'doctor'" not in result.stdout, result.stdout  # the subcommand exists
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("hvdtrain doctor: OK"), result.stdout
