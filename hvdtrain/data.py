"""Data sets on disk and the split of samples across ranks.

A data folder holds `X.npy`, `y.npy` (training), `eval_X.npy`, `eval_y.npy` (held out) and
`meta.json`. Ranks read only their own rows, with plain file reads in chunks (`read_rows`), so a
rank's memory holds its block, never the whole set. `partition` and friends are pure functions of
(n, rank, size, seed): every rank can compute every other rank's block without talking.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path

import numpy as np

from hvdtrain.catalog import DATASETS
from hvdtrain.errors import ConfigError, write_error

BUILTINS = tuple(DATASETS)  # the built-in sets (hvdtrain/catalog.py, which config validation reads too)
REGRESSION_FEATURES = 10
_CHUNK = 1 << 16  # generation chunk: fixed, so the data is the same whatever the row count


def block_bounds(n: int, rank: int = 0, size: int = 1) -> tuple[int, int]:
    """[start, stop) of rank's contiguous block; the first n % size ranks get one extra row."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def partition(n: int, rank: int = 0, size: int = 1, scheme: str = "block", seed: int = 0) -> np.ndarray:
    """Sample indices owned by `rank`: every index in [0, n) belongs to exactly one rank."""
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"rank {rank} is outside a world of size {size}")
    if n < size:
        raise ConfigError(f"data has {n} samples but {size} ranks were started; use -np <= {n} or more rows")
    start, stop = block_bounds(n, rank, size)
    if scheme == "block":
        return np.arange(start, stop, dtype=np.int64)
    if scheme == "random":
        perm = np.random.default_rng(seed).permutation(n)
        return np.sort(perm[start:stop])  # sorted: read_rows reads the file front to back
    raise ConfigError(f"partition {scheme!r} is unknown; use block or random")


def block_sizes(n: int, size: int) -> list[int]:
    return [stop - start for start, stop in (block_bounds(n, r, size) for r in range(size))]


def averaging_weights(sizes: list[int], given: tuple[float, ...] | None = None) -> list[float]:
    """Weights w_j for parameter averaging: given ones, or n_j / sum(n)."""
    if given is None:
        total = sum(sizes)
        return [s / total for s in sizes]
    if len(given) != len(sizes):
        raise ConfigError(f"weights has {len(given)} values but {len(sizes)} ranks were started; "
                          f"give one weight per rank")
    return list(given)


def steps_per_epoch(sizes: list[int], batch_size: int) -> int:
    """Steps every rank takes per epoch: full batches of the smallest block (ranks never disagree)."""
    steps = min(sizes) // batch_size
    if steps < 1:
        raise ConfigError(f"batch size {batch_size} is larger than the smallest rank block ({min(sizes)} "
                          f"samples); use --batch-size <= {min(sizes)}")
    return steps


def epoch_order(n_local: int, epoch: int, rank: int, seed: int) -> np.ndarray:
    """The rank's shuffle for one epoch: stateless, so a resumed run sees the same order."""
    return np.random.default_rng([seed, epoch, rank]).permutation(n_local)


# --- reading -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataInfo:
    folder: Path
    task: str  # "regression" or "classification"
    n_features: int
    n_outputs: int  # 1 for regression, number of classes for classification
    n_train: int
    n_eval: int


def _open(folder: Path, name: str) -> np.ndarray:
    path = folder / name
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} is missing; write the set with `hvdtrain data make`")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"data file {str(path)!r} is unreadable ({exc}); write it again with "
                          f"`hvdtrain data make`") from None


