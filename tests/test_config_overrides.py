"""``--config.<...>overrides.<field>`` arguments reach fields a preset does not list."""

import sys

import ml_collections as mlc
import pytest

from jaxunified import config_overrides
from jaxunified.train.ar import ARTask
from jaxunified.train.runs import load_config


def test_split_takes_out_only_overrides_fields_in_both_spellings():
    argv = ["train.py", "--config", "configs/ar.py:tiny", "--config.model.overrides.dtype=bfloat16",
            "--config.optim.lr=0.1", "--config.base.lm_overrides.remat", "full", "--workdir=w",
            "--config.model.overrides.dim=48"]
    kept, pending = config_overrides.split(argv)
    assert kept == ["train.py", "--config", "configs/ar.py:tiny", "--config.optim.lr=0.1", "--workdir=w"]
    assert pending == [("model.overrides", "dtype", "bfloat16"), ("base.lm_overrides", "remat", "full"),
                       ("model.overrides", "dim", "48")]
    # a bare field is True (ml-collections' boolean flags); nothing after "--" is taken
    kept, pending = config_overrides.split(["t", "--config.model.overrides.scan_layers", "--workdir=w", "--",
                                            "--config.model.overrides.dim=1"])
    assert kept == ["t", "--workdir=w", "--", "--config.model.overrides.dim=1"]
    assert pending == [("model.overrides", "scan_layers", None)]


def test_apply_sets_new_and_listed_fields_as_python_literals():
    c = load_config("configs/ar.py:tiny")
    c.lock()
    _, pending = config_overrides.split(["--config.model.overrides.dtype=bfloat16", "--config.model.overrides.dim=48",
                                         "--config.model.overrides.cond_rope=identity",
                                         "--config.model.overrides.caption_layers=1"])
    config_overrides.apply(c, pending)
    assert c.model.overrides.dtype == "bfloat16" and c.model.overrides.dim == 48
    assert c.model.overrides.cond_rope == "identity" and c.model.overrides.caption_layers == 1
    assert ARTask.model_config(c).dtype == "bfloat16"  # the model reads them
    with pytest.raises(KeyError):
        c.model.overrides["other"] = 1  # still locked afterwards
    assert config_overrides.parse_value("(1, 2)") == (1, 2) and config_overrides.parse_value("True") is True
    assert config_overrides.parse_value("false") is False and config_overrides.parse_value(None) is True
    # a field the preset sets to text keeps the text; a wrong type for a listed field names the argument
    config_overrides.apply(c, [("model.overrides", "cond_rope", "1")])
    assert c.model.overrides.cond_rope == "1"
    with pytest.raises(ValueError, match="--config.model.overrides.dim=wide"):
        config_overrides.apply(c, [("model.overrides", "dim", "wide")])
    with pytest.raises(ValueError, match="no 'modle.overrides' block"):
        config_overrides.apply(c, [("modle.overrides", "dim", "1")])


def test_nested_fields_make_their_blocks():
    c = mlc.ConfigDict({"model": {"overrides": {}}})
    config_overrides.apply(c, [("model.overrides", "rope.theta", "1e4")])
    assert c.model.overrides.rope.theta == 1e4


def test_entry_points_take_them_from_argv_and_report_bad_ones_as_usage_errors(monkeypatch):
    from absl import app

    monkeypatch.setattr("sys.argv", ["train.py", "--config.model.overrides.dim=wide", "--workdir=w"])
    config_overrides.take_from_argv()
    assert sys.argv == ["train.py", "--workdir=w"]
    with pytest.raises(app.UsageError, match="bad --config override: --config.model.overrides.dim=wide"):
        config_overrides.apply_taken(load_config("configs/ar.py:tiny"))
    monkeypatch.setattr("sys.argv", ["train.py"])
    config_overrides.take_from_argv()  # nothing taken: the config is left as it is
    assert config_overrides.apply_taken(load_config("configs/ar.py:tiny")).model.overrides.dim == 32
