"""This rank's data, whatever the source: a data folder (.npy files read in chunks), an (X, y) pair of
arrays, or a user's map-style Dataset. Every source is cut with the same pure `partition`, and a
rank touches only its own block: it copies its rows of a folder or array, and it calls a
Dataset's `__getitem__` only for its own indices (through a DataLoader, so `num_workers` and
`pin_memory` apply to data sets that read from disk).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from hvdtrain import data as D
from hvdtrain.comm.base import Comm
from hvdtrain.config import TrainConfig
from hvdtrain.errors import ConfigError
from hvdtrain.plugins import call_plugin, describe_error, is_spec, load_attr
from hvdtrain.registry import DataShape, Job

Batch = tuple[Any, Any]


class Block(ABC):
    """One rank's share of a split; `n` samples, read by position 0..n-1."""
    n: int

    def cast(self, dtype: torch.dtype) -> None:
        """Floating inputs and targets in the model's dtype."""

    @abstractmethod
    def batches(self, order: np.ndarray, batch: int, partial: bool = False) -> Iterator[Batch]:
        """Batches of `batch` samples in `order` (positions in this block); the last short batch only
        when `partial`."""


class TensorBlock(Block):
    """Rows already in memory (a folder's block or an array pair's): the fast path, no DataLoader."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
        self.X, self.y, self.n = X.to(device), y.to(device), len(X)

    def cast(self, dtype: torch.dtype) -> None:
        if self.X.is_floating_point():
            self.X = self.X.to(dtype)
        if self.y.is_floating_point():
            self.y = self.y.to(dtype)

    def batches(self, order: np.ndarray, batch: int, partial: bool = False) -> Iterator[Batch]:
        idx = torch.from_numpy(np.ascontiguousarray(order)).to(self.X.device)
        stop = len(idx) if partial else len(idx) - len(idx) % batch
        for start in range(0, stop, batch):
            i = idx[start:start + batch]
            yield self.X[i], self.y[i]


class DatasetBlock(Block):
    """A user Dataset seen through this rank's global `indices` only."""

    def __init__(self, dataset: Any, indices: np.ndarray, cfg: TrainConfig, device: torch.device) -> None:
        self.dataset, self.indices, self.n = dataset, indices, len(indices)
        self.workers, self.pin = cfg.data.num_workers, cfg.data.pin_memory and device.type == "cuda"
        self.device, self.dtype = device, getattr(torch, cfg.model.dtype)

    def cast(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def batches(self, order: np.ndarray, batch: int, partial: bool = False) -> Iterator[Batch]:
        sampler = self.indices[order].tolist()  # hvdtrain: only this rank's indices are ever read
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch, sampler=sampler,
                                             num_workers=self.workers, pin_memory=self.pin,
                                             drop_last=not partial,
                                             # its own generator: creating the loader draws no number
                                             # from the global RNG, so a resumed run stays exact
                                             generator=torch.Generator().manual_seed(len(order)))
        for x, y in loader:
            if isinstance(y, torch.Tensor) and not y.is_floating_point() and y.dtype != torch.int64:
                y = y.long()  # int32 / uint8 / bool class ids, as the (X, y) path gives them
            yield _to(x, self.device, self.dtype), _to(y, self.device, self.dtype)


def _to(t: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device, non_blocking=True)


@dataclass
class RankData:
    train: Block
    eval: Block | None
    shape: DataShape
    sizes: list[int]          # every rank's training block size (for steps and weights)
    source: str               # names the data in messages and the summary
    record: dict[str, Any]    # what every rank must agree on

    def cast(self, dtype: torch.dtype) -> None:
        for block in (self.train, self.eval):
            if block is not None:
                block.cast(dtype)


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(
        obj, (tuple, list, dict, str, np.ndarray, torch.Tensor))


def _is_array(obj: Any) -> bool:
    return isinstance(obj, (np.ndarray, torch.Tensor))


def _split(found: Any, spec: str) -> tuple[Any, Any]:
    """What a --data MODULE:ATTR factory returned -> (train, eval)."""
    if _is_dataset(found):
        return found, None
    if isinstance(found, (tuple, list)) and len(found) == 2:
        if all(_is_array(f) for f in found):
            return tuple(found), None
        if all(f is None or _is_dataset(f) or _is_pair(f) for f in found) and found[0] is not None:
            return found[0], found[1]
    raise ConfigError(f"--data {spec} returned {type(found).__name__}; return a Dataset, a (train, eval) "
                      f"pair of Datasets, or an (X, y) pair of arrays")


