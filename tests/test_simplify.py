"""Code simplification: synonyms of the fill code go, content codes stay, and every image decodes
within the tolerance of its original codes (also when the decoder mixes neighbouring cells)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunified.quant.simplify import most_frequent, simplify_codes

# Code 0 is background, 1 and 2 are near-synonyms of it, 3 and 4 are content.
TABLE = jnp.array([0.0, 0.01, -0.02, 0.8, -0.6])


def decoder(blur: float):
    def decode(codes):
        x = TABLE[codes]  # [B, h, w]
        if blur:  # each cell leaks into its right neighbour: effects cross cell borders
            x = x + blur * jnp.pad(x, ((0, 0), (0, 0), (1, 0)))[:, :, :-1]
        x = jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)
        return jnp.stack([x, 0.5 * x, -x], -1)
    return decode


def test_synonyms_become_fill_and_content_stays():
    codes = jnp.array([[[0, 1, 2, 0], [0, 3, 4, 1], [2, 0, 0, 0], [1, 1, 0, 3]]])
    out = simplify_codes(decoder(0.0), codes, fill=0, tol=0.05)
    content = np.isin(np.asarray(codes), (3, 4))
    np.testing.assert_array_equal(np.asarray(out)[content], np.asarray(codes)[content])
    assert (np.asarray(out)[~content] == 0).all()


@pytest.mark.parametrize("blur", [0.0, 0.3])
def test_every_image_decodes_within_tolerance(blur):
    codes = jax.random.choice(jax.random.key(0), 5, (32, 6, 6), p=jnp.array([0.5, 0.15, 0.15, 0.1, 0.1]))
    decode, tol = decoder(blur), 0.04
    out = simplify_codes(decode, codes, fill=0, tol=tol)
    assert float(jnp.abs(decode(out) - decode(codes)).max()) <= tol
    changed = np.asarray(out != codes)
    assert changed.any() and (np.asarray(out)[changed] == 0).all()
    assert (np.asarray(out) == 0).mean() > (np.asarray(codes) == 0).mean() + 0.1


def test_most_frequent_and_bad_tolerance():
    assert most_frequent(jnp.array([[3, 1, 3], [2, 3, 0]]), 8) == 3
    with pytest.raises(ValueError, match="tolerance"):
        simplify_codes(decoder(0.0), jnp.zeros((1, 2, 2), jnp.int32), 0, -1.0)


def test_per_cell_fill_copies_an_edits_source_where_the_pixels_allow():
    # the edit changed one cell's content (3 → 4); elsewhere the encoder picked other synonyms
    source = jnp.array([[[0, 1, 3], [2, 0, 0]]])
    target = jnp.array([[[2, 0, 4], [0, 1, 0]]])
    out = simplify_codes(decoder(0.0), target, fill=source, tol=0.05)
    np.testing.assert_array_equal(np.asarray(out), [[[0, 1, 4], [2, 0, 0]]])
