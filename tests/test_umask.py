"""Output files respect the umask, like any other tool's: 0666 & ~umask for files (0644 under 022) and
0777 & ~umask for folders, including files written through a temp file and a rename (metrics,
summary, model, checkpoints, built-in data) — the umask is respected, never forced either way."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from hvdtrain.checkpoint import atomic_torch_save, atomic_write_text
from support.jobs import run_job


def modes(root: Path) -> dict[str, set[str]]:
    """{'files': {octal modes}, 'dirs': {...}} of everything under root (root itself included)."""
    found: dict[str, set[str]] = {"files": set(), "dirs": {oct(stat.S_IMODE(root.stat().st_mode))}}
    by_mode: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        mode = oct(stat.S_IMODE(path.lstat().st_mode))
        found["dirs" if path.is_dir() else "files"].add(mode)
        by_mode.setdefault(mode, []).append(str(path.relative_to(root)))
    found["where"] = {m: sorted(p)[:5] for m, p in by_mode.items()}  # type: ignore[assignment]
    return found


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, "0o644", "0o755"), (0o077, "0o600", "0o700")])
def test_every_output_file_follows_the_umask(tmp_path, umask, file_mode, dir_mode):
    out = tmp_path / "out"
    cmd = ["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", sys.executable, "-m", "hvdtrain", "train",
           "--backend", "single", "--checkpoint-every", "2", "--eval-every", "2", "--tensorboard",
           "--rows", "256", "--epochs", "1", "--batch-size", "32", "--threads", "1", "--out", str(out)]
    result = run_job(cmd, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    names = {p.name for p in out.rglob("*")}
    for expected in ("metrics.jsonl", "evals.jsonl", "summary.json", "model.pt", "meta.json", "X.npy"):
        assert expected in names, sorted(names)
    assert any(n.startswith("ckpt-") for n in names) and any(n.startswith("events.out.tfevents") for n in names)
    found = modes(out)
    assert found["files"] == {file_mode}, found["where"]
    assert found["dirs"] == {dir_mode}, found["where"]


@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        atomic_write_text("x\n", tmp_path / "a.json")
        atomic_torch_save({"x": 1}, tmp_path / "sub" / "b.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "sub" / "b.pt").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "sub").stat().st_mode) == expected | 0o111 & ~umask
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "b.pt", "sub"]  # no temp file left
