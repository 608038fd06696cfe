"""Partitioning, weights and block reading: pure logic, no MPI."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from hvdtrain import data as D
from hvdtrain.config import ConfigError

PAIRS = [(n, size) for n in (1, 2, 3, 7, 10, 64, 101, 1000) for size in (1, 2, 3, 4, 7, 8) if n >= size]


@pytest.mark.parametrize("scheme", ["block", "random"])
@pytest.mark.parametrize("n,size", PAIRS)
def test_partition_covers_every_index_once(n, size, scheme):
    parts = [D.partition(n, r, size, scheme, seed=5) for r in range(size)]
    together = np.concatenate(parts)
    assert sorted(together.tolist()) == list(range(n))
    lengths = [len(p) for p in parts]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == D.block_sizes(n, size)
    if scheme == "block":
        assert all(np.array_equal(p, np.arange(p[0], p[0] + len(p))) for p in parts if len(p))


def test_random_partition_is_deterministic_and_seeded():
    a = [D.partition(100, r, 3, "random", seed=1) for r in range(3)]
    b = [D.partition(100, r, 3, "random", seed=1) for r in range(3)]
    c = [D.partition(100, r, 3, "random", seed=2) for r in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not np.array_equal(a[0], D.partition(100, 0, 3, "block"))


def test_fewer_samples_than_ranks_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"3 samples but 4 ranks.*-np <= 3"):
        D.partition(3, 0, 4)


def test_weights_default_to_block_sizes_and_check_length():
    assert D.averaging_weights([3, 1]) == [0.75, 0.25]
    assert D.averaging_weights([3, 1], (0.5, 0.5)) == [0.5, 0.5]
    with pytest.raises(ConfigError, match="3 values but 2 ranks"):
        D.averaging_weights([3, 1], (0.2, 0.3, 0.5))


def test_steps_per_epoch_uses_smallest_block():
    assert D.steps_per_epoch([11, 10], 5) == 2
    with pytest.raises(ConfigError, match="batch size 20"):
        D.steps_per_epoch([11, 10], 20)


def test_epoch_order_depends_on_epoch_and_rank():
    base = D.epoch_order(50, 0, 0, 1)
    assert sorted(base.tolist()) == list(range(50))
    assert np.array_equal(base, D.epoch_order(50, 0, 0, 1))
    assert not np.array_equal(base, D.epoch_order(50, 1, 0, 1))
    assert not np.array_equal(base, D.epoch_order(50, 0, 1, 1))


def test_regression_set_is_deterministic_and_chunk_independent(tmp_path):
    a = D.make_dataset("regression", tmp_path / "a", rows=70_000, seed=4)
    b = D.make_dataset("regression", tmp_path / "b", rows=1_000, seed=4)
    Xa, Xb = np.load(a / "X.npy"), np.load(b / "X.npy")
    assert Xa.shape == (70_000, 10) and np.array_equal(Xa[:1000], Xb)
    info = D.describe(a)
    assert (info.task, info.n_features, info.n_outputs, info.n_eval) == ("regression", 10, 1, 7000)
    ya = np.load(a / "y.npy")
    # the documented function, y = x.w + 0.5 sin(x.v) + 0.1 noise: what is left after the signal is
    # the noise (std 0.1; 63000 rows estimate it to ~3e-4), and the signal is far larger than that
    w, v = D._regression_coefficients(4)
    x = Xa.astype(np.float64)
    noise = ya - (x @ w + 0.5 * np.sin(x @ v))
    assert abs(noise.mean()) < 0.005 and abs(noise.std() - 0.1) < 0.005, (noise.mean(), noise.std())
    assert ya.std() > 10 * noise.std()


def test_digits_set_is_real_and_split(tmp_path):
    folder = D.make_dataset("digits", tmp_path / "d", seed=0)
    info = D.describe(folder)
    assert info.task == "classification" and info.n_outputs == 10 and info.n_features == 64
    assert info.n_train + info.n_eval == 1797
    y = np.load(folder / "y.npy")
    assert set(np.unique(y).tolist()) == set(range(10))
    assert json.loads((folder / "meta.json").read_text())["n_classes"] == 10


def test_rank_reads_only_its_block(tmp_path):
    """Reading a block costs memory for the block, not the file (the map is sliced, not loaded)."""
    folder = D.make_dataset("regression", tmp_path / "big", rows=400_000, seed=0)
    file_bytes = (folder / "X.npy").stat().st_size
    idx = D.partition(400_000, 3, 8)
    tracemalloc.start()
    X, y = D.load_block(folder, idx)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert X.shape == (len(idx), 10)
    np.testing.assert_array_equal(X, np.load(folder / "X.npy", mmap_mode="r")[idx[0]:idx[-1] + 1])
    assert peak < 0.25 * file_bytes, f"peak {peak} bytes for a {file_bytes}-byte file"
    # the random scheme reads scattered rows, still only its own
    idx_r = D.partition(400_000, 3, 8, "random", seed=1)
    Xr, _ = D.load_block(folder, idx_r)
    np.testing.assert_array_equal(Xr, np.load(folder / "X.npy", mmap_mode="r")[idx_r])


def test_bad_data_files_give_clear_errors(tmp_path):
    folder = D.make_dataset("regression", tmp_path / "r", rows=100)
    np.save(folder / "y.npy", np.zeros(99, np.float32))
    with pytest.raises(ConfigError, match="X has 100 rows but y has shape"):
        D.describe(folder)
    (folder / "X.npy").write_bytes(b"not a numpy file")
    with pytest.raises(ConfigError, match="unreadable"):
        D.describe(folder)
    with pytest.raises(ConfigError, match="neither a folder nor a built-in"):
        D.describe(tmp_path / "missing")


@pytest.mark.parametrize("chunk", [64, 1000, 1 << 22])
@pytest.mark.parametrize("kind", ["block", "random", "empty", "last"])
def test_read_rows_matches_numpy_indexing(tmp_path, monkeypatch, chunk, kind):
    monkeypatch.setattr(D, "_READ_CHUNK", chunk)
    a = np.random.default_rng(0).normal(size=(3001, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    idx = {"block": np.arange(17, 2900), "random": np.sort(np.random.default_rng(1).choice(3001, 400, replace=False)),
           "empty": np.arange(0), "last": np.array([3000])}[kind]
    got = D.read_rows(tmp_path / "a.npy", idx, "float64")
    assert got.dtype == np.float64 and np.array_equal(got, np.load(tmp_path / "a.npy")[idx].astype(np.float64))
