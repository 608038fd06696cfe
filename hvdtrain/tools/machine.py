"""Where a tool's numbers come from (one definition for every bench JSON and plan profile): the
CPU model, cores, Python, the platform and the versions of the libraries that set the speed."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

from hvdtrain.versions import package


def cpu_model() -> str:
    """The first `model name` of /proc/cpuinfo (platform.processor() where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor()


def mpirun_version() -> str | None:
    """The first line of `mpirun --version`, None without one."""
    try:
        return subprocess.run(["mpirun", "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def machine() -> dict[str, Any]:
    """Numbers compare only within one run on one machine: this says which machine."""
    versions: dict[str, str | None] = {pkg: package(pkg) for pkg in ("torch", "numpy", "horovod", "mpi4py")}
    versions = {pkg: None if v == "not installed" else v for pkg, v in versions.items()}
    versions["mpirun"] = mpirun_version()
    return {"host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}
