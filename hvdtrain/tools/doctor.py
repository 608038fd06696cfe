"""`hvdtrain doctor`: is this machine ready to run hvdtrain? One verdict line and the fix.

Why: most failures of a distributed job are environment failures (Horovod built without
PyTorch or MPI, mpi4py built against another MPI than the `mpirun` on PATH) that surface as
hangs or N interleaved tracebacks. The doctor reports what is installed, then proves each
launch path end to end with an allreduce of rank+1, whose sum is known, under mpirun (mpi4py),
mpirun (Horovod) and horovodrun --gloo (Horovod); each rank also checks that `hvdtrain.layout`
reads from the launcher's variables the rank and local rank the library reports.
Libraries are inspected in child processes (`--probe NAME`), so a missing or broken install
is a report line, never a crash, and mpi4py never starts MPI in the process that runs mpirun.
Exit code 0: OK, 1: FAILED, 2: bad option.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvdtrain import __version__
from hvdtrain.errors import ConfigError
from hvdtrain.tools.launch import (TIMEOUT_EXIT, check_capacity, ends_its_jobs, horovodrun_cmd, launcher_env,
                                   mpirun_cmd, run)
from hvdtrain.layout import detect_layout

MARK = "HVDTRAIN_DOCTOR "
INSTALL = "run `make install` (or `bash mpi_jobs/install.sh`) to build {} into .venv"


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail" | "skip"
    detail: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def probe(name: str) -> dict[str, Any]:
    """Runs in a child process: what one library reports about itself (imports happen here)."""
    if name == "torch":
        import torch
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        nccl = torch.cuda.nccl.version() if props else None
        return {"version": torch.__version__, "cuda": bool(props), "cuda_version": torch.version.cuda,
                "gpus": [f"{p.name} ({p.total_memory / 2**30:.0f} GiB)" for p in props],
                "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}
    if name == "horovod":
        import horovod
        import horovod.torch as hvd
        root = Path(horovod.__file__).parent
        nccl = int(hvd.nccl_built() or 0)
        ops = {"NCCL": nccl > 0, "DDL": hvd.ddl_built(), "CCL": hvd.ccl_built(), "MPI": hvd.mpi_built(),
               "Gloo": hvd.gloo_built()}
        return {"version": horovod.__version__,
                "frameworks": [f for f, d in (("PyTorch", "torch"), ("TensorFlow", "tensorflow"),
                                              ("MXNet", "mxnet")) if any((root / d).glob("mpi_lib*"))],
                "controllers": [c for c in ("MPI", "Gloo") if ops[c]], "ops": [o for o, on in ops.items() if on],
                "nccl": f"{nccl // 10000}.{nccl // 100 % 100}.{nccl % 100}" if nccl >= 10000 else (nccl or None)}
    import mpi4py
    mpi4py.rc.initialize = mpi4py.rc.finalize = False  # only ask which library; do not start MPI
    from mpi4py import MPI
    library = " ".join(MPI.Get_library_version().split(",")[0].split())  # "Open MPI v4.1.4"
    return {"version": mpi4py.__version__, "library": library, "standard": "%d.%d" % MPI.Get_version()}


def run_probe(name: str, timeout: float) -> dict[str, Any]:
    """The child's report, or {"error": ...} when it could not run at all."""
    result = run([sys.executable, "-m", "hvdtrain.tools.doctor", "--probe", name], timeout=timeout)
    marks = [ln[len(MARK):] for ln in result.stdout.splitlines() if ln.startswith(MARK)]
    return json.loads(marks[-1]) if marks else {"error": f"exited {result.returncode}: {_last_line(result.stdout)}"}


