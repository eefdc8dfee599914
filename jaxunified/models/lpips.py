"""LPIPS perceptual distance (VGG16 variant of Zhang et al. 2018, as used by taming/LlamaGen).

``VGG16Features`` is torchvision's ``vgg16().features`` conv stack returning the five ReLU taps
(relu1_2 … relu5_3); it expects ImageNet-normalised NHWC input, as torchvision does. ``LPIPS``
maps [-1, 1] images into that space with the fixed scaling layer, unit-normalises every tap over
channels, and weighs the squared differences with learned non-negative 1×1 heads ``lin0..lin4``.

All weights are frozen in practice (they come from ``jaxunified.convert.lpips``); they live in
``params`` so the module stays a plain function of its variables, and the trainer keeps them out
of the optimizer. There is no dropout: the reference runs the heads in eval mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxunified.nn.conv import feature_map

# torchvision VGG16 "D" configuration: output channels of each conv, per block (a max-pool between blocks).
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")

# The LPIPS scaling layer: brings [-1, 1] images to (approximately) ImageNet mean/std normalisation.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

_CONV_AXES = (None, None, "conv_in", "conv_out")


def vgg16_conv_names() -> list[str]:
    """Flax names of the 13 convs in torchvision order: conv1_1, conv1_2, conv2_1, … conv5_3."""
    return [f"conv{b + 1}_{i + 1}" for b, block in enumerate(VGG16_BLOCKS) for i in range(len(block))]


@dataclasses.dataclass(frozen=True)
class VGG16Config:
    width_scale: int = 1  # divides every channel count; >1 only for tests / CPU smoke runs
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    def __post_init__(self):
        if self.width_scale < 1 or 64 % self.width_scale:
            raise ValueError(f"VGG16Config.width_scale={self.width_scale} must be a positive divisor of 64")

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of the five taps."""
        return tuple(block[-1] // self.width_scale for block in VGG16_BLOCKS)


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
    width_scale: int = 1
    dtype: Any = jnp.float32
    eps: float = 1e-10  # the reference's epsilon in the channel normalisation

    @property
    def vgg(self) -> VGG16Config:
        return VGG16Config(width_scale=self.width_scale, dtype=self.dtype)


class VGG16Features(nn.Module):
    """torchvision VGG16 ``features`` (3×3 convs, padding 1, ReLU, 2×2 max-pools); returns the 5 ReLU taps."""

    cfg: VGG16Config = VGG16Config()

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"VGG16Features expects NHWC RGB images [B, H, W, 3], got shape {x.shape}")
        cfg = self.cfg
        names = iter(vgg16_conv_names())
        h = x.astype(cfg.dtype)
        taps = []
        for b, block in enumerate(VGG16_BLOCKS):
            if b > 0:  # torchvision pools at the start of each later slice (floor mode, like VALID)
                h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
            for width in block:
                h = nn.Conv(
                    width // cfg.width_scale,
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    dtype=cfg.dtype,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                    name=next(names),
                )(h)
                h = feature_map(nn.relu(h))  # batch-split on a mesh: FSDP gathers the kernels, not the maps
            taps.append(h)
        return tuple(taps)


def _nonneg_uniform(key, shape, dtype=jnp.float32):
    # The released heads are non-negative (training clamps them); a random start keeps that property.
    return jax.random.uniform(key, shape, dtype, 0.0, 2.0 / shape[-2])


def _unit_normalize(x: jax.Array, eps: float) -> jax.Array:
    # eps² inside the sqrt keeps the gradient finite at an all-zero feature vector (sqrt'(0) = inf
    # gives NaN); elsewhere it is far below float32 resolution, so values match x/(‖x‖+eps).
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x / (jnp.sqrt(sq + eps * eps) + eps)


class LPIPS(nn.Module):
    """``LPIPS()(x, y) -> [B]`` perceptual distance between NHWC images in [-1, 1] (float32 out)."""

    cfg: LPIPSConfig = LPIPSConfig()

    def setup(self):
        self.vgg = VGG16Features(self.cfg.vgg)
        self.lins = [
            nn.Conv(
                1,
                (1, 1),
                use_bias=False,
                dtype=jnp.float32,  # the distance is a loss term: keep its last step in float32
                kernel_init=nn.with_logical_partitioning(_nonneg_uniform, _CONV_AXES),
                name=f"lin{k}",
            )
            for k in range(len(TAP_NAMES))
        ]

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs must have the same shape, got {x.shape} and {y.shape}")
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        b = x.shape[0]
        # One VGG pass over both images: half the kernel launches of two passes, same result. Each
        # x row sits beside its y row ([x0, y0, x1, y1, ...]), so a batch split over devices keeps
        # every pair on one device (a [x; y] concatenation would put all x rows on the first half).
        both = jnp.stack([x, y], axis=1).reshape(2 * b, *x.shape[1:])
        both = feature_map((both.astype(jnp.float32) - shift) / scale)
        taps = self.vgg(both)
        total = jnp.zeros((b,), jnp.float32)
        for lin, f in zip(self.lins, taps):
            f = f.astype(jnp.float32).reshape(b, 2, *f.shape[1:])
            fx, fy = _unit_normalize(f[:, 0], self.cfg.eps), _unit_normalize(f[:, 1], self.cfg.eps)
            d = lin(jnp.square(fx - fy)).astype(jnp.float32)
            total = total + jnp.mean(d, axis=(1, 2, 3))
        return total
