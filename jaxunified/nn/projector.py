"""The MLP projector that maps another model's vectors into an LM's input embeddings: LLaVA's
``mlp2x_gelu`` and STAR's ``MlpProjector`` (MLP_GELU): Linear D → H, then (GELU, Linear H → H) ×
(depth − 1). GELU is torch's default exact (erf) form."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxunified.nn.dense import dense


class MlpProjector(nn.Module):
    """[.., D] → [.., features] float32; layers ``dense_0`` … ``dense_{depth-1}``."""

    features: int
    depth: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.depth < 1:
            raise ValueError(f"projector depth must be ≥ 1, got {self.depth}")
        x = dense(self.features, (None, "embed"), dtype=self.dtype, name="dense_0")(x)
        for i in range(1, self.depth):
            x = dense(self.features, ("embed", "embed"), dtype=self.dtype, name=f"dense_{i}")(
                jax.nn.gelu(x, approximate=False))
        return x.astype(jnp.float32)