def _last_line(text: str) -> str:
    """The line of a failed job's output most likely to say why (the last error, else the end)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("[hvdtrain.tools.launch]")]
    errors = [ln for ln in lines if re.search(r"(Error|Exception|error:|failed|killed)", ln)]
    return (errors or lines or ["no output"])[-1][-300:]


def rank_smoke(kind: str) -> int:
    """Runs inside every rank: allreduce rank+1 and report it with the layout read from the
    launcher's variables; rank 0 prints every rank's report for the parent to judge."""
    import numpy as np
    layout = detect_layout(os.environ)
    env_view = [layout.rank, layout.size, layout.local_rank, layout.local_size, layout.launcher]
    if kind == "mpi4py":
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        me: dict[str, Any] = {"lib": [comm.rank, comm.size, local.rank, local.size], "env": env_view, "device": "cpu"}
        buf = np.full(4, comm.rank + 1.0)
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        me["got"] = buf.tolist()
        reports = comm.gather(me, root=0)
    else:
        import horovod.torch as hvd
        import torch
        hvd.init()
        me = {"lib": [hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()], "env": env_view}
        # NCCL refuses two ranks on one GPU: with fewer GPUs than ranks here, prove the launch path on CPU
        gpu = torch.cuda.device_count() >= hvd.local_size() and bool(hvd.nccl_built() or hvd.cuda_built())
        device = torch.device("cuda", hvd.local_rank()) if gpu else torch.device("cpu")
        total = hvd.allreduce(torch.full((4,), hvd.rank() + 1.0, device=device), op=hvd.Sum, name="doctor")
        me.update(got=total.cpu().tolist(), device=str(device))
        reports = hvd.allgather_object(me, name="doctor.reports")
    if me["lib"][0] == 0:
        print(MARK + json.dumps(reports), flush=True)
    return 0


def describe(name: str, r: dict[str, Any]) -> str:
    """One report line from a library's probe."""
    if name == "torch":
        gpus = f"CUDA {r['cuda_version']}, NCCL {r['nccl']}, {len(r['gpus'])} GPU(s): {', '.join(r['gpus'])}"
        return f"{r['version']}; {gpus if r['cuda'] else 'CPU only'}"
    if name == "Horovod":
        return (f"{r['version']}; frameworks {', '.join(r['frameworks']) or '-'}; controllers "
                f"{', '.join(r['controllers']) or '-'}; tensor ops {', '.join(r['ops']) or '-'}"
                + (f" (NCCL {r['nccl']})" if r["nccl"] else ""))
    return f"{r['version']}; {r['library']} (MPI {r['standard']})"


def library_checks(info: dict[str, dict[str, Any]], env: dict[str, str]) -> list[Check]:
    """Turn the probes' reports and the launchers found on PATH into report lines."""
    t, h, m = info["torch"], info["horovod"], info["mpi"]
    checks = []
    for name, found, what in (("torch", t, "torch"), ("Horovod", h, "Horovod 0.28.1 with PyTorch, MPI and Gloo"),
                              ("mpi4py", m, "mpi4py against the system MPI")):
        checks.append(Check(name, "fail", f"{name} cannot be imported ({found['error']})", INSTALL.format(what))
                      if "error" in found else Check(name, "ok", describe(name, found), data=found))
    if "error" not in h:
        if "MPI" not in h["controllers"]:
            checks.append(Check("Horovod MPI", "fail", "Horovod was built without MPI (horovodrun --mpi and "
                                "`hvdtrain compare` need it)", "rebuild it with HOROVOD_WITH_MPI=1: make install"))
        if "Gloo" not in h["controllers"]:
            checks.append(Check("Horovod Gloo", "warn", "Horovod was built without Gloo; horovodrun --gloo is "
                                "unavailable", "rebuild it with HOROVOD_WITH_GLOO=1: make install"))
        if t.get("cuda") and "NCCL" not in h["ops"]:
            checks.append(Check("Horovod NCCL", "warn", "GPUs are present but Horovod has no NCCL operations, so "
                                "gradients are reduced through host memory", "HVDTRAIN_WITH_NCCL=1 make install"))
    mpirun = shutil.which("mpirun", path=env["PATH"])
    if mpirun is None:
        checks.append(Check("mpirun", "fail", "mpirun is not on PATH", "install Open MPI (`apt-get install "
                            "openmpi-bin libopenmpi-dev`; `make install` does it as root)"))
    else:
        version = run([mpirun, "--version"], timeout=30, env=env).stdout.strip().splitlines() or ["?"]
        checks.append(Check("mpirun", "ok", f"{mpirun} ({version[0]})", data={"path": mpirun, "version": version[0]}))
    horovodrun = shutil.which("horovodrun", path=env["PATH"])
    checks.append(Check("horovodrun", "ok", horovodrun, data={"path": horovodrun}) if horovodrun else
                  Check("horovodrun", "skip" if "error" in h else "fail", "horovodrun is not on PATH",
                        "activate .venv (source .venv/bin/activate), or " + INSTALL.format("Horovod")))
    try:
        layout = detect_layout(os.environ)
        checks.append(Check("launcher env", "ok", layout.describe(), data=asdict(layout)))
    except ConfigError as exc:
        what, _, how = str(exc).partition("; ")
        checks.append(Check("launcher env", "fail", what, how))
    return checks