def _check_pair(folder: Path, prefix: str, X: np.ndarray, y: np.ndarray, task: str) -> None:
    where = f"{folder / (prefix + 'X.npy')}"
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ConfigError(f"data file {where!r} has shape {X.shape}; features must be a non-empty 2-D array (rows, features); write it again")
    if X.dtype.kind != "f":
        raise ConfigError(f"data file {where!r} has dtype {X.dtype}; features must be float32 or float64")
    if y.ndim not in (1, 2) or len(y) != len(X):
        raise ConfigError(f"data in {str(folder)!r}: {prefix}X has {len(X)} rows but {prefix}y has shape "
                          f"{y.shape}; targets need one row per sample")
    if task == "classification" and y.dtype.kind not in "iu":
        raise ConfigError(f"data file {str(folder / (prefix + 'y.npy'))!r} has dtype {y.dtype}; class labels "
                          f"must be integers")
    if task == "regression" and y.dtype.kind != "f":
        raise ConfigError(f"data file {str(folder / (prefix + 'y.npy'))!r} has dtype {y.dtype}; regression "
                          f"targets must be floats")


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe(folder: str | Path) -> DataInfo:
    """Read meta.json and the array headers (no data) and check they agree."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    try:
        is_dir = folder.is_dir()
    except OSError as exc:  # e.g. ENAMETOOLONG, EACCES on a parent: not a folder this rank can read
        raise ConfigError(f"data {_short(str(folder))!r} cannot be looked up ({exc.strerror}); pass a data folder, "
                          f"one of {', '.join(BUILTINS)} or MODULE:ATTR") from None
    if not is_dir:
        raise ConfigError(f"data {str(folder)!r} is neither a folder nor a built-in set; use one of "
                          f"{', '.join(BUILTINS)} or a folder written by `hvdtrain data make`")
    try:
        meta = json.loads(meta_path.read_text())
        task = meta["task"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"data folder {str(folder)!r} has no valid meta.json; write it with "
                          f"`hvdtrain data make`") from None
    if task not in ("regression", "classification"):
        raise ConfigError(f"meta.json in {str(folder)!r} names task {task!r}; use regression or classification")
    X, y = _open(folder, "X.npy"), _open(folder, "y.npy")
    eX, ey = _open(folder, "eval_X.npy"), _open(folder, "eval_y.npy")
    _check_pair(folder, "", X, y, task)
    _check_pair(folder, "eval_", eX, ey, task)
    if eX.shape[1] != X.shape[1]:
        raise ConfigError(f"data in {str(folder)!r}: eval_X has {eX.shape[1]} features but X has "
                          f"{X.shape[1]}; write both with the same set")
    n_out = int(meta.get("n_classes", 0)) if task == "classification" else (1 if y.ndim == 1 else y.shape[1])
    if task == "classification" and n_out < 2:
        raise ConfigError(f"meta.json in {str(folder)!r} must give n_classes >= 2 for classification; add \"n_classes\": K")
    return DataInfo(folder, task, int(X.shape[1]), n_out, int(len(X)), int(len(eX)))


_READ_CHUNK = 1 << 20  # bytes per read: small against any block, large enough to stream


def read_rows(path: Path, indices: np.ndarray, dtype: str | None = None) -> np.ndarray:
    """Rows `indices` (sorted) of a .npy file, read with plain file reads in chunks straight into the
    result: unlike copying out of a memory map, no page of the file stays mapped into this process,
    so peak memory is the block plus one chunk."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, file_dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                      else np.lib.format.read_array_header_2_0(f))
        if fortran and len(shape) > 1:
            raise ConfigError(f"data file {str(path)!r} is stored in Fortran order; save it with "
                              f"np.save(np.ascontiguousarray(a))")
        start = f.tell()
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = row_items * file_dtype.itemsize
        out = np.empty((len(indices),) + tuple(shape[1:]), dtype=dtype or file_dtype)
        if not len(indices):
            return out
        lo, hi = int(indices[0]), int(indices[-1]) + 1
        per_chunk = max(1, _READ_CHUNK // max(1, row_bytes))
        contiguous = hi - lo == len(indices)
        if contiguous and out.dtype == file_dtype:  # straight into the result, no staging copy
            f.seek(start + lo * row_bytes)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise ConfigError(f"data file {str(path)!r} is shorter than its header says; write it again")
            return out
        done = 0
        for a in range(lo, hi, per_chunk):
            b = min(hi, a + per_chunk)
            f.seek(start + a * row_bytes)
            raw = f.read((b - a) * row_bytes)
            if len(raw) != (b - a) * row_bytes:
                raise ConfigError(f"data file {str(path)!r} is shorter than its header says; write it again")
            chunk = np.frombuffer(raw, dtype=file_dtype).reshape((b - a,) + tuple(shape[1:]))
            if contiguous:
                out[a - lo:b - lo] = chunk
                continue
            stop = done + int(np.searchsorted(indices[done:], b))
            out[done:stop] = chunk[indices[done:stop] - a]
            done = stop
    return out


def load_block(folder: str | Path, indices: np.ndarray, prefix: str = "",
               dtype: str = "float32", n_classes: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Read only `indices` rows (sorted) of the arrays; with `n_classes`, check the labels lie in
    [0, n_classes)."""
    folder = Path(folder)
    _open(folder, prefix + "X.npy"), _open(folder, prefix + "y.npy")  # clear errors for bad files
    xb = read_rows(folder / (prefix + "X.npy"), indices, dtype)
    yb = read_rows(folder / (prefix + "y.npy"), indices)
    if not np.isfinite(xb).all() or (yb.dtype.kind == "f" and not np.isfinite(yb).all()):
        raise ConfigError(f"data in {str(folder)!r} contains NaN or Inf in this rank's block; clean the data")
    if n_classes and len(yb) and (yb.min() < 0 or yb.max() >= n_classes):
        bad = int(yb.min()) if yb.min() < 0 else int(yb.max())
        raise ConfigError(f"data file {str(folder / (prefix + 'y.npy'))!r} has class label {bad}, outside "
                          f"[0, {n_classes}) of meta.json's n_classes; fix the labels or n_classes")
    if yb.dtype.kind == "f":
        yb = yb.astype(dtype).reshape(len(yb), -1)
    else:
        yb = yb.astype(np.int64)
    return xb, yb


# --- writing the built-in sets -------------------------------------------------------------------

def _regression_coefficients(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0xC0EF])
    return rng.normal(size=REGRESSION_FEATURES), rng.normal(size=REGRESSION_FEATURES)


def _write_regression(folder: Path, rows: int, seed: int, prefix: str, stream: int) -> None:
    """y = x.w + 0.5 sin(x.v) + 0.1 noise, generated in fixed chunks straight into the .npy file."""
    w, v = _regression_coefficients(seed)
    X = np.lib.format.open_memmap(folder / f"{prefix}X.npy", "w+", np.float32, (rows, REGRESSION_FEATURES))
    y = np.lib.format.open_memmap(folder / f"{prefix}y.npy", "w+", np.float32, (rows,))
    for c, start in enumerate(range(0, rows, _CHUNK)):
        stop = min(start + _CHUNK, rows)
        rng = np.random.default_rng([seed, stream, c])
        x = rng.normal(size=(stop - start, REGRESSION_FEATURES))
        X[start:stop] = x
        y[start:stop] = x @ w + 0.5 * np.sin(x @ v) + 0.1 * rng.normal(size=stop - start)
    X.flush()
    y.flush()
    del X, y


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The UCI optical digits (1797 8x8 images) shipped inside scikit-learn's package data."""
    spec = importlib_util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("built-in set 'digits' needs scikit-learn's packaged data; pip install scikit-learn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(path, delimiter=",")
    return (data[:, :-1] / 16.0).astype(np.float32), data[:, -1].astype(np.int64)


def make_dataset(name: str, out: str | Path, rows: int | None = None, seed: int | None = None,
                 eval_fraction: float = 0.1, overwrite: bool = False) -> Path:
    """Write a built-in set to `out` atomically (temp folder + rename) and return the folder.
    `rows` and `seed` default to the settings' defaults ([data] rows and seed in config.py).
    An existing `out` is refused unless `overwrite` (then replaced only once the new set is whole).
    A write that fails (disk full, read-only, ...) is a ConfigError naming `out` and the reason: the
    set is written before training, where every rank agrees on it (sources.resolve_folder)."""
    try:
        return _make_dataset(name, out, rows, seed, eval_fraction, overwrite)
    except OSError as exc:
        raise ConfigError(str(write_error(out, exc))) from None


def _make_dataset(name: str, out: str | Path, rows: int | None, seed: int | None, eval_fraction: float,
                  overwrite: bool) -> Path:
    out = Path(out)
    if name not in BUILTINS:
        raise ConfigError(f"built-in data set {name!r} is unknown; use one of {', '.join(BUILTINS)}")
    if rows is None or seed is None:
        from hvdtrain.config import BY_KWARG, field_default
        rows = field_default(BY_KWARG["rows"]) if rows is None else rows
        seed = field_default(BY_KWARG["seed"]) if seed is None else seed
    if not isinstance(rows, int) or rows < 1 or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"rows must be >= 1 and seed >= 0, got rows {rows!r}, seed {seed!r}; fix the value")
    if out.exists() and not overwrite:
        raise ConfigError(f"{str(out)!r} already exists; pass --overwrite to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(out.parent, f".{out.name}.")  # not mkdtemp: its 0700 would outlive the rename
    try:
        if name == "regression":
            n_eval = max(1, int(rows * eval_fraction))
            _write_regression(tmp, rows, seed, "", stream=1)
            _write_regression(tmp, n_eval, seed, "eval_", stream=2)
            meta = {"name": name, "task": "regression", "rows": rows, "eval_rows": n_eval, "seed": seed}
        else:
            X, y = _digits_arrays()
            order = np.random.default_rng(seed).permutation(len(X))
            n_eval = max(1, int(len(X) * 0.2))
            ev, tr = order[:n_eval], order[n_eval:]
            for prefix, idx in (("", tr), ("eval_", ev)):
                np.save(tmp / f"{prefix}X.npy", X[idx])
                np.save(tmp / f"{prefix}y.npy", y[idx])
            meta = {"name": name, "task": "classification", "n_classes": 10, "rows": len(tr),
                    "eval_rows": len(ev), "seed": seed, "source": "UCI optical digits via scikit-learn"}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if overwrite and out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.rename(out, old / "data")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:  # another process made it first, or an old copy is there: keep theirs
            if not (out / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder `PREFIX<random>` in `parent`, made with mode 0777 so the umask applies."""
    while True:
        path = parent / f"{prefix}{os.urandom(4).hex()}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def builtin_folder(out: str | Path, name: str, rows: int, seed: int) -> Path:
    """Where a run keeps its copy of a built-in set (inside its own output folder)."""
    tag = f"{name}-rows{rows}-seed{seed}" if name == "regression" else f"{name}-seed{seed}"
    return Path(out) / "data" / tag
