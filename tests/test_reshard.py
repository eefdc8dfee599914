"""A checkpoint written on one mesh restores on another — 8 → 4 → 1 devices, other partitioning
rules — for every task: restore targets carry the new run's shardings (train/checkpoint.py)."""

import jax
import numpy as np
import pytest

from jaxunified.parallel import mesh as meshlib
from jaxunified.train.checkpoint import Checkpointer
from jaxunified.train.loop import Trainer
from tests import helpers

FAMILIES = ("vqgan", "siglip", "toklip", "dualtoken", "ar", "mllm", "star")

# data parallel only: every weight replicated, the batch still split
DATA_ONLY = [[name, None if not name.startswith("activation_") and name != "batch" else axes]
             for name, axes in meshlib.DEFAULT_RULES]


def _trainer(family, tmp, n, mesh_shape, rules=None):
    cfg = helpers.tiny_config(family, mesh_shape=mesh_shape, logical_rules=rules)
    return Trainer(cfg, tmp, devices=jax.devices()[:n])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_restores_on_other_meshes_and_rules(family, tmp_path):
    src = _trainer(family, tmp_path / "src", 8, (1, -1, 1))
    state = src.init_state()
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(0, state)
    ckpt.wait()
    want = jax.device_get(state)
    sharded = [x for x in jax.tree.leaves(state) if len(x.sharding.device_set) == 8 and not x.is_fully_replicated]
    assert sharded, "the 8-device state shards something over fsdp"
    for n, shape, rules in ((4, (2, 2, 1), DATA_ONLY), (1, (1, 1, 1), None)):
        dst = _trainer(family, tmp_path / f"dst{n}", n, shape, rules)
        got = ckpt.restore(dst.layout.target)
        for leaf, sharding in zip(jax.tree.leaves(got), jax.tree.leaves(dst.state_shardings)):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
            assert len(leaf.sharding.device_set) == n
        if rules is DATA_ONLY:  # weights replicated under the data-only table
            assert all(x.is_fully_replicated for x in jax.tree.leaves(got.params))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     jax.device_get(got), want)
    ckpt.close()