# (name, library, launcher, the report lines it needs)
SMOKES = (("mpi4py under mpirun", "mpi4py", "mpirun", ("mpi4py", "mpirun")),
          ("Horovod under mpirun", "horovod", "mpirun", ("Horovod", "Horovod MPI", "mpirun")),
          ("Horovod under horovodrun --gloo", "horovod", "horovodrun-gloo", ("Horovod", "Horovod Gloo", "horovodrun")))


def smoke_command(kind: str, launcher: str, np: int) -> list[str]:
    argv = ["hvdtrain.tools.doctor", "--rank-smoke", kind]
    if launcher == "horovodrun-gloo":
        return horovodrun_cmd(np, argv, gloo=True)
    if kind == "mpi4py":  # as hvdtrain runs it: an exception on one rank aborts all
        return mpirun_cmd(np, argv)
    return mpirun_cmd(np, [sys.executable, "-m", *argv], python_module=False)


def run_smoke(name: str, kind: str, launcher: str, np: int, timeout: float) -> Check:
    """Launch one 2-rank job and judge its reports: every rank got the sum, layout agrees."""
    cmd = smoke_command(kind, launcher, np)
    start = time.perf_counter()
    result = run(cmd, timeout=timeout)
    data: dict[str, Any] = {"command": cmd, "seconds": round(time.perf_counter() - start, 2),
                            "returncode": result.returncode, "output_tail": result.stdout[-4000:], "np": np}
    if result.returncode == TIMEOUT_EXIT:
        return Check(name, "fail", f"no result within {timeout:.0f} s (a rank hung)", "raise --timeout; if it still "
                     "hangs, let ranks reach each other (firewall, HOROVOD_GLOO_IFACE, --mca btl_tcp_if_include)", data)
    by_hand = "rerun it by hand to see every rank's output: " + shlex.join(cmd)
    marks = [ln.split(MARK, 1)[1] for ln in result.stdout.splitlines() if MARK in ln]
    try:
        reports = data["ranks"] = json.loads(marks[-1]) if result.returncode == 0 and marks else None
    except ValueError:
        reports = None
    if reports is None:
        return Check(name, "fail", f"exited {result.returncode}: {_last_line(result.stdout)}", by_hand, data)
    expected = np * (np + 1) / 2
    if len(reports) != np:
        return Check(name, "fail", f"ranks saw a world of {len(reports)}, not {np}: the MPI library and the "
                     "launcher do not match", "rebuild against the mpirun on PATH: make install", data)
    for r, rep in enumerate(reports):
        if any(abs(g - expected) > 1e-9 for g in rep["got"]):
            return Check(name, "fail", f"rank {r} got {rep['got']}, expected {expected:g} everywhere", by_hand, data)
        if rep["env"][:4] != rep["lib"] or rep["env"][4] != launcher:
            return Check(name, "fail", f"rank {r}: the library reports (rank, size, local rank, local size) = "
                         f"{rep['lib']} but the launcher's variables give {rep['env']}", "check for stale "
                         "OMPI_*/HOROVOD_*/PMI_*/SLURM_* variables in the environment (env | grep)", data)
    return Check(name, "ok", f"sum {expected:g} on all {np} ranks ({reports[0]['device']}), launcher "
                 f"variables agree; {data['seconds']:.1f} s", data=data)


