"""Task ``siglip``: per-device (shard_map, ring/all-gather losses) step == single-device step, a tiny run
trains and evaluates, and a finished run loads back as a frozen model."""


import chex
import jax
import numpy as np
import pytest

from jaxunified.data.pipeline import build_dataset
from jaxunified.train import loop as looplib
from jaxunified.train.runs import load_run
from tests import helpers
from tests.helpers import one_step


def tiny_config(**kw):
    return helpers.tiny_config("siglip", **kw)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("form,negatives", [("global", 0), ("per_device", 0), ("per_device", 2)])
def test_sharded_step_equals_single_device(form, negatives, kind):
    sgd = {"optim.name": "sgd", "optim.lr": 0.5, "loss.kind": kind, "data.text.hard_negatives": negatives}
    config = tiny_config(step_form=form, **sgd)
    one = looplib.Trainer(config, "/tmp/unused", devices=jax.devices()[:1])
    batch = next(iter(build_dataset(config.data, "train", one.mesh)))
    batch = {k: batch[k] for k in ("image", "tokens", "neg_tokens") if k in batch}
    assert ("neg_tokens" in batch) == bool(negatives)
    ref = one_step(tiny_config(step_form="global", **sgd), jax.devices()[:1], batch)
    got = one_step(config, jax.devices(), batch)
    assert len(jax.devices()) == 8
    chex.assert_trees_all_close(got[2]["loss"], ref[2]["loss"], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(got[0], ref[0], atol=2e-5, rtol=2e-4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("siglip_tiny")
    config = tiny_config(total_steps=6, **{"optim.lr": 3e-3})
    looplib.Trainer(config, workdir).run()
    return config, workdir


def test_tiny_run_learns_and_evaluates(tiny_run):
    import json

    _, workdir = tiny_run
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    ev = [x for x in lines if x["split"] == "eval"][-1]
    for k in ("zs_color_top1", "zs_shape_top1", "zs_count_top1", "zs_shape_ensemble_top1", "t2i_r1", "i2t_r5"):
        assert 0.0 <= ev[k] <= 1.0, k


def test_finished_run_loads_back(tiny_run):
    config, workdir = tiny_run
    _, model_a, vars_a = load_run(workdir, config)
    run_cfg, model_b, vars_b = load_run(workdir)  # from the config.json the run wrote
    assert run_cfg.task == "siglip"
    assert model_a.cfg == model_b.cfg
    chex.assert_trees_all_equal(vars_a, vars_b)
    assert np.asarray(vars_a["params"]["logit_bias"]).shape == ()


def test_tokenizer_longer_than_text_tower_is_an_error():
    from jaxunified.train.siglip import SigLIPTask

    config = tiny_config(**{"data.text.max_len": 80})
    with pytest.raises(ValueError, match="max_len"):
        SigLIPTask(config, None)
