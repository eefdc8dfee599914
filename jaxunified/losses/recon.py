"""Reconstruction and adversarial losses for VQGAN-style tokenizer training (all float32 scalars).

The perceptual term is ``jaxunified.models.lpips.LPIPS`` (``mean`` of its per-image output).
Conventions follow taming/LlamaGen: D losses average the real and fake halves with weight 0.5;
the hinge G loss is ``-mean(D(fake))``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def pixel_loss(x: jax.Array, y: jax.Array, kind: str = "l2") -> jax.Array:
    """Mean squared (``"l2"``) or absolute (``"l1"``) error over all elements."""
    if x.shape != y.shape:
        raise ValueError(f"pixel_loss inputs must have the same shape, got {x.shape} and {y.shape}")
    d = _f32(x) - _f32(y)
    if kind == "l2":
        return jnp.mean(jnp.square(d))
    if kind == "l1":
        return jnp.mean(jnp.abs(d))
    raise ValueError(f"pixel_loss kind={kind!r} is not known; use 'l2' or 'l1'")


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array, negative_slope: float = 0.0) -> jax.Array:
    """0.5·(mean relu(1 − real) + mean relu(1 + fake)).

    ``negative_slope > 0`` swaps relu for leaky_relu: DualToken writes its D hinge with
    ``F.leaky_relu`` (slope 0.01), so the discriminator keeps a small gradient on confident patches.
    """
    act = jax.nn.relu if negative_slope == 0.0 else (lambda t: jax.nn.leaky_relu(t, negative_slope))
    return 0.5 * (jnp.mean(act(1.0 - _f32(real_logits))) + jnp.mean(act(1.0 + _f32(fake_logits))))


def vanilla_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Logistic (non-saturating) D loss: 0.5·(mean softplus(−real) + mean softplus(fake))."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-_f32(real_logits))) + jnp.mean(jax.nn.softplus(_f32(fake_logits))))


def generator_loss(fake_logits: jax.Array, kind: str = "hinge") -> jax.Array:
    """``"hinge"``: −mean D(fake); ``"non_saturating"``: mean softplus(−D(fake)) = BCE(D(fake), 1).

    LlamaGen's ``non_saturating_gen_loss`` passes its arguments to ``binary_cross_entropy_with_logits``
    swapped (input 1, target D(fake)), which makes it −mean D(fake) + const, i.e. the hinge G loss;
    this is the textbook form. ``"non-saturating"`` (LlamaGen's flag spelling) is accepted too.
    """
    f = _f32(fake_logits)
    if kind == "hinge":
        return -jnp.mean(f)
    if kind in ("non_saturating", "non-saturating"):
        return jnp.mean(jax.nn.softplus(-f))
    raise ValueError(f"generator_loss kind={kind!r} is not known; use 'hinge' or 'non_saturating'")


def adopt_weight(weight: Any, step: Any, start: Any) -> jax.Array:
    """``weight`` from step ``start`` on, 0 before; a traced ``step`` works under jit."""
    return jnp.where(jnp.asarray(step) >= start, _f32(weight), jnp.float32(0.0))


def adaptive_weight(
    grad_rec: Any,
    grad_gan: Any,
    max_weight: float = 1e4,
    eps: float = 1e-4,
    min_weight: float = 0.0,
) -> jax.Array:
    """clip(‖∇rec‖ / (‖∇gan‖ + eps), min_weight, max_weight), with gradients stopped.

    The gradients are those of the reconstruction (+ perceptual) loss and of the generator's GAN
    loss w.r.t. the decoder's last layer (an array or a pytree; its global L2 norm is used), as in
    taming's ``calculate_adaptive_weight``. DualToken clips to [0.3, 10] instead of [0, 1e4].
    """
    n_rec = optax.global_norm(jax.tree.map(_f32, grad_rec))
    n_gan = optax.global_norm(jax.tree.map(_f32, grad_gan))
    w = jnp.clip(n_rec / (n_gan + eps), min_weight, max_weight)
    return jax.lax.stop_gradient(w)
