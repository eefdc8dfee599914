"""Teacher forcing for autoregressive code models (the ``ar`` GPT, STAR's stacked layers).

A model trained only on true prefixes never sees the mistakes its own sampling feeds back
(exposure bias). ``noisy_inputs`` swaps a fraction of the input codes for other codes of the batch
while the targets stay the true codes, so the model learns to continue from an imperfect prefix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def noisy_inputs(codes: jax.Array, fraction: float, rng) -> jax.Array:
    """``codes`` [B, N] with about ``fraction`` of them swapped for codes drawn from elsewhere in the
    batch (so they stay in the targets' distribution, simplified codes or not); ``codes`` itself when
    ``fraction`` is 0."""
    if fraction <= 0:
        return codes
    pick, where = jax.random.split(rng)
    flat = codes.reshape(-1)
    swapped = flat[jax.random.randint(pick, codes.shape, 0, flat.shape[0])]
    return jnp.where(jax.random.bernoulli(where, fraction, codes.shape), swapped, codes)
