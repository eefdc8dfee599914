"""What the tests share: the tiny preset of a config family, dotted-path overrides, one train step,
and the one directory test datasets are built in."""

import os
import pathlib

import jax

from jaxunified.data.pipeline import to_global
from jaxunified.train import loop as looplib
from jaxunified.train.runs import load_config

TEST_DATA_DIR = str(pathlib.Path(os.environ.get("PYTEST_DATA_DIR", "/tmp/jaxunified_test_data")))


def override(config, **dotted):
    """Sets ``{"optim.lr": 0.1, ...}``-style fields on a ConfigDict in place (new ones too) and returns it."""
    with config.unlocked():
        for key, value in dotted.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def tiny_config(family: str, **dotted):
    """``configs/<family>.py:tiny`` reading its data from ``TEST_DATA_DIR``, with ``dotted`` overrides;
    locked, so a misspelt field set later is an error."""
    c = load_config(f"configs/{family}.py:tiny")
    c.data.data_dir = TEST_DATA_DIR
    override(c, **dotted).lock()
    return c


def one_step(config, devices, batch_np):
    """One train step of ``config`` over ``devices`` from its initial state: host (params, collections, metrics)."""
    trainer = looplib.Trainer(config, "/tmp/unused", devices=devices)
    state = trainer.init_state()
    batch = to_global(batch_np, trainer.mesh)
    step = trainer.make_step(batch)
    with jax.set_mesh(trainer.mesh):
        new, metrics = step(state, batch)
    return jax.device_get(new.params), jax.device_get(new.collections), jax.device_get(metrics)
