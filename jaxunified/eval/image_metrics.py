"""PSNR, SSIM and codebook statistics; batched, jit-friendly, float32.

Images are NHWC. The library's images are in [-1, 1] (``data_range=2``); uint8 images need
``data_range=255`` and [0, 1] images ``data_range=1``. ``data_range``/``low``/window settings are
Python numbers: under ``jax.jit`` pass them as static arguments (or close over them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check_pair(x, y, data_range: float, what: str) -> None:
    if x.shape != y.shape or len(x.shape) != 4:
        raise ValueError(f"{what} expects two NHWC batches of the same shape [B, H, W, C], got {x.shape} and {y.shape}")
    for a in (x, y):
        if jnp.issubdtype(a.dtype, jnp.integer) and data_range < 255:
            raise ValueError(
                f"{what} got {a.dtype} images with data_range={data_range}; pass data_range=255 for uint8 images"
            )


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0, max_db: float | None = None) -> jax.Array:
    """Per-image PSNR in dB, ``[B]``: 10·log10(data_range² / MSE) with the MSE over H, W, C.

    Identical images give +inf (as skimage does) unless ``max_db`` caps the value; averaging a
    dataset that may contain exact reconstructions should pass e.g. ``max_db=100``.
    """
    _check_pair(x, y, data_range, "psnr")
    d = jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)
    mse = jnp.mean(jnp.square(d), axis=(1, 2, 3))
    out = 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse)  # mse == 0 → +inf
    return out if max_db is None else jnp.minimum(out, max_db)


def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-0.5 * (r / sigma) ** 2)
    return (g / g.sum()).astype(np.float32)


def _filter_valid(a: jax.Array, g: jax.Array) -> jax.Array:
    """Separable Gaussian filter over H and W of [N, H, W, 1], keeping only fully covered pixels."""
    k = g.shape[0]
    for kernel in (g.reshape(k, 1, 1, 1), g.reshape(1, k, 1, 1)):
        # HIGHEST: on TPU a default-precision conv rounds to bf16, too coarse for var = E[x²] − E[x]².
        a = jax.lax.conv_general_dilated(
            a, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST
        )
    return a


def ssim(
    x: jax.Array,
    y: jax.Array,
    data_range: float = 2.0,
    low: float | None = None,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Per-image SSIM, ``[B]`` (Wang et al. 2004; Gaussian window, per channel, then the mean).

    Equals skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)`` on images in ``[0, data_range]``: skimage
    averages only the pixels whose window lies inside the image, which a VALID filter computes
    directly. SSIM's luminance term is not shift-invariant, so inputs are first moved by ``-low``
    to start at 0, as published numbers (computed on uint8 or [0, 1] images) assume. ``low``
    defaults to -1 for ``data_range=2`` (the library's [-1, 1] images) and 0 otherwise.
    """
    _check_pair(x, y, data_range, "ssim")
    b, h, w, c = x.shape
    if min(h, w) < win_size:
        raise ValueError(f"ssim needs images of at least {win_size}×{win_size} pixels (win_size), got {h}×{w}")
    if low is None:
        low = -1.0 if data_range == 2.0 else 0.0
    # Channels become batch entries so one single-channel filter serves all of them.
    fold = lambda a: jnp.transpose(jnp.asarray(a, jnp.float32) - low, (0, 3, 1, 2)).reshape(b * c, h, w, 1)  # noqa: E731
    xs, ys = fold(x), fold(y)
    g = jnp.asarray(_gaussian_1d(win_size, sigma))
    mu_x, mu_y, xx, yy, xy = (_filter_valid(a, g) for a in (xs, ys, xs * xs, ys * ys, xs * ys))
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return jnp.mean(s.reshape(b, c, -1), axis=(1, 2))


def codebook_stats(counts: jax.Array) -> dict[str, jax.Array]:
    """``usage`` (fraction of codes used at least once) and ``perplexity`` (exp of the entropy of
    the code frequencies) from a histogram ``counts[..., K]``; leading axes (e.g. RQ depth) are kept.

    An all-zero histogram gives usage 0 and perplexity 1 (the entropy of nothing is taken as 0).
    """
    c = jnp.asarray(counts, jnp.float32)
    total = jnp.sum(c, axis=-1, keepdims=True)
    p = c / jnp.maximum(total, 1e-30)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return {
        "usage": jnp.mean((c > 0).astype(jnp.float32), axis=-1),
        "perplexity": jnp.exp(-jnp.sum(plogp, axis=-1)),
    }


__all__ = ["psnr", "ssim", "codebook_stats"]
