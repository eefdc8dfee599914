"""PatchGAN discriminator (pix2pix ``NLayerDiscriminator`` as used by taming, LlamaGen, DualToken).

conv 4×4/2 + LeakyReLU(0.2); ``n_layers`` blocks of conv 4×4 (stride 2, the last stride 1) +
BatchNorm + LeakyReLU(0.2), channels ndf·min(2^n, 8); a final conv 4×4/1 to one logit per patch.
All convs pad 1, so a 256² image gives 30×30 logits with the default 3 layers.

BatchNorm state lives in ``batch_stats``. The references run the discriminator in train mode in
both the generator and the discriminator step, so BN normalises with batch statistics (and updates
the running ones) in both: call with ``train=True`` and ``mutable=["batch_stats"]`` there.
With ``bn_axis_name`` set, statistics are averaged over that named mesh axis (SyncBN), which a
per-device train step inside ``jax.shard_map`` needs to match the global-batch statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_CONV_AXES = (None, None, "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class PatchGANConfig:
    ndf: int = 64
    n_layers: int = 3
    use_batchnorm: bool = True  # False: no norm layers, and every conv gets a bias (taming's rule)
    bn_axis_name: str | None = None  # named axis to average BN statistics over (SyncBN)
    negative_slope: float = 0.2
    dtype: Any = jnp.float32  # compute dtype; parameters and the returned logits are float32

    def __post_init__(self):
        if self.n_layers < 1 or self.ndf < 1:
            raise ValueError(f"PatchGANConfig needs ndf >= 1 and n_layers >= 1, got ndf={self.ndf}, n_layers={self.n_layers}")


def _bn_scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
    """``__call__(x [B, H, W, C] in [-1, 1], train) -> logits [B, h, w, 1]`` (float32)."""

    cfg: PatchGANConfig = PatchGANConfig()

    def _conv(self, features: int, stride: int, use_bias: bool, name: str) -> nn.Conv:
        return nn.Conv(
            features,
            (4, 4),
            strides=(stride, stride),
            padding=((1, 1), (1, 1)),
            use_bias=use_bias,
            dtype=self.cfg.dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), _CONV_AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"NLayerDiscriminator expects NHWC images [B, H, W, C], got shape {x.shape}")
        cfg = self.cfg
        act = lambda h: nn.leaky_relu(h, cfg.negative_slope)  # noqa: E731
        h = act(self._conv(cfg.ndf, 2, True, "conv0")(x.astype(cfg.dtype)))
        for n in range(1, cfg.n_layers + 1):
            stride = 2 if n < cfg.n_layers else 1
            # A bias right before BatchNorm would be cancelled by the mean subtraction.
            h = self._conv(cfg.ndf * min(2**n, 8), stride, not cfg.use_batchnorm, f"conv{n}")(h)
            if cfg.use_batchnorm:
                h = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=0.9,  # PyTorch's momentum 0.1 weighs the new batch; Flax's weighs the old value
                    epsilon=1e-5,
                    dtype=cfg.dtype,
                    axis_name=cfg.bn_axis_name,
                    scale_init=nn.with_logical_partitioning(_bn_scale_init, ("norm",)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                    name=f"norm{n}",
                )(h)
            h = act(h)
        logits = self._conv(1, 1, True, f"conv{cfg.n_layers + 1}")(h)
        return logits.astype(jnp.float32)
