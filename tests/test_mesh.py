import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxunified.parallel import mesh as meshlib


def test_make_mesh_fills_minus_one_and_is_auto():
    m = meshlib.make_mesh((2, -1, 1))
    assert dict(m.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)


def test_make_mesh_bad_shape_is_clear():
    with pytest.raises(ValueError, match="needs 6 devices but 8"):
        meshlib.make_mesh((2, 3, 1))


def test_logical_rules_replicate_indivisible_dims():
    m = meshlib.make_mesh((1, 8, 1))
    rules = meshlib.DEFAULT_RULES
    assert meshlib.logical_to_spec((None, None, "conv_in", "conv_out"), (3, 3, 64, 128), m, rules) == P(None, None, None, "fsdp")
    # RGB output conv: 3 channels cannot split 8 ways, so it stays replicated rather than failing.
    assert meshlib.logical_to_spec((None, None, "conv_in", "conv_out"), (3, 3, 64, 3), m, rules) == P(None, None, None, None)
    # Size-1 mesh axes are dropped from a spec: on (1, 8, 1) the batch goes over 'fsdp' alone ...
    assert meshlib.logical_to_spec(("batch", None), (16, 4), m, rules) == P("fsdp", None)
    # ... and over both data-parallel axes once 'data' has devices.
    m2 = meshlib.make_mesh((2, 4, 1))
    assert meshlib.logical_to_spec(("batch", None), (16, 4), m2, rules) == P(("data", "fsdp"), None)


def test_sharded_init_places_params_by_rules():
    class Toy(nn.Module):
        @nn.compact
        def __call__(self, x):
            k = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")), (16, 32))
            return x @ k

    m = meshlib.make_mesh((1, 8, 1))
    variables, shardings = meshlib.sharded_init(lambda k: Toy().init(k, jnp.ones((2, 16))), m, meshlib.DEFAULT_RULES,
                                                jax.random.PRNGKey(0))
    kernel = variables["params"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (2, 32)