def verdict(checks: list[Check], smokes: list[Check], ran_smokes: bool, np: int = 2) -> tuple[bool, str]:
    """(ok, the last line): the first failure and its fix, or what was proven."""
    fails = [c for c in checks + smokes if c.status == "fail"]
    if fails:
        first, more = fails[0], (f" (+{len(fails) - 1} more above)" if len(fails) > 1 else "")
        what = first.detail if first.detail.startswith(first.name) else f"{first.name}: {first.detail}"
        return False, f"hvdtrain doctor: FAILED — {what}; fix: {first.fix}{more}"
    warns = sum(c.status == "warn" for c in checks + smokes)
    tail = f"; {warns} warning(s) above" if warns else ""
    passed = [c.name for c in smokes if c.status == "ok"]
    done = (f"{len(passed)} launch paths pass a {np}-rank allreduce: {', '.join(passed)}" if ran_smokes
            else "libraries and launchers found; smoke tests not run (--no-smoke)")
    return True, f"hvdtrain doctor: OK — {done}{tail}"


def _line(c: Check) -> str:
    fix = f"\n        fix: {c.fix}" if c.status in ("fail", "warn") else ""
    return f"  {c.status:<4}  {c.name:<32} {c.detail}{fix}"


def build_parser() -> argparse.ArgumentParser:
    from hvdtrain.cli import Parser
    p = Parser(prog="hvdtrain doctor", description="Report torch, Horovod, mpi4py, MPI and the launchers; "
               "prove each launch path with a small allreduce. Exit 0: OK, 1: FAILED.")
    p.add_argument("--np", type=int, default=2, help="ranks per smoke test (default 2)")
    p.add_argument("--timeout", type=float, default=120, help="seconds per smoke test (default 120)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--no-smoke", action="store_true", help="report only; launch no jobs")
    p.add_argument("--oversubscribe", action="store_true",
                   help="run more than 8 ranks per core anyway (refused otherwise)")
    p.add_argument("--probe", choices=("torch", "horovod", "mpi"), help=argparse.SUPPRESS)
    p.add_argument("--rank-smoke", choices=("mpi4py", "horovod"), help=argparse.SUPPRESS)
    return p


@ends_its_jobs("hvdtrain doctor", rank_flags=("--probe", "--rank-smoke"))
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.probe:  # child process: one JSON line, errors included, never a traceback
        try:
            result = probe(args.probe)
        except BaseException as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(MARK + json.dumps(result), flush=True)
        return 0
    if args.rank_smoke:
        return rank_smoke(args.rank_smoke)
    if args.np < 1 or args.timeout <= 0:  # exits 2, as any bad option does
        build_parser().error(f"--np {args.np} and --timeout {args.timeout:g} must be positive; use e.g. --np 2")
    try:
        if not args.no_smoke:
            check_capacity(args.np, oversubscribe=args.oversubscribe)
    except ValueError as exc:
        sys.stderr.write(f"hvdtrain: error: {exc}\n")
        return 2
    print(f"hvdtrain doctor: hvdtrain {__version__}, Python {platform.python_version()} ({sys.executable}), "
          f"{os.cpu_count()} cores", flush=True)
    env = launcher_env()
    with ThreadPoolExecutor(3) as pool:  # three imports of torch at once: about 2 s instead of 6
        names = ("torch", "horovod", "mpi")
        info = dict(zip(names, pool.map(lambda n: run_probe(n, max(args.timeout, 60)), names)))
    checks = library_checks(info, env)
    print("\n".join(_line(c) for c in checks), flush=True)
    smokes: list[Check] = []
    if not args.no_smoke:
        print(f"smoke tests: {args.np} ranks allreduce rank+1, expecting {args.np * (args.np + 1) / 2:g}", flush=True)
        for name, kind, launcher, needs in SMOKES:
            missing = [c.name for c in checks if c.name in needs and c.status != "ok"]
            check = (Check(name, "skip", f"not run: needs {', '.join(missing)}") if missing
                     else run_smoke(name, kind, launcher, args.np, args.timeout))
            smokes.append(check)
            print(_line(check), flush=True)
    ok, line = verdict(checks, smokes, not args.no_smoke, args.np)
    print(line, flush=True)
    if args.json:
        report = {"ok": ok, "verdict": line, "np": args.np, "hvdtrain": __version__, "python": sys.executable,
                  "checks": [asdict(c) for c in checks], "smokes": [asdict(c) for c in smokes]}
        try:
            tmp = Path(f"{args.json}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            os.replace(tmp, args.json)  # readers never see half a report
        except OSError as exc:
            sys.stderr.write(f"hvdtrain: error: cannot write --json {args.json!r} ({exc.strerror}); use another FILE\n")
            return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
