"""The Dockerfile lints clean and keeps its promises (checked by reading it; `make docker-smoke`
builds its steps for real with buildah)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(r.split(None, 1)[0].upper(), r.split(None, 1)[1] if " " in r else "") for r in rows]


def test_hadolint_is_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_image_uses_the_install_step_runs_check_build_and_drops_root():
    steps = instructions()
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "mpi_jobs/install.sh" in runs and "horovodrun --check-build" in runs
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(op == "ENTRYPOINT" for op, _ in steps)
