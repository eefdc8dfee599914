"""Code simplification for generative training: each image's codes replaced by a lower-entropy
sequence that the tokenizer's decoder turns into (nearly) the same image.

A VQGAN spends many codebook entries on plain background next to objects: on the shapes 8×8
tokenizer the second to fifth most frequent codes (29% of all tokens) each change the decoded
pixels of their own cells by < 0.004 on average when swapped for the background code. A GPT over
those codes must still predict which of the synonyms the encoder happened to pick: entropy that
carries no image content.

``simplify_codes`` sets every code to ``fill`` (the background code), puts back the original code
of every cell whose own pixels moved by more than ``tol`` (the content), then, for a few rounds,
of every changed cell with such a cell in its 3×3-cell neighbourhood (decoders mix neighbouring
cells); an image still off by more than ``tol`` anywhere keeps all its original codes. So every
simplified image decodes within ``tol`` (max abs, images in [-1, 1]) of its original codes' decode.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def cell_errors(a: jax.Array, b: jax.Array, patch: int, window: int = 1) -> jax.Array:
    """[B, h, w]: max |a - b| over each cell's ``window``×``window``-cell neighbourhood of
    ``patch``×``patch``-pixel cells."""
    e = jnp.abs(a - b).max(-1)
    n, hh, ww = e.shape
    e = e.reshape(n, hh // patch, patch, ww // patch, patch).max((2, 4))
    if window == 1:
        return e
    return jax.lax.reduce_window(e, -jnp.inf, jax.lax.max, (1, window, window), (1, 1, 1), "SAME")


def simplify_codes(decode: Callable[[jax.Array], jax.Array], codes: jax.Array, fill: int | jax.Array, tol: float,
                   rounds: int = 3) -> jax.Array:
    """``codes`` [B, h, w] → codes of the same shape, as many as possible set to ``fill`` (one code,
    or codes [B, h, w] per cell: an edit's source), each image decoding within ``tol`` of
    ``decode(codes)`` (``decode``: codes → images [B, H, W, C])."""
    if tol < 0:
        raise ValueError(f"simplify tolerance must be >= 0, got {tol}")
    base = decode(codes)
    patch = base.shape[1] // codes.shape[1]
    cur = jnp.full_like(codes, fill)
    for r in range(rounds):
        bad = (cell_errors(decode(cur), base, patch, 1 if r == 0 else 3) > tol) & (cur != codes)
        cur = jnp.where(bad, codes, cur)
    ok = jnp.abs(decode(cur) - base).max((1, 2, 3)) <= tol
    return jnp.where(ok[:, None, None], cur, codes)


def most_frequent(codes, codebook_size: int) -> int:
    """The most frequent code of ``codes`` (host values; the background code of a batch of typical images)."""
    return int(np.argmax(np.bincount(np.asarray(codes).reshape(-1), minlength=codebook_size)))


__all__ = ["cell_errors", "most_frequent", "simplify_codes"]
