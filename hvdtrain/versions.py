"""What `hvdtrain --version` prints: hvdtrain, Python, torch, Horovod, mpi4py and the MPI library,
read without starting any of them (package metadata; the MPI library's own version string, which
MPI allows before MPI_Init)."""
from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata

from hvdtrain import __version__


def package(dist: str) -> str:
    """A distribution's installed version, or 'not installed'."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def mpi_library() -> str:
    """'Open MPI v4.1.4' (the library mpi4py is linked against), or why it is unknown. Asked in a
    child process with mpi4py's initialisation off, so the caller never starts MPI."""
    code = ("import mpi4py; mpi4py.rc.initialize = False; mpi4py.rc.finalize = False\n"
            "from mpi4py import MPI; print(' '.join(MPI.Get_library_version().split(',')[0].split()))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({type(exc).__name__})"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "not available"


def report() -> str:
    lines = [f"hvdtrain {__version__} (Python {platform.python_version()})",
             f"torch {package('torch')}", f"horovod {package('horovod')}", f"mpi4py {package('mpi4py')}"]
    if package("mpi4py") != "not installed":
        lines.append(f"MPI {mpi_library()}")
    return "\n".join(lines)
