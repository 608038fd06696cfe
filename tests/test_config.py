from __future__ import annotations

import pytest

from hvdtrain.config import ConfigError, load_config


def test_defaults_file_and_overrides_merge(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('epochs = 4\nbatch_size = 16\n[sync]\nbackend = "mpi"\nsync_every = 8\n')
    cfg = load_config(str(path), {"sync": {"sync_every": 2}, "epochs": 5})
    assert (cfg.epochs, cfg.batch_size, cfg.sync.backend, cfg.sync.sync_every) == (5, 16, "mpi", 2)
    assert cfg.optim.lr == 0.01  # default kept


@pytest.mark.parametrize("overrides,match", [
    ({"optim": {"lr": 0.0}}, "lr must be > 0"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"sync": {"sync_every": 0}}, "sync_every must be an integer >= 1"),
    ({"sync": {"alpha": 1.5}}, r"alpha must be in \(0, 1\]"),
    ({"sync": {"weights": (0.5, 0.6)}}, "weights must sum to 1"),
    ({"sync": {"weights": (-0.5, 1.5)}}, "weights must be >= 0"),
    ({"sync": {"backend": "nccl"}}, "backend 'nccl' is unknown"),
    ({"model": {"name": "resnet"}}, "model 'resnet' is unknown"),
    ({"optim": {"name": "lbfgs"}}, "optimizer 'lbfgs' is unknown"),
    ({"bogus": 1}, "unknown config key bogus"),
    ({"sync": {"bogus": 1}}, "unknown config key sync.bogus"),
])
def test_invalid_values_name_the_value_and_fix(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_malformed_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("epochs = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(path))
