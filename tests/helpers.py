"""What the tests share: the tiny preset of a config family, dotted-path overrides, one train step,
fake checkpoints for the converters, and the one directory test datasets are built in."""
import os
import pathlib

import jax
import numpy as np

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


def tiny_task(task_cls, config):
    """A task of ``config`` on all devices and its initial (params, collections), unboxed."""
    import flax.linen as nn

    from jaxunified.parallel import mesh as meshlib

    t = task_cls(config, meshlib.make_mesh((1, -1, 1)))
    batch = t.dummy_batch()
    params, colls = jax.jit(lambda k: t.init_variables(k, batch))(jax.random.key(0))
    return t, nn.meta.unbox(params), nn.meta.unbox(colls)


def untrained_run(family: str, workdir, **dotted) -> pathlib.Path:
    """A run directory of ``family``'s tiny preset holding its initial state as the step-0 checkpoint:
    what a downstream task's ``workdir`` source reads, without compiling the upstream train step."""
    from jaxunified.train.checkpoint import Checkpointer
    from jaxunified.train.runs import save_config

    config = tiny_config(family, **dotted)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(config, workdir)
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        ckpt.save(0, looplib.Trainer(config, workdir).init_state(), force=True)
    finally:
        ckpt.close()
    return workdir


def one_step(config, devices, batch_np):
    """One train step of ``config`` over ``devices`` from its initial state: host (params, collections, metrics)."""
    trainer = looplib.Trainer(config, "/tmp/unused", devices=devices)
    state = trainer.init_state()
    batch = to_global(batch_np, trainer.mesh)
    step = trainer.make_step(batch)
    with jax.set_mesh(trainer.mesh):
        new, metrics = step(state, batch)
    return jax.device_get(new.params), jax.device_get(new.collections), jax.device_get(metrics)


_NORM_WEIGHTS = ("norm1.weight", "norm2.weight", "norm.weight", "ln_1.weight", "ln_2.weight", "ln_final.weight",
                 "norm_out.weight")


def fake_state_dict(shapes, seed=0):
    """A PyTorch-style state dict with the given ``{key: shape}``, for converter tests.

    ``seed=None``: zeros that occupy no memory (zero-stride views), for checks of keys and shapes
    at released sizes. Otherwise random values of a trained network's scale: norm weights near 1,
    matrices scaled by fan-in, vectors small, ``logit_scale`` = ln 10."""
    if seed is None:
        zero = np.zeros((), np.float32)
        return {k: np.broadcast_to(zero, s) for k, s in shapes.items()}
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        if k.endswith(_NORM_WEIGHTS):
            x = 1.0 + 0.1 * x
        elif len(shape) >= 2:
            x = x / np.sqrt(np.prod(shape[1:]))
        else:
            x = 0.1 * x
        out[k] = x.astype(np.float32)
    if "logit_scale" in out:
        out["logit_scale"] = np.asarray(np.log(10.0), np.float32)
    return out
