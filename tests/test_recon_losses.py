"""Pixel, GAN and adaptive-weight losses: hand-computed values, jit, and the adaptive weight in a toy model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxunified.losses.recon import (
    adaptive_weight,
    adopt_weight,
    generator_loss,
    hinge_d_loss,
    pixel_loss,
    vanilla_d_loss,
)


def test_pixel_loss():
    x = jnp.asarray([[0.0, 1.0], [2.0, -1.0]])
    y = jnp.asarray([[1.0, 1.0], [0.0, 0.0]])
    assert float(pixel_loss(x, y)) == pytest.approx((1 + 0 + 4 + 1) / 4)
    assert float(pixel_loss(x, y, kind="l1")) == pytest.approx((1 + 0 + 2 + 1) / 4)
    assert pixel_loss(x.astype(jnp.bfloat16), y).dtype == jnp.float32
    with pytest.raises(ValueError, match="'l2' or 'l1'"):
        pixel_loss(x, y, kind="mse")
    with pytest.raises(ValueError, match="same shape"):
        pixel_loss(x, y[:1])


def test_d_losses():
    real = jnp.asarray([2.0, 0.5, -1.0])
    fake = jnp.asarray([-2.0, 0.0, 1.0])
    # relu(1-real) = 0, .5, 2 → 2.5/3; relu(1+fake) = 0, 1, 2 → 1.
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    # leaky: 1-real = -1 → -0.01; 1+fake = -1 → -0.01.
    assert float(hinge_d_loss(real, fake, negative_slope=0.01)) == pytest.approx(0.5 * (2.49 / 3 + 2.99 / 3))
    sp = lambda t: np.log1p(np.exp(t))  # noqa: E731
    expect = 0.5 * (np.mean(sp(-np.asarray(real))) + np.mean(sp(np.asarray(fake))))
    assert float(vanilla_d_loss(real, fake)) == pytest.approx(expect, rel=1e-6)
    # A perfect discriminator has zero hinge loss.
    assert float(hinge_d_loss(jnp.full((4,), 3.0), jnp.full((4,), -3.0))) == 0.0


def test_generator_loss():
    fake = jnp.asarray([[1.0, -3.0], [0.5, 0.0]])
    assert float(generator_loss(fake)) == pytest.approx(0.375)
    expect = np.mean(np.log1p(np.exp(-np.asarray(fake))))  # BCE(D(fake), 1)
    assert float(generator_loss(fake, "non_saturating")) == pytest.approx(expect, rel=1e-6)
    assert float(generator_loss(fake, "non-saturating")) == pytest.approx(expect, rel=1e-6)
    with pytest.raises(ValueError, match="'hinge' or 'non_saturating'"):
        generator_loss(fake, "wgan")


def test_adopt_weight_is_jit_friendly():
    f = jax.jit(lambda step: adopt_weight(0.5, step, 100))
    assert float(f(0)) == 0.0 and float(f(99)) == 0.0
    assert float(f(100)) == 0.5 and float(f(10_000)) == 0.5
    assert float(adopt_weight(0.5, 3, 0)) == 0.5


def test_adaptive_weight_values():
    g_rec = jnp.asarray([3.0, 4.0])  # norm 5
    g_gan = {"a": jnp.asarray([1.0]), "b": jnp.asarray([[0.0]])}  # pytree, norm 1
    assert float(adaptive_weight(g_rec, g_gan)) == pytest.approx(5.0 / (1.0 + 1e-4))
    assert float(adaptive_weight(g_rec, jnp.zeros(2))) == pytest.approx(1e4)  # 5/1e-4 = 5e4, clipped
    assert float(adaptive_weight(g_rec, g_gan, max_weight=10.0, min_weight=0.3)) == pytest.approx(5.0 / 1.0001)
    assert float(adaptive_weight(jnp.zeros(2), g_gan, min_weight=0.3)) == pytest.approx(0.3)
    # The weight is a constant to the optimiser: no gradient flows through it.
    g = jax.grad(lambda a: adaptive_weight(a, g_gan) * 2.0)(g_rec)
    np.testing.assert_array_equal(g, 0.0)


class _ToyDecoder(nn.Module):
    @nn.compact
    def __call__(self, z):
        h = nn.relu(nn.Conv(4, (3, 3), name="conv_in")(z))
        return nn.Conv(3, (3, 3), name="conv_out")(h)


def test_adaptive_weight_at_last_layer_matches_direct_grads():
    rng = np.random.default_rng(0)
    dec = _ToyDecoder()
    z = rng.standard_normal((2, 8, 8, 2)).astype(np.float32)
    target = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    abstract = jax.eval_shape(lambda a: dec.init(jax.random.key(0), a), z)
    params = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32), abstract)["params"]
    d_w = rng.standard_normal((3,)).astype(np.float32)  # a linear "discriminator" on the recon

    def losses(p):
        recon = dec.apply({"params": p}, z)
        rec = pixel_loss(recon, target)
        gan = generator_loss(recon @ d_w)
        return rec, gan

    # As a trainer does it: one grad per loss over the whole tree, then read the last layer.
    @jax.jit
    def trainer_weight(p):
        g_rec = jax.grad(lambda q: losses(q)[0])(p)["conv_out"]["kernel"]
        g_gan = jax.grad(lambda q: losses(q)[1])(p)["conv_out"]["kernel"]
        return adaptive_weight(g_rec, g_gan)

    w = trainer_weight(params)

    # Directly: each loss as a function of the last kernel alone.
    def with_kernel(k, i):
        p = {**params, "conv_out": {**params["conv_out"], "kernel": k}}
        return losses(p)[i]

    k0 = params["conv_out"]["kernel"]
    grad_k = jax.jit(jax.grad(with_kernel), static_argnums=1)
    n_rec = np.linalg.norm(np.asarray(grad_k(k0, 0), np.float64))
    n_gan = np.linalg.norm(np.asarray(grad_k(k0, 1), np.float64))
    assert float(w) == pytest.approx(min(max(n_rec / (n_gan + 1e-4), 0.0), 1e4), rel=1e-5)
    assert 0.0 < float(w) < 1e4  # the toy sits inside the clip range, so the ratio itself is tested

    torch = pytest.importorskip("torch")
    # taming/LlamaGen: torch.autograd.grad of each loss w.r.t. the last layer's weight.
    tz = torch.from_numpy(z).permute(0, 3, 1, 2)
    conv_in = torch.nn.Conv2d(2, 4, 3, padding=1)
    conv_out = torch.nn.Conv2d(4, 3, 3, padding=1)
    for layer, name in ((conv_in, "conv_in"), (conv_out, "conv_out")):
        layer.weight.data = torch.from_numpy(np.transpose(params[name]["kernel"], (3, 2, 0, 1)).copy())
        layer.bias.data = torch.from_numpy(params[name]["bias"].copy())
    recon = conv_out(torch.relu(conv_in(tz))).permute(0, 2, 3, 1)
    rec = torch.mean((recon - torch.from_numpy(target)) ** 2)
    gan = -torch.mean(recon @ torch.from_numpy(d_w))
    t_rec = torch.autograd.grad(rec, conv_out.weight, retain_graph=True)[0]
    t_gan = torch.autograd.grad(gan, conv_out.weight)[0]
    t_w = torch.clamp(torch.norm(t_rec) / (torch.norm(t_gan) + 1e-4), 0.0, 1e4).item()
    assert float(w) == pytest.approx(t_w, rel=1e-4)
