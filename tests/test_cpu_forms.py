"""The CPU-fast formulations (nn.sums, GroupNorm's written-out backward, the stride-2 conv's input
gradient, the Conv layer) give autodiff's plain results: values and gradients to 1e-5."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunified.nn import conv as conv_lib
from jaxunified.nn import sums
from jaxunified.nn.strided_conv import conv3x3_s2_valid


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape
        np.testing.assert_array_less(np.abs(x - y).max(), tol * max(np.abs(y).max(), 1e-30) + 1e-30)


def _plain_group_norm(x, scale, bias, groups, eps):
    """The textbook two-pass GroupNorm, differentiated by autodiff."""
    c = x.shape[-1]
    xf = x.reshape(*x.shape[:-1], groups, c // groups)
    axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
    mean = xf.mean(axis=axes, keepdims=True)
    var = jnp.square(xf - mean).mean(axis=axes, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 16), 4), ((3, 7, 32), 8), ((1, 4, 4, 8), 8)])
def test_group_norm_matches_autodiff_of_the_plain_form(platform, shape, groups):
    k = jax.random.split(jax.random.key(0), 4)
    x = 3.0 * jax.random.normal(k[0], shape) + 1.5
    scale = 1 + 0.3 * jax.random.normal(k[1], shape[-1:])
    bias = 0.2 * jax.random.normal(k[2], shape[-1:])
    w = jax.random.normal(k[3], shape)

    def loss(fn):
        return lambda x, s, b: jnp.sum(jnp.tanh(fn(x, s, b)) * w)

    new = lambda x, s, b: conv_lib.group_norm(x, s, b, groups, 1e-6, jnp.float32)  # noqa: E731
    old = lambda x, s, b: _plain_group_norm(x, s, b, groups, 1e-6)  # noqa: E731
    with sums.targeting(platform):
        y, g = jax.jit(new)(x, scale, bias), jax.jit(jax.grad(loss(new), argnums=(0, 1, 2)))(x, scale, bias)
    _close(y, old(x, scale, bias))
    _close(g, jax.grad(loss(old), argnums=(0, 1, 2))(x, scale, bias))


def test_group_norm_keeps_input_and_output_dtypes():
    x = jnp.ones((2, 4, 4, 8), jnp.bfloat16)
    one, zero = jnp.ones(8), jnp.zeros(8)
    assert conv_lib.group_norm(x, one, zero, 4, 1e-6, jnp.bfloat16).dtype == jnp.bfloat16
    dx = jax.grad(lambda x: conv_lib.group_norm(x, one, zero, 4, 1e-6, jnp.float32).sum())(x)
    assert dx.dtype == jnp.bfloat16


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_sums_and_bias_gradient(platform):
    x = jax.random.normal(jax.random.key(1), (3, 5, 7, 6)) + 0.5
    with sums.targeting(platform):
        _close(jax.jit(sums.row_sums)(x), x.sum((0, 1, 2)))
        _close(jax.jit(sums.sample_sums)(x), x.sum((1, 2)))
        bias = jnp.arange(12.0).reshape(2, 6)  # a DenseGeneral-style multi-axis bias
        y = x[..., :4, :].reshape(3, 5, 2, 2, 6)[:, :, 0]  # [3, 5, 2, 6]
        got = jax.grad(lambda y, b: jnp.sum(jnp.sin(sums.add_bias(y, b))), argnums=(0, 1))(y, bias)
    _close(got, jax.grad(lambda y, b: jnp.sum(jnp.sin(y + b)), argnums=(0, 1))(y, bias))


@pytest.mark.parametrize("hw", [(9, 9), (10, 13), (5, 6)])
def test_stride2_conv_input_gradient_matches_autodiff(hw):
    k = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(k[0], (2, *hw, 3))
    w = 0.3 * jax.random.normal(k[1], (3, 3, 3, 5))
    plain = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), "VALID",  # noqa: E731
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = plain(x, w)
    dy = jax.random.normal(k[2], y.shape)
    _close(conv3x3_s2_valid(x, w), y)
    _close(jax.grad(lambda x, w: jnp.sum(conv3x3_s2_valid(x, w) * dy), argnums=(0, 1))(x, w),
           jax.grad(lambda x, w: jnp.sum(plain(x, w) * dy), argnums=(0, 1))(x, w))


@pytest.mark.parametrize("stride,padding", [(1, ((1, 1), (1, 1))), (2, "VALID"), (1, "SAME")])
def test_conv_layer_is_flax_conv(stride, padding):
    """Same parameter tree and initial values as flax's nn.Conv, same outputs and gradients."""
    x = jax.random.normal(jax.random.key(3), (2, 9, 9, 4))
    ours = conv_lib.Conv(6, (3, 3), strides=(stride, stride), padding=padding)
    theirs = nn.Conv(6, (3, 3), strides=(stride, stride), padding=padding,
                     kernel_init=conv_lib.torch_default_init)
    v = ours.init(jax.random.key(4), x)
    v_theirs = theirs.init(jax.random.key(4), x)
    assert jax.tree.structure(v) == jax.tree.structure(v_theirs)
    _close(v, v_theirs, tol=0)
    v = jax.tree.map(lambda p: p + 0.1, v)  # a non-zero bias
    _close(ours.apply(v, x), theirs.apply(v, x))
    with sums.targeting("cpu"):
        g = jax.grad(lambda v, x: jnp.sum(jnp.sin(ours.apply(v, x))), argnums=(0, 1))(v, x)
    _close(g, jax.grad(lambda v, x: jnp.sum(jnp.sin(theirs.apply(v, x))), argnums=(0, 1))(v, x))
