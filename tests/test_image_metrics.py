"""PSNR / SSIM / codebook statistics against hand values and a direct numpy SSIM (skimage's algorithm)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunified.eval.image_metrics import codebook_stats, psnr, ssim


def test_psnr_known_values():
    x = np.zeros((2, 4, 4, 3), np.float32)
    y = x.copy()
    y[0] += 0.1  # MSE 0.01 on [-1, 1] (range 2) → 10·log10(4 / 0.01)
    y[1, 0, 0, 0] = 1.0  # one element off by 1 out of 48 → MSE 1/48
    out = jax.jit(psnr)(x, y)
    np.testing.assert_allclose(out, [10 * math.log10(400.0), 10 * math.log10(4 * 48)], rtol=1e-5)
    a = np.full((1, 4, 4, 3), 100, np.uint8)
    b = np.full((1, 4, 4, 3), 110, np.uint8)  # no uint8 wrap-around: MSE is 100
    np.testing.assert_allclose(psnr(a, b, data_range=255), [10 * math.log10(255**2 / 100)], rtol=1e-5)
    np.testing.assert_allclose(psnr(a / 255.0, b / 255.0, data_range=1.0), psnr(a, b, data_range=255), rtol=1e-5)


def test_psnr_identical_is_inf_unless_capped():
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    assert np.all(np.isposinf(np.asarray(psnr(x, x))))
    np.testing.assert_array_equal(psnr(x, x, max_db=100.0), [100.0, 100.0])


def test_input_errors():
    a = np.zeros((1, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="data_range=255"):
        psnr(a, a)
    with pytest.raises(ValueError, match="same shape"):
        ssim(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16, 1)))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))


def _np_ssim(x, y, data_range):
    """skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    channel_axis=-1) for one HWC image, written out: reflect-padded Gaussian filter (truncate 3.5 → radius 5),
    the SSIM map, a crop of the 5-pixel border, the mean, then the mean over channels."""
    r = np.arange(-5, 6)
    g = np.exp(-0.5 * (r / 1.5) ** 2)
    g /= g.sum()

    def blur(a):
        p = np.pad(a, 5, mode="symmetric")  # scipy.ndimage's "reflect"
        p = np.stack([np.convolve(row, g, mode="valid") for row in p])
        return np.stack([np.convolve(col, g, mode="valid") for col in p.T]).T

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(x.shape[-1]):
        a, b = x[..., ch].astype(np.float64), y[..., ch].astype(np.float64)
        ua, ub = blur(a), blur(b)
        va, vb, cov = blur(a * a) - ua**2, blur(b * b) - ub**2, blur(a * b) - ua * ub
        s = ((2 * ua * ub + c1) * (2 * cov + c2)) / ((ua**2 + ub**2 + c1) * (va + vb + c2))
        vals.append(s[5:-5, 5:-5].mean())
    return float(np.mean(vals))


def test_ssim_matches_numpy_reference():
    rng = np.random.default_rng(1)
    x01 = rng.uniform(0, 1, (2, 24, 20, 3))
    y01 = np.clip(x01 + 0.15 * rng.standard_normal(x01.shape), 0, 1)  # correlated pair: SSIM well inside (0, 1)
    ref = [_np_ssim(x01[i], y01[i], 1.0) for i in range(2)]
    assert 0.2 < min(ref) and max(ref) < 0.95
    f = jax.jit(ssim, static_argnames=("data_range", "low"))
    np.testing.assert_allclose(f(x01.astype(np.float32), y01.astype(np.float32), data_range=1.0), ref, rtol=1e-4)
    # The library's [-1, 1] images with the default data_range=2 give the [0, 1] value.
    xm, ym = (2 * x01 - 1).astype(np.float32), (2 * y01 - 1).astype(np.float32)
    np.testing.assert_allclose(f(xm, ym), ref, rtol=1e-4)
    # uint8 images in [0, 255].
    xu, yu = np.round(x01 * 255).astype(np.uint8), np.round(y01 * 255).astype(np.uint8)
    ref_u = [_np_ssim(xu[i], yu[i], 255.0) for i in range(2)]
    np.testing.assert_allclose(ssim(xu, yu, data_range=255), ref_u, rtol=1e-4)
    # low=0 computes on the raw values (skimage called directly on [-1, 1] data): a different number.
    raw = [_np_ssim(xm[i], ym[i], 2.0) for i in range(2)]
    np.testing.assert_allclose(ssim(xm, ym, low=0.0), raw, rtol=1e-4)
    assert not np.allclose(raw, ref, rtol=1e-3)


def test_ssim_identical_is_one():
    x = np.random.default_rng(2).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-6)


def test_codebook_stats():
    out = jax.jit(codebook_stats)(jnp.asarray([4, 0, 4, 0]))
    assert float(out["usage"]) == pytest.approx(0.5)
    assert float(out["perplexity"]) == pytest.approx(2.0, rel=1e-6)
    counts = np.asarray([[5, 5, 5, 5], [1, 0, 0, 0]])  # per RQ depth
    out = codebook_stats(counts)
    np.testing.assert_allclose(out["usage"], [1.0, 0.25])
    np.testing.assert_allclose(out["perplexity"], [4.0, 1.0], rtol=1e-6)
    p = np.asarray([3.0, 1.0, 0.0, 6.0]) / 10
    expect = math.exp(-sum(q * math.log(q) for q in p if q > 0))
    assert float(codebook_stats(np.asarray([3, 1, 0, 6]))["perplexity"]) == pytest.approx(expect, rel=1e-6)
    empty = codebook_stats(np.zeros(8))
    assert float(empty["usage"]) == 0.0 and float(empty["perplexity"]) == 1.0
