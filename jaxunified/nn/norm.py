"""Normalisation layers; statistics always in float32 whatever the compute dtype."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def layer_norm(eps: float, name: str | None = None) -> nn.LayerNorm:
    """flax LayerNorm computing (and returning) float32, scale/bias on the 'norm' axis."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class RMSNorm(nn.Module):
    """Qwen2/LLaMA RMSNorm: ``x · rsqrt(mean(x²) + eps) · scale``, no mean subtraction, no bias.

    The weight multiplies in float32 before the cast back to the input dtype, so a bf16 residual
    stream loses precision once, not twice.
    """

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), jnp.float32
        )
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(‖x‖, eps)`` along the last axis (PyTorch ``F.normalize``), in float32: embeddings,
    codebooks and losses compare unit vectors whatever the compute dtype."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)
