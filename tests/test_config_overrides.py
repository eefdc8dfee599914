"""``--config.<...>overrides.<field>`` arguments reach fields a preset does not list."""

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
    with pytest.raises(ValueError, match="has no value"):
        config_overrides.split(["train.py", "--config.model.overrides.dim"])


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
    with pytest.raises(ValueError, match="no 'modle.overrides' block"):
        config_overrides.apply(c, [("modle.overrides", "dim", "1")])


def test_nested_fields_make_their_blocks():
    c = mlc.ConfigDict({"text_encoder": {"overrides": {}}})
    config_overrides.apply(c, [("text_encoder.overrides", "vision.width", "32")])
    assert c.text_encoder.overrides.vision.width == 32
