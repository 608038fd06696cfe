"""Checkpoints: written atomically by rank 0, loaded with weights_only=True (no code runs on load).

Also the one way hvdtrain writes its files (`atomic_write`, `writing`): a write that fails (disk
full, read-only, no permission, quota) becomes a WriteError naming the path and the reason, and
leaves no temporary file and nothing partial under the final name.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import torch

from hvdtrain.errors import ConfigError, WriteError, writing

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def _atomic_write(path: str | Path, mode: str, write: Callable[[IO[Any]], None]) -> None:
    """Write through `write` into a temp file in the same folder, fsync, then rename over `path`:
    readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _temp_file(path: Path) -> tuple[int, str]:
    """A new, empty `.NAME.XXXX.tmp` beside `path`, opened for writing. Created with mode 0666 so the
    umask applies (0644 under 022), as for any file a program writes: mkstemp's 0600 would survive the
    rename and leave the run unreadable to the project's group."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), str(tmp)
        except FileExistsError:
            continue


def atomic_write(path: str | Path, mode: str, write: Callable[[IO[Any]], None]) -> None:
    """Write `path` through `write(file)` atomically (a temp file beside it, fsync, rename): on any
    failure the temp file is removed, the old `path` is untouched, and an OSError is a WriteError."""
    with writing(path):
        _atomic_write(path, mode, write)


class _Recorder:
    """The file torch.save writes into, remembering the OSError of a failed write: torch's writer
    reports it as `RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...`."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj: Any, f: IO[bytes]) -> None:
    """torch.save into `f`; a failed write raises the OSError beneath torch's RuntimeError (or
    ENOSPC when that error is lost and the file system is full)."""
    recorder = _Recorder(f)
    try:
        torch.save(obj, recorder)
    except RuntimeError as exc:
        hidden = recorder.error or next((e for e in _chain(exc) if isinstance(e, OSError)), None)
        if hidden is not None:
            raise hidden from None
        st = os.fstatvfs(f.fileno())
        if st.f_bavail * st.f_frsize < 1 << 20:  # under 1 MiB free: the write ran out of space
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, "wb", lambda f: _torch_save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> None:
    atomic_write(path, "w", lambda f: f.write(text))


def append_text(text: str, path: str | Path) -> None:
    """Append `text` to `path` (a JSONL log), all or nothing: a write that fails is cut back off,
    so the file never ends in a torn line; WriteError names `path`."""
    with writing(path), open(path, "ab", buffering=0) as f:
        data, start = memoryview(text.encode()), os.fstat(f.fileno()).st_size
        try:
            while data:
                written = f.write(data)
                if not written:
                    raise OSError(errno.EIO, f"short write to {path}")
                data = data[written:]
        except OSError:
            with contextlib.suppress(OSError):
                f.truncate(start)
            raise


def spread_write_error(comm: Any, error: WriteError | None) -> None:
    """Every rank calls this at the same point: a write that failed on any rank raises the same
    WriteError on every rank (one small allgather), so none is left waiting in a collective."""
    found = comm.allgather_object(None if error is None else
                                  (error.path, error.errno, error.reason, error.message))
    first = next((e for e in found if e is not None), None)
    if first is not None:
        raise WriteError(*first, everywhere=True)


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
    atomic_torch_save({"format": FORMAT, **payload}, path)  # a failure leaves the older ones as they are
    old = sorted(p for p in Path(folder).iterdir() if _NAME.match(p.name))[:-keep]
    for p in old:
        with writing(p):
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


# --- what a run checkpoints: every rank's state when replicas differ, else one copy -------------

def fingerprint(model: Any) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in model.state_dict().items()]


def rank_state(model: Any, optimizer: Any, extras: dict[str, Any]) -> dict[str, Any]:
    """This rank's model, optimizer, RNG and `extras` (scheduler, grad scaler: objects with state_dict)."""
    state = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    state.update({k: v.state_dict() for k, v in extras.items() if v is not None})
    return state


