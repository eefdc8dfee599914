"""Taming/LlamaGen VQGAN building blocks, NHWC: GroupNorm, ResnetBlock, AttnBlock, Down/Upsample;
and a raster-causal conv (TokLIP's optional code stem).

Numerics follow the PyTorch reference: GroupNorm(32, eps 1e-6) with two-pass float32 statistics,
swish, attention softmax in float32, Downsample = pad (0, 1, 0, 1) then a VALID stride-2 3×3 conv,
Upsample = nearest ×2 then a 3×3 conv. Weight init matches PyTorch's default conv init
(kaiming-uniform with a=√5, i.e. U(±1/√fan_in)) so from-scratch training sees the same scale.

Every 2-D conv output and block output is an ``activation_batch/height/width/channels`` feature map
(``jaxunified.nn.sharding``): on a mesh it stays split over the batch, so the partitioner all-gathers
the FSDP-sharded kernels rather than whole feature maps; without a mesh the constraint is nothing.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxunified.nn.dense import DENSE_KERNEL_AXES, dense
from jaxunified.nn.sharding import FEATURE_MAP_AXES, HEAD_AXES, constrain
from jaxunified.nn.strided_conv import conv3x3_s2_valid
from jaxunified.nn.sums import add_bias, sample_sums, target_platform

Dtype = Any

CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")

torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class Conv(nn.Module):
    """An NHWC 2-D conv with flax ``nn.Conv``'s parameters (``kernel`` [kh, kw, in, out], ``bias``) and
    numerics, whose bias gradient is a :func:`~jaxunified.nn.sums.row_sums` (XLA:CPU's plain
    reduction for it was slower than the conv's own weight gradient at 256²) and, on CPU, whose
    stride-2 3×3 VALID form takes its input gradient from :mod:`~jaxunified.nn.strided_conv`."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "SAME"
    mask: jax.Array | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = torch_default_init
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kshape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kshape, self.param_dtype)
        if self.mask is not None:
            kernel = kernel * self.mask
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if (tuple(self.strides), tuple(self.kernel_size), self.padding) == ((2, 2), (3, 3), "VALID") \
                and target_platform() == "cpu":
            y = conv3x3_s2_valid(x, kernel)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, self.strides, self.padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return feature_map(add_bias(y, bias.astype(self.dtype)))