def _is_pair(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and all(_is_array(o) for o in obj)


def open_data(cfg: TrainConfig, job: Job, comm: Comm, device: torch.device) -> RankData:
    """Resolve the training and eval data and cut out this rank's blocks."""
    train, evald = job.train_data, job.eval_data
    if train is None or isinstance(train, (str, Path)):
        spec = str(train if train is not None else cfg.data.path)
        if is_spec(spec):
            train, found_eval = _split(call_plugin(spec, "--data", load_attr(spec, "--data")), spec)
            evald = evald if evald is not None else found_eval
            source = spec
        else:
            return _open_folder(cfg, spec, comm, device)
    else:
        source = type(train).__name__
    return _open_objects(cfg, train, evald, source, comm, device)


def resolve_folder(cfg: TrainConfig, path: str, comm: Comm) -> Path:
    """A folder, or a built-in set that rank 0 writes inside --out before the others read it."""
    if path not in D.BUILTINS:
        return Path(path)
    folder = D.builtin_folder(cfg.out, path, cfg.data.rows, cfg.seed)
    error = None
    if comm.rank == 0 and not (folder / "meta.json").is_file():
        try:
            D.make_dataset(path, folder, cfg.data.rows, cfg.seed)
        except ConfigError as exc:
            error = str(exc)
    error = comm.broadcast_object(error)  # hvdtrain: the others wait for rank 0's file
    if error:
        raise ConfigError(error)
    return folder


def _open_folder(cfg: TrainConfig, path: str, comm: Comm, device: torch.device) -> RankData:
    folder = resolve_folder(cfg, path, comm)
    info = D.describe(folder)
    rank, size = comm.rank, comm.size
    X, y = D.load_block(folder, D.partition(info.n_train, rank, size, cfg.data.partition, cfg.seed),
                        dtype=cfg.model.dtype, n_classes=info.n_outputs if info.task == "classification" else 0)
    eX, ey = D.load_block(folder, np.arange(*D.block_bounds(info.n_eval, rank, size)), prefix="eval_",
                          dtype=cfg.model.dtype, n_classes=info.n_outputs if info.task == "classification" else 0)
    shape = DataShape(info.task, info.n_features, info.n_outputs)
    return RankData(TensorBlock(torch.from_numpy(X), torch.from_numpy(y), device),
                    TensorBlock(torch.from_numpy(eX), torch.from_numpy(ey), device) if len(eX) else None,
                    shape, D.block_sizes(info.n_train, size), str(folder),
                    {"task": info.task, "train_rows": info.n_train, "eval_rows": info.n_eval,
                     "features": info.n_features, "outputs": info.n_outputs})


def _array_block(pair: Any, indices: np.ndarray, dtype: str, device: torch.device, what: str) -> TensorBlock:
    X, y = (torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a for a in pair)
    if len(X) != len(y):
        raise ConfigError(f"{what}: X has {len(X)} rows but y has {len(y)}; give one target per sample")
    idx = torch.from_numpy(indices)
    xb, yb = X[idx], y[idx]
    if xb.is_floating_point():
        xb = xb.to(getattr(torch, dtype))
    yb = yb.to(getattr(torch, dtype)) if yb.is_floating_point() else yb.long()
    return TensorBlock(xb, yb, device)


def _make_block(obj: Any, indices: np.ndarray, cfg: TrainConfig, device: torch.device, what: str) -> Block:
    if _is_pair(obj):
        return _array_block(obj, indices, cfg.model.dtype, device, what)
    return DatasetBlock(obj, indices, cfg, device)


def _length(obj: Any, what: str) -> int:
    if _is_pair(obj):
        if len(obj[0]) != len(obj[1]):
            raise ConfigError(f"{what}: X has {len(obj[0])} rows but y has {len(obj[1])}; give one target per sample")
        return len(obj[0])
    if not _is_dataset(obj):
        raise ConfigError(f"{what} is a {type(obj).__name__}; pass a map-style torch Dataset, an (X, y) "
                          f"pair of arrays, or a data folder")
    try:
        return len(obj)
    except Exception as exc:
        raise ConfigError(f"{what}: len() raised {describe_error(exc)}; a map-style Dataset needs __len__") from None


def _sample(obj: Any, index: int, what: str) -> tuple[Any, Any]:
    """One (input, target) of the source, at an index this rank owns."""
    if _is_pair(obj):
        return obj[0][index], obj[1][index]
    try:
        item = obj[index]
    except Exception as exc:
        raise ConfigError(f"{what}[{index}] raised {describe_error(exc)}; fix the Dataset's __getitem__") from None
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        found = f"a {type(item).__name__} of {len(item)}" if isinstance(item, (tuple, list)) else type(item).__name__
        raise ConfigError(f"{what} index {index}: the item is {found}; a sample must be an (input, target) pair")
    return item[0], item[1]


def _shape_of(train: Any, x: Any, y: Any) -> DataShape:
    yt = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
    xt = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if yt.is_floating_point():
        return DataShape("regression", int(xt.numel()), int(max(1, yt.numel())))
    if _is_pair(train):
        labels = torch.as_tensor(np.asarray(train[1]))
        return DataShape("classification", int(xt.numel()), int(labels.max()) + 1)
    classes = getattr(train, "num_classes", None)
    if classes is None and hasattr(train, "classes"):
        classes = len(train.classes)
    return DataShape("classification", int(xt.numel()), int(classes) if classes else None)


Item = tuple[int, Any, Any]  # (index in the source, features, label)

_LABELS = "labels must be numbers (int class ids or float targets)"
_FEATURES = "features must be a tensor, a numpy array or a number"


def _first_items(obj: Any, indices: np.ndarray, what: str) -> list[Item]:
    """(index, features, label) of the given indices, each read the way training reads it."""
    if _is_pair(obj):
        for name, a in (("features X", obj[0]), ("labels y", obj[1])):
            if isinstance(a, np.ndarray) and a.dtype.kind not in "biuf":
                raise ConfigError(f"{what}: {name} is an array of dtype {a.dtype} (e.g. {a.flat[0]!r:.30}); "
                                  f"{_LABELS if name == 'labels y' else _FEATURES}: convert it, e.g. "
                                  f"{name[-1]}.astype(np.{'int64' if name == 'labels y' else 'float32'})")
    found = []
    for i in indices.tolist():
        x, y = _sample(obj, i, what)
        found.append((i, x, y))
    found[0] = _checked_types(found[0], what)
    return found


def _kind(value: Any) -> tuple[str, tuple[int, ...], str] | None:
    """(container, shape, 'int' or 'float') of numbers; None when `value` is not numbers."""
    if isinstance(value, torch.Tensor):
        return "Tensor", tuple(value.shape), "float" if value.is_floating_point() or value.is_complex() else "int"
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
        kind = np.asarray(value).dtype.kind
        if kind not in "biufc":
            return None
        container = "ndarray" if isinstance(value, np.ndarray) else "number"
        return container, tuple(np.shape(value)), "float" if kind in "fc" else "int"
    if isinstance(value, (bool, int, float)):
        return "number", (), "float" if isinstance(value, float) else "int"
    return None


def _show(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, (torch.Tensor, np.ndarray)) and np.prod(np.shape(value)) != 1:
        return f"{type(value).__name__} of shape {tuple(np.shape(value))}"
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        value = value.item()
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 30 else text[:27] + '...'}"