def save_run(out: str | Path, comm: Any, strategy: Any, model: Any, optimizer: Any, step: int,
             extras: dict[str, Any], layout: dict[str, Any]) -> Path | None:
    """Rank 0 writes one copy when replicas agree, else every rank's state (gathered). `layout`
    (steps_per_epoch, weights) lets a run resume at another world size. A failed write raises
    WriteError on every rank (rank 0's line names the file)."""
    mine = rank_state(model, optimizer, extras)
    states = [mine] if strategy.replicas_identical else comm.gather_object(mine)
    path, error = None, None
    if comm.rank == 0:
        payload = {"step": step, "world_size": comm.size, "backend": strategy.name,
                   "fingerprint": fingerprint(model), "ranks": states, **layout}
        try:
            path = save_checkpoint(Path(out) / "checkpoints", step, payload)
        except WriteError as exc:
            error = exc
    spread_write_error(comm, error)  # hvdtrain: every rank stops here when rank 0's write failed
    return path


def _mix(values: list[Any], weights: list[float]) -> Any:
    """Weighted mean of matching floating tensors (nested in dicts/lists); anything else: rank 0's."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if not first.is_floating_point():
            return first
        return sum(w * v.double() for w, v in zip(weights, values)).to(first.dtype)
    if isinstance(first, dict):
        return {k: _mix([v[k] for v in values], weights) if all(k in v for v in values) else first[k]
                for k in first}
    if isinstance(first, (list, tuple)) and all(isinstance(v, type(first)) and len(v) == len(first) for v in values):
        return type(first)(_mix([v[i] for v in values], weights) for i in range(len(first)))
    return first


def combine_states(states: list[dict[str, Any]], weights: list[float]) -> dict[str, Any]:
    """One state from every rank's (MPI fallback, resumed at another world size): parameters,
    buffers and optimizer moments averaged with the run's averaging weights w_j (the same rule as
    a sync), step counters, RNG and schedules from rank 0."""
    combined = dict(states[0])
    combined["model"] = _mix([s["model"] for s in states], weights)
    combined["optimizer"] = {"state": _mix([s["optimizer"]["state"] for s in states], weights),
                             "param_groups": states[0]["optimizer"]["param_groups"]}
    return combined


def resume_step(step: int, old_steps_per_epoch: int, new_steps_per_epoch: int) -> int:
    """The same point of the same epoch when the world size (so steps per epoch) changed."""
    if old_steps_per_epoch == new_steps_per_epoch or old_steps_per_epoch <= 0:
        return step
    epoch, done = divmod(step, old_steps_per_epoch)
    return epoch * new_steps_per_epoch + (done * new_steps_per_epoch) // old_steps_per_epoch


def restore_run(out: str | Path, comm: Any, strategy: Any, model: Any, optimizer: Any,
                extras: dict[str, Any], steps_per_epoch: int) -> tuple[int, bool]:
    """Rank 0 loads the newest checkpoint and broadcasts it; returns (step, per_rank_state).
    At another world size, per-rank states are combined into one (combine_states) and the step
    moves to the same point of the same epoch."""
    ckpt: dict[str, Any] | str | None = None
    if comm.rank == 0:
        path = latest_checkpoint(Path(out) / "checkpoints")
        try:
            if path is None:
                raise ConfigError(f"--resume found no checkpoint in {out}/checkpoints; run without "
                                  f"--resume to start fresh")
            ckpt = load_checkpoint(path)
            if [(n, tuple(s)) for n, s in ckpt["fingerprint"]] != fingerprint(model):
                raise ConfigError(f"checkpoint {str(path)!r} was written for another model; resume with "
                                  f"the same --model/--hidden or choose another --out")
            if len(ckpt["ranks"]) > 1 and ckpt["world_size"] != comm.size:
                weights = ckpt.get("weights") or [1 / len(ckpt["ranks"])] * len(ckpt["ranks"])
                ckpt["ranks"] = [combine_states(ckpt["ranks"], weights)]
            ckpt["step"] = resume_step(int(ckpt["step"]), int(ckpt.get("steps_per_epoch", 0)), steps_per_epoch)
        except ConfigError as exc:
            ckpt = str(exc)
    ckpt = comm.broadcast_object(ckpt)  # hvdtrain: rank 0's checkpoint to every rank
    if isinstance(ckpt, str):
        raise ConfigError(ckpt)
    assert ckpt is not None
    per_rank = len(ckpt["ranks"]) > 1 and not strategy.replicas_identical
    state = ckpt["ranks"][comm.rank if per_rank else 0]
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for key, obj in extras.items():
        if obj is not None and key in state:
            obj.load_state_dict(state[key])
    torch.set_rng_state(state["rng"])
    return int(ckpt["step"]), per_rank