def feature_map(x: jax.Array) -> jax.Array:
    """An NHWC activation constrained to its feature-map sharding (batch-split on a mesh; else ``x``)."""
    return constrain(x, FEATURE_MAP_AXES) if x.ndim == 4 else x


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    padding: Any = None,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> Conv:
    """A square conv with PyTorch's ``padding=k//2`` default and logical axis names."""
    if padding is None:
        padding = ((kernel_size // 2,) * 2,) * 2
    return Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(torch_default_init, CONV_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def group_count(channels: int, num_groups: int = 32) -> int:
    """Groups for ``channels``: ``num_groups``, or ``channels`` itself below that (the reference
    would fail there; one channel per group is the closest working choice)."""
    groups = min(num_groups, channels)
    if channels % groups:
        raise ValueError(
            f"GroupNorm: {channels} channels do not split into {groups} groups; "
            f"use channel counts (ch × ch_mult) that are multiples of {num_groups}"
        )
    return groups


def _per_group(s: jax.Array, groups: int) -> jax.Array:
    """[b, c] per-channel sums -> [b, groups] (channels of a group are contiguous, as in PyTorch)."""
    return s.reshape(s.shape[0], groups, -1).sum(-1)


def _per_channel(s: jax.Array, like: jax.Array) -> jax.Array:
    """[b, groups] -> [b, 1, ..., 1, c], broadcastable against ``like``."""
    b, g = s.shape
    c = like.shape[-1]
    return jnp.repeat(s, c // g, axis=-1).reshape(b, *([1] * (like.ndim - 2)), c)


def _group_stats(x: jax.Array, groups: int, eps: float):
    """Per-sample, per-group mean and 1/std in float32: two passes (mean, then centred variance)."""
    n = x[0].size // groups
    xf = x.astype(jnp.float32)
    mean = _per_group(sample_sums(xf), groups) / n
    d = xf - _per_channel(mean, x)
    return mean, jax.lax.rsqrt(_per_group(sample_sums(d * d), groups) / n + eps)


def _normalized(x, mean, inv):
    return (x.astype(jnp.float32) - _per_channel(mean, x)) * _per_channel(inv, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float, dtype: Dtype) -> jax.Array:
    """GroupNorm of NH…WC ``x`` over its spatial axes and ``groups`` contiguous channel groups.

    Its backward is written out (three passes over the activation: two channel sums and dx) instead of
    autodiff's chain through the two-pass statistics; it agrees with that to float32 rounding."""
    return _group_norm_fwd(x, scale, bias, groups, eps, dtype)[0]


def _group_norm_fwd(x, scale, bias, groups, eps, dtype):
    mean, inv = _group_stats(x, groups, eps)
    y = _normalized(x, mean, inv) * scale + bias
    return y.astype(dtype), (x, mean, inv, scale, jnp.zeros((0,), bias.dtype))


def _group_norm_bwd(groups, eps, dtype, res, dy):
    x, mean, inv, scale, bias_like = res
    n = x[0].size // groups
    dy = dy.astype(jnp.float32)
    xhat = _normalized(x, mean, inv)
    s_dy, s_dy_xhat = sample_sums(dy), sample_sums(dy * xhat)  # [b, c]
    # d/dx of (xhat·scale) through the per-group mean and variance
    m1 = _per_group(s_dy * scale, groups) / n
    m2 = _per_group(s_dy_xhat * scale, groups) / n
    dx = _per_channel(inv, x) * (dy * scale - _per_channel(m1, x) - xhat * _per_channel(m2, x))
    return (dx.astype(x.dtype), s_dy_xhat.sum(0).astype(scale.dtype), s_dy.sum(0).astype(bias_like.dtype))


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """GroupNorm over all spatial axes; statistics in float32 (two-pass variance, like PyTorch)."""

    num_groups: int = 32
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        g = group_count(c, self.num_groups)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (c,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (c,))
        return group_norm(x, scale, bias, g, float(self.eps), jnp.dtype(self.dtype))


class ResnetBlock(nn.Module):
    """norm → swish → conv → norm → swish → conv, plus a 1×1 ``nin_shortcut`` when channels change."""

    out_channels: int
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        norm = lambda name: GroupNorm(self.num_groups, dtype=self.dtype, name=name)  # noqa: E731
        h = nn.swish(norm("norm1")(x))
        h = conv(self.out_channels, dtype=self.dtype, name="conv1")(h)
        h = nn.swish(norm("norm2")(h))
        h = conv(self.out_channels, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, dtype=self.dtype, name="nin_shortcut")(x)
        return feature_map(x + h)


class AttnBlock(nn.Module):
    """Self-attention over all H×W positions; channels split into ``num_heads`` contiguous heads
    (STAR's multi-head form; one head is the taming/LlamaGen block). Scale (C/heads)^-1/2."""

    num_heads: int = 1
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"AttnBlock: {c} channels do not split into attn_num_heads={self.num_heads}")
        hd = c // self.num_heads
        h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x).reshape(b, hgt * wid, c)
        split = lambda t: t.reshape(b, hgt * wid, self.num_heads, hd)  # noqa: E731
        # 1×1 convs written as Dense over the channel axis, with PyTorch's default init.
        proj = lambda name: dense(c, DENSE_KERNEL_AXES, kernel_init=torch_default_init, dtype=self.dtype,  # noqa: E731
                                  name=name)
        q, k, v = (constrain(split(proj(n)(h)), HEAD_AXES) for n in ("q", "k", "v"))
        scores = jnp.einsum("blhc,bmhc->bhlm", q, k, preferred_element_type=jnp.float32) * hd**-0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhlm,bmhc->blhc", probs, v).reshape(b, hgt * wid, c)
        out = proj("proj_out")(out)
        return feature_map(x + out.reshape(x.shape).astype(x.dtype))


class Downsample(nn.Module):
    """Halves H and W: zero-pad one row/column at the bottom/right, then a VALID stride-2 3×3 conv."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(x.shape[-1], 3, stride=2, padding="VALID", dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour repeat, then a 3×3 conv."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = feature_map(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        return conv(x.shape[-1], 3, dtype=self.dtype, name="conv")(x)


def raster_causal_mask(kernel_size: int) -> jax.Array:
    """[k, k, 1, 1] mask of the taps at or before the centre in raster order (PixelCNN's type B)."""
    k, c = kernel_size, kernel_size // 2
    rows = jnp.arange(k)[:, None]
    cols = jnp.arange(k)[None, :]
    return ((rows < c) | ((rows == c) & (cols <= c))).astype(jnp.float32)[:, :, None, None]


def raster_causal_conv(features: int, kernel_size: int, in_features: int, *, dtype: Dtype = jnp.float32,
                       name: str | None = None) -> Conv:
    """A stride-1 k×k conv whose output at (r, c) reads only inputs at or before (r, c) in raster
    order (rows above, and this row up to c), so a stack of them stays causal in the raster
    sequence; zero padding at the borders (no wrap-around between rows)."""
    k = kernel_size
    if k % 2 == 0:
        raise ValueError(f"a raster-causal conv needs an odd kernel size, got {k}")
    return Conv(
        features,
        (k, k),
        padding="SAME",
        mask=jnp.broadcast_to(raster_causal_mask(k), (k, k, in_features, features)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


__all__ = [
    "AttnBlock",
    "CONV_KERNEL_AXES",
    "Conv",
    "Downsample",
    "GroupNorm",
    "ResnetBlock",
    "Upsample",
    "conv",
    "feature_map",
    "group_count",
    "group_norm",
    "raster_causal_conv",
    "raster_causal_mask",
    "torch_default_init",
]
