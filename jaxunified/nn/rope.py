"""Rotary position embeddings (RoPE), 1-D and 2-D, as angle tables plus one ``apply_rope``.

A table is (cos, sin) of shape [..., T, D/2]: rotation angle i turns one pair of head
dimensions. Two pairings exist in released weights and both are kept, since a checkpoint's
q/k projections are laid out for one of them:

- ``interleaved=False`` (HF LLaMA/Qwen2 ``rotate_half``): dims (i, i + D/2) form pair i;
- ``interleaved=True`` (LlamaGen, Meta LLaMA's complex view): dims (2i, 2i + 1) form pair i.

2-D RoPE (LlamaGen c2i/t2i) gives the first half of the angles to the token's row and the
second half to its column, each a 1-D table over D/2 dims. Condition tokens in front of the
image grid get all-zero rows (cos = sin = 0), which zeroes their q and k exactly as LlamaGen's
``precompute_freqs_cis_2d`` does; pass ``num_cond`` to build that.

Multimodal RoPE (Qwen2-VL / Qwen2.5-VL's mRoPE) gives each token three position ids (temporal,
height, width) and each rotation angle one of them: ``mrope_sections`` (t, h, w) angle counts,
contiguous (Qwen2.5-VL: the fastest angles follow t, the slowest w) or interleaved t, h, w, t, …
(Qwen3-VL's layout: every axis gets fast and slow angles). Equal ids on the three axes give the
plain 1-D table exactly, which is how text tokens are placed.

Angles are float32 and the rotation runs in float32 whatever the compute dtype: positions up
to ~10⁵ times ~1 rad/step frequencies need more mantissa than bf16 has.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(dim: int, theta: float = 10000.0) -> np.ndarray:
    """[dim/2] rotation speeds ``theta^(-2i/dim)`` (fastest first)."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even number of rotary dims, got {dim}")
    return (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)


def rope_angles(positions: jax.Array, dim: int, theta: float = 10000.0) -> jax.Array:
    """Positions [...] (any int or float shape) → angles [..., dim/2] for a 1-D table."""
    return jnp.asarray(positions, jnp.float32)[..., None] * inv_frequencies(dim, theta)


def rope_2d_angles(rows: jax.Array, cols: jax.Array, dim: int, theta: float = 10000.0) -> jax.Array:
    """Row and column ids [...] → angles [..., dim/2]: first dim/4 from the row, last dim/4 from the column."""
    if dim % 4:
        raise ValueError(f"2-D RoPE needs rotary dims divisible by 4, got {dim}")
    return jnp.concatenate([rope_angles(rows, dim // 2, theta), rope_angles(cols, dim // 2, theta)], axis=-1)


def grid_positions(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column id of each token of a raster-ordered ``height × width`` grid, each [h·w]."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return rows.reshape(-1), cols.reshape(-1)


def mrope_axes(num_angles: int, sections, interleaved: bool = False) -> np.ndarray:
    """[num_angles] which position axis (0 t, 1 h, 2 w) turns each angle of an mRoPE table.

    Contiguous: the first ``sections[0]`` angles follow t, the next ``sections[1]`` h, the rest w
    (HF's ``apply_multimodal_rotary_pos_emb``). Interleaved: angle i follows h when i % 3 == 1 and
    i < 3·sections[1], w when i % 3 == 2 and i < 3·sections[2], t otherwise (HF's
    ``apply_interleaved_mrope``)."""
    sections = tuple(int(s) for s in sections)
    if len(sections) != 3 or min(sections) < 0 or sum(sections) != num_angles:
        raise ValueError(f"mrope sections {sections} must be three counts summing to the {num_angles} rotary angles "
                         f"(head_dim / 2)")
    if not interleaved:
        return np.repeat(np.arange(3), sections)
    i = np.arange(num_angles)
    axes = np.zeros(num_angles, np.int32)
    axes[(i % 3 == 1) & (i < 3 * sections[1])] = 1
    axes[(i % 3 == 2) & (i < 3 * sections[2])] = 2
    if np.bincount(axes, minlength=3).tolist() != list(sections):
        raise ValueError(f"interleaved mrope sections {sections} do not fit {num_angles} angles: each axis gets "
                         f"{np.bincount(axes, minlength=3).tolist()}")
    return axes


def rope_mrope(positions: jax.Array, dim: int, theta: float, sections, interleaved: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [..., T, dim/2] for (t, h, w) position ids [..., T, 3] (``mrope_axes``)."""
    if positions.shape[-1] != 3:
        raise ValueError(f"mRoPE positions need a last axis of 3 (t, h, w), got shape {positions.shape}")
    axes = mrope_axes(dim // 2, sections, interleaved)
    picked = jnp.asarray(positions, jnp.float32)[..., axes]  # [..., T, dim/2]: each angle's own position id
    return cos_sin(picked * inv_frequencies(dim, theta))


def cos_sin(angles: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.cos(angles), jnp.sin(angles)


def rope_1d(positions: jax.Array, dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [..., T, dim/2] for token positions [..., T]."""
    return cos_sin(rope_angles(positions, dim, theta))


COND_ROWS = ("zero", "identity", "sequence")


def rope_2d(
    height: int, width: int, dim: int, theta: float = 10000.0, num_cond: int = 0, cond_rows: str = "zero"
) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [num_cond + h·w, dim/2]: ``num_cond`` condition rows, then the grid in raster order.

    ``cond_rows="zero"`` (LlamaGen's table) zeroes the condition tokens' queries and keys, so
    attention to them is uniform; ``"identity"`` (cos 1, sin 0) leaves them unrotated, so image
    queries can attend to individual condition tokens by content; ``"sequence"`` places condition
    token i at row = column = i - num_cond, a 1-D sequence ending just before the grid's (0, 0), so
    condition tokens see each other's relative order (a left-padded caption's words keep their offsets
    from its last word and from the image, whatever its length).
    """
    if cond_rows not in COND_ROWS:
        raise ValueError(f"cond_rows must be one of {COND_ROWS}, got {cond_rows!r}")
    rows, cols = grid_positions(height, width)
    if cond_rows == "sequence":
        seq = np.arange(num_cond) - num_cond
        rows, cols = np.concatenate([seq, rows]), np.concatenate([seq, cols])
        return cos_sin(rope_2d_angles(rows, cols, dim, theta))
    cos, sin = cos_sin(rope_2d_angles(rows, cols, dim, theta))
    pad = ((num_cond, 0), (0, 0))
    return jnp.pad(cos, pad, constant_values=float(cond_rows == "identity")), jnp.pad(sin, pad)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool = False) -> jax.Array:
    """Rotates x [B, T, H, D] by a table broadcastable to [B, T, D/2] (the head axis is added here)."""
    half = x.shape[-1] // 2
    if cos.shape[-1] != half:
        raise ValueError(f"RoPE table has {cos.shape[-1]} angles per token; head dim {x.shape[-1]} needs {half}")
    c = cos.astype(jnp.float32)[..., None, :]
    s = sin.astype(jnp.float32)[..., None, :]
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape)
    else:
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)
