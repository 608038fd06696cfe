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


def test_every_setting_is_defined_once_with_a_flag_a_keyword_and_a_docstring():
    import dataclasses

    from hvdtrain.cli import build_parser
    from hvdtrain.config import SECTIONS, SETTINGS, TrainConfig
    fields = [(None, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS]
    fields += [(sec, f.name) for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    assert sorted(fields, key=str) == sorted(((s.section, s.key) for s in SETTINGS), key=str)
    assert len({s.flag for s in SETTINGS}) == len(SETTINGS) and len({s.kwarg for s in SETTINGS}) == len(SETTINGS)
    assert all(len(s.help) > 10 for s in SETTINGS), [s.flag for s in SETTINGS if len(s.help) <= 10]
    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert all(s.flag in train_help for s in SETTINGS)


def test_fit_keywords_map_to_the_toml_shape_and_name_the_nearest_key():
    from hvdtrain.config import overrides_from_kwargs
    assert overrides_from_kwargs({"sync_every": 4, "epochs": 2, "optimizer_args": {"eps": 1e-6}}) == {
        "sync": {"sync_every": 4}, "epochs": 2, "optim": {"args": {"eps": 1e-6}}}
    with pytest.raises(ConfigError, match="unknown setting 'batchsize' \\(did you mean 'batch_size'\\?\\)"):
        overrides_from_kwargs({"batchsize": 3})


def test_toml_model_args_table(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nname = "mypkg.nets:Net"\n[model.args]\nwidth = 8\n')
    cfg = load_config(str(path))
    assert (cfg.model.name, cfg.model.args) == ("mypkg.nets:Net", {"width": 8})
    path.write_text('[model]\nargs = 3\n')
    with pytest.raises(ConfigError, match="model.args must be a table"):
        load_config(str(path))