def _checked_types(item: Item, what: str) -> Item:
    """The item whose features and label are numbers, else a ConfigError naming the index."""
    i, x, y = item
    if _kind(x) is None:
        raise ConfigError(f"{what} index {i}: features are {_show(x)}; {_FEATURES} (e.g. torch.tensor(...))")
    if _kind(y) is None:
        raise ConfigError(f"{what} index {i}: label is {_show(y)}; {_LABELS}")
    return item


def _check_items(items: list[Item], shape: DataShape, obj: Any, what: str,
                 train: tuple[str, Item] | None = None) -> None:
    """Every item as the first one: numbers of the same type and shape, the same kind of label, a
    class id >= 0 and below the classes the training data has, no NaN/Inf, so that stacking them into
    a batch cannot fail. Eval items also match the training data's first item (`train`: its name and
    item) in features shape and kind of label."""
    i0, x0, y0 = items[0]
    kx0, ky0 = _kind(x0), _kind(y0)
    assert kx0 is not None and ky0 is not None
    declared = None if _is_pair(obj) else getattr(obj, "num_classes", None)
    if declared is None and not _is_pair(obj) and isinstance(getattr(obj, "classes", None), (list, tuple)):
        declared = len(obj.classes)
    if shape.task == "regression" and isinstance(declared, int) and declared > 0:
        raise ConfigError(f"{what} index {i0}: label is {_show(y0)} but the data declares num_classes "
                          f"{declared}; return int class ids (e.g. torch.tensor(1)) or drop num_classes")
    if train is not None:  # eval data: what the model was built for
        (name, (ti, tx, ty)), ktx, kty = train, _kind(train[1][1]), _kind(train[1][2])
        assert ktx is not None and kty is not None
        if kx0[1] != ktx[1]:
            raise ConfigError(f"{what} index {i0}: features of shape {kx0[1]} but {name} index {ti} had "
                              f"{ktx[1]}; give the eval data the training data's shape")
        if ky0[2] != kty[2]:
            raise ConfigError(f"{what} index {i0}: label is {_show(y0)} but {name} index {ti} had {_show(ty)}; "
                              f"give the eval data the training data's kind of label")
    ref = f"index {i0}"
    for i, x, y in items:
        _checked_types((i, x, y), what)
        kx, ky = _kind(x), _kind(y)
        assert kx is not None and ky is not None
        if kx[:2] != kx0[:2]:
            raise ConfigError(f"{what} index {i}: features are {kx[0]} of shape {kx[1]} but {ref} had "
                              f"{kx0[0]} of shape {kx0[1]}; return the same type and shape from every item")
        if ky[:2] != ky0[:2]:
            raise ConfigError(f"{what} index {i}: label is {_show(y)} but {ref} had {_show(y0)}; return "
                              f"the same type and shape of label from every item")
        if ky[2] != ky0[2]:
            task = "classification: int class ids" if ky0[2] == "int" else "regression: float targets"
            raise ConfigError(f"{what} index {i}: label is {_show(y)} but {ref} had {_show(y0)} "
                              f"({task}); give every item the same kind of label")
        xt = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        if (xt.is_floating_point() or xt.is_complex()) and not bool(torch.isfinite(xt).all()):
            bad = "NaN" if bool(torch.isnan(xt).any()) else "Inf"
            raise ConfigError(f"{what} index {i}: features hold {bad}; clean the data (drop or impute those "
                              f"values) before training")
        yt = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
        if yt.is_floating_point() and not bool(torch.isfinite(yt).all()):
            raise ConfigError(f"{what} index {i}: label is {_show(y)}; a target must be a finite number")
        if shape.task == "classification" and yt.numel() and not yt.dtype == torch.bool:
            low, high = int(yt.min()), int(yt.max())
            if low < 0:
                raise ConfigError(f"{what} index {i}: class label {low} is negative; class ids are 0, 1, ...")
            if shape.n_outputs is not None and high >= shape.n_outputs:
                raise ConfigError(f"{what} index {i}: class label {high}, but the training data has "
                                  f"{shape.n_outputs} classes (ids 0 to {shape.n_outputs - 1}); fix the label or "
                                  f"the data's num_classes")


