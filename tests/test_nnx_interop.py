"""The Linen modules drop into Flax NNX code through the official bridge (DESIGN: Linen inside, NNX-friendly)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import bridge

from jaxunified.models import vqgan


def test_vqgan_wrapped_by_to_nnx_matches_linen_apply():
    cfg = vqgan.get_config("shapes-S", ch=32, ch_mult=(1, 2), z_channels=16, codebook_size=32,
                            update="grad", restart=False)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    # Logical axis names are metadata here; NNX's eager sharding would need a mesh to place them.
    with nnx.use_eager_sharding(False):
        model = bridge.ToNNX(vqgan.VQGAN(cfg), rngs=nnx.Rngs(0))
        bridge.lazy_init(model, x)
        out = model(x)
    variables = {"params": nnx.state(model, nnx.Param).to_pure_dict()}
    variables = jax.tree.map(lambda v: v.value if hasattr(v, "value") else v, variables)
    ref = vqgan.VQGAN(cfg).apply(nn_unbox(variables), x)
    np.testing.assert_allclose(out["recon"], ref["recon"], atol=1e-6)
    np.testing.assert_array_equal(out["codes"], ref["codes"])


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)
