"""Feature distillation losses against a frozen teacher (float32 scalars; teacher is stop-gradient'ed).

Inputs are ``[..., D]`` features: pooled ``[B, D]`` or per-token ``[B, L, D]``. An optional
``mask`` over the leading dims (``[B]`` or ``[B, L]``, true = counted) restricts the mean.
Weights are the caller's (config's), never applied here:

* TokLIP: ``1000 · embedding_mse(student, teacher)`` — PyTorch ``nn.MSELoss`` (mean over all
  B × D elements) of the l2-normalised pooled embeddings (open_clip ``loss.py`` L300-302). For
  unit vectors that is ``(2 − 2 cos) / D`` per row, so the 1000 is ≈ 0.87·(2 − 2 cos) at D = 1152.
* DualToken: ``5 · mse_minus_cos(layer-26 tokens) + mse_minus_cos(pooled)`` on *raw* features —
  ``nn.MSELoss`` (mean over all elements) minus ``F.cosine_similarity(dim=-1).mean()`` (mean over
  rows/tokens), as the stage-1 semantic loss in its ``src/open_clip_train/train.py``.

Per device (``axis_name`` set, inside ``shard_map``) a masked mean divides by the *global* count
(``psum``) over the device count, so that, like the contrastive losses, ``pmean`` over devices of
the loss and of the parameter gradients is the global masked mean. Unmasked means need nothing:
the shards are equal-sized.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxunified.quant.vq import l2_normalize

COS_EPS = 1e-8  # F.cosine_similarity: each norm clamped to ≥ 1e-8 separately.


def mse(student, teacher, *, normalize: bool = False, mask=None, axis_name: Any = None) -> jax.Array:
    """Mean squared error over all elements (``nn.MSELoss``), optionally of l2-normalised features."""
    s, t = _prepare(student, teacher, mask, "mse")
    if normalize:
        s, t = l2_normalize(s), l2_normalize(t)
    return _mean(_row_mse(s, t), mask, axis_name)


def cosine_similarity(student, teacher, *, mask=None, axis_name: Any = None) -> jax.Array:
    """Mean over rows/tokens of ``cos(student, teacher)`` along the last axis."""
    s, t = _prepare(student, teacher, mask, "cosine_similarity")
    return _mean(_row_cos(s, t), mask, axis_name)


def cosine_distance(student, teacher, *, mask=None, axis_name: Any = None) -> jax.Array:
    """``mean(1 − cos)`` over rows/tokens."""
    s, t = _prepare(student, teacher, mask, "cosine_distance")
    return _mean(1.0 - _row_cos(s, t), mask, axis_name)


def embedding_mse(student, teacher, *, normalize: bool = True) -> jax.Array:
    """TokLIP's distillation term for pooled ``[B, D]`` embeddings (the caller multiplies by 1000)."""
    _check_rank(student, 2, "embedding_mse", "[batch, dim] pooled embeddings")
    return mse(student, teacher, normalize=normalize)


def token_mse(student, teacher, mask=None, *, normalize: bool = False, axis_name: Any = None) -> jax.Array:
    """Per-token MSE for ``[B, L, D]`` features; ``mask`` ``[B, L]`` selects the counted tokens."""
    _check_rank(student, 3, "token_mse", "[batch, length, dim] token features")
    return mse(student, teacher, normalize=normalize, mask=mask, axis_name=axis_name)


def token_cosine_distance(student, teacher, mask=None, *, axis_name: Any = None) -> jax.Array:
    """Per-token ``mean(1 − cos)`` for ``[B, L, D]`` features; ``mask`` ``[B, L]``."""
    _check_rank(student, 3, "token_cosine_distance", "[batch, length, dim] token features")
    return cosine_distance(student, teacher, mask=mask, axis_name=axis_name)


def mse_minus_cos(student, teacher, *, mask=None, axis_name: Any = None) -> jax.Array:
    """DualToken's semantic term ``MSE − mean cos`` on raw (unnormalised) features, any ``[..., D]``."""
    s, t = _prepare(student, teacher, mask, "mse_minus_cos")
    return _mean(_row_mse(s, t) - _row_cos(s, t), mask, axis_name)


# ---------------------------------------------------------------- internals


def _check_rank(x, rank: int, what: str, layout: str):
    if jnp.ndim(x) != rank:
        raise ValueError(f"{what} expects {layout}, got shape {jnp.shape(x)}")


def _prepare(student, teacher, mask, what: str):
    s = jnp.asarray(student, jnp.float32)
    t = lax.stop_gradient(jnp.asarray(teacher, jnp.float32))
    if s.shape != t.shape:
        raise ValueError(f"{what}: student {s.shape} and teacher {t.shape} features must have the same shape")
    if s.ndim < 1:
        raise ValueError(f"{what}: features need a trailing feature axis, got a scalar")
    if mask is not None and jnp.shape(mask) != s.shape[:-1]:
        raise ValueError(
            f"{what}: mask shape {jnp.shape(mask)} must equal the features' leading dims {s.shape[:-1]}"
        )
    return s, t


def _row_mse(s, t):
    return jnp.mean(jnp.square(s - t), axis=-1)


def _row_cos(s, t):
    return jnp.sum(l2_normalize(s, COS_EPS) * l2_normalize(t, COS_EPS), axis=-1)


def _mean(values, mask, axis_name):
    """Mean of ``values`` over the (masked) positions; see the module docstring for ``axis_name``."""
    if mask is None:
        return jnp.mean(values)
    w = jnp.asarray(mask, jnp.float32)
    count = jnp.sum(w)
    if axis_name is not None:
        count = lax.psum(count, axis_name) / lax.axis_size(axis_name)
    # An all-masked batch gives 0 (and zero gradients) rather than NaN.
    return jnp.sum(values * w) / jnp.where(count > 0, count, 1.0)
