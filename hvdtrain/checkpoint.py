"""Checkpoints: written atomically by rank 0, loaded with weights_only=True (no code runs on load)."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch

from hvdtrain.config import ConfigError

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def _atomic_write(path: str | Path, mode: str, write: Callable[[IO[Any]], None]) -> None:
    """Write through `write` into a temp file in the same folder, fsync, then rename over `path`:
    readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> None:
    _atomic_write(path, "w", lambda f: f.write(text))


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:08d}.pt"


def latest_checkpoint(folder: str | Path) -> Path | None:
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir() if _NAME.match(p.name))
    return found[-1] if found else None


def save_checkpoint(folder: str | Path, step: int, payload: dict[str, Any], keep: int = 3) -> Path:
    """Write ckpt-<step>.pt atomically and keep only the newest `keep` checkpoints."""
    path = checkpoint_path(folder, step)
    atomic_torch_save({"format": FORMAT, **payload}, path)
    old = sorted(p for p in Path(folder).iterdir() if _NAME.match(p.name))[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"checkpoint {str(path)!r} cannot be loaded ({first}); delete it to resume "
                          f"from the one before, or start without --resume") from None
    keys = ("step", "world_size", "fingerprint", "ranks")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or not all(k in ckpt for k in keys):
        raise ConfigError(f"checkpoint {str(path)!r} is not an hvdtrain checkpoint (format "
                          f"{FORMAT}); start without --resume or pass another --out")
    return ckpt