def _open_objects(cfg: TrainConfig, train: Any, evald: Any, source: str, comm: Comm,
                  device: torch.device) -> RankData:
    rank, size = comm.rank, comm.size
    n = _length(train, f"training data {source}")
    mine = D.partition(n, rank, size, cfg.data.partition, cfg.seed)
    # hvdtrain: the items of this rank's first batch, checked one by one before anything is built
    items = _first_items(train, mine[:cfg.batch_size], f"training data {source}")
    x, y = items[0][1], items[0][2]
    shape = _shape_of(train, x, y)
    _check_items(items, shape, train, f"training data {source}")
    block = _make_block(train, mine, cfg, device, f"training data {source}")
    eval_block, n_eval = None, 0
    if evald is not None:
        n_eval = _length(evald, "eval data")
        lo, hi = D.block_bounds(n_eval, rank, size)
        if hi > lo:
            mine_eval = np.arange(lo, hi, dtype=np.int64)
            _check_items(_first_items(evald, mine_eval[:cfg.batch_size], "eval data"), shape, evald, "eval data",
                         train=(f"training data {source}", items[0]))
            eval_block = _make_block(evald, mine_eval, cfg, device, "eval data")
    sample = tuple(torch.as_tensor(np.asarray(x)).shape) if not isinstance(x, torch.Tensor) else tuple(x.shape)
    return RankData(block, eval_block, shape, D.block_sizes(n, size), source,
                    {"task": shape.task, "train_rows": n, "eval_rows": n_eval, "sample_shape": sample,
                     "outputs": shape.n_outputs})
