"""GAN pieces shared by the tokenizer tasks (``vqgan``, ``dualtoken``).

* ``disc_logits``: the PatchGAN in train mode (batch statistics, as taming/LlamaGen/DualToken run
  it in both the generator and the discriminator pass), SyncBN over ``axis_name`` per device;
* ``disc_grads``: one discriminator loss/gradient on real images and detached reconstructions;
* ``adaptive_gan_weight``: taming's ``‖∇nll‖ / (‖∇G‖ + 1e-4)`` at the decoder's last conv, from
  the features entering it (only that conv is re-run, so the two extra gradients are cheap);
* ``load_lpips``: the perceptual network from ``loss.lpips_path`` (random weights, with a warning,
  when none is given).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxunified import convert
from jaxunified.losses import recon as recon_losses
from jaxunified.models import discriminator as disc_lib
from jaxunified.models import lpips as lpips_lib
from jaxunified.models.vqgan import vqgan_conv_out
from jaxunified.train import planning

log = logging.getLogger(__name__)


def build_parts(loss_cfg, disc_cfg):
    """``(discriminator, LPIPS, LPIPS variables)`` for the loss terms that are on (None where off)."""
    disc = lpips = lpips_vars = None
    if float(loss_cfg.disc_weight) > 0:
        disc = disc_lib.NLayerDiscriminator(disc_lib.PatchGANConfig(
            ndf=int(disc_cfg.ndf), n_layers=int(disc_cfg.n_layers),
            negative_slope=float(disc_cfg.get("negative_slope", 0.2))))
    if float(loss_cfg.perceptual_weight) > 0:
        lpips, lpips_vars = load_lpips(loss_cfg)
    return disc, lpips, lpips_vars


def load_lpips(loss_cfg):
    """``(LPIPS module, variables or None)``; None means "initialise randomly in init_variables"."""
    path = loss_cfg.get("lpips_path")
    if path and planning.is_shapes_only():  # planning: the random init has the same shapes
        return lpips_lib.LPIPS(lpips_lib.LPIPSConfig()), None
    if path:
        return convert.load("lpips", path, vgg_path=loss_cfg.get("vgg_path") or None)
    # No pretrained weights: random VGG features still give a feature-space distance, but the
    # figures are not comparable to published LPIPS; say so loudly.
    log.warning("loss.perceptual_weight > 0 but loss.lpips_path is empty: using randomly initialised LPIPS")
    return lpips_lib.LPIPS(lpips_lib.LPIPSConfig()), None


def init_disc_and_lpips(params: dict, collections: dict, x, k_disc, k_lp, *, disc=None, lpips=None,
                        lpips_vars=None) -> None:
    """Adds the discriminator (``params``/``collections["disc"]``) and LPIPS (``params["lpips"]``, the
    loaded weights or a random init) to a task's initial variables, in place; None skips a part."""
    if disc is not None:
        dv = disc.init(k_disc, x, train=False)
        params["disc"] = dv["params"]
        collections["disc"] = {k: v for k, v in dv.items() if k != "params"}
    if lpips is not None:
        lv = lpips_vars if lpips_vars is not None else lpips.init(k_lp, x, x)
        params["lpips"] = lv["params"]


def disc_logits(disc, dparams, stats, x, axis_name=None):
    """``(logits, updated collections)`` of ``disc`` (an ``NLayerDiscriminator``) on ``x``."""
    module = disc if axis_name is None else disc.clone(cfg=dataclasses.replace(disc.cfg, bn_axis_name=axis_name))
    return module.apply({"params": dparams, **stats}, x, train=True, mutable=["batch_stats"])


def disc_grads(disc, dparams, stats, real, fake, loss_fn: Callable, weight: Any = 1.0, axis_name=None):
    """Gradient of ``weight · loss_fn(D(real), D(fake))``; returns ``(grads, new stats, metrics)``.

    ``fake`` should already be ``stop_gradient``-ed reconstructions.
    """

    def loss(dp):
        real_logits, mut = disc_logits(disc, dp, stats, real, axis_name)
        fake_logits, mut = disc_logits(disc, dp, mut, fake, axis_name)
        return weight * loss_fn(real_logits, fake_logits), (mut, real_logits.mean(), fake_logits.mean())

    (d_loss, (mut, real_mean, fake_mean)), grads = jax.value_and_grad(loss, has_aux=True)(dparams)
    return grads, mut, {"d_loss": d_loss, "logits_real": real_mean, "logits_fake": fake_mean}


def d_loss_fn(loss_cfg) -> Callable:
    """The discriminator loss ``loss.disc_loss`` names; ``loss.hinge_slope`` > 0 leaks the hinge (DualToken)."""
    if loss_cfg.disc_loss == "hinge":
        slope = float(loss_cfg.get("hinge_slope", 0.0))
        return lambda real, fake: recon_losses.hinge_d_loss(real, fake, negative_slope=slope)
    return recon_losses.vanilla_d_loss


def generator_term(disc, params, collections, recon, loss_cfg, *, conv_out_params, dec_features, nll_fn,
                   axis_name=None) -> tuple[jax.Array, jax.Array]:
    """``(G loss, its weight)`` for ``recon``: the weight is ``adaptive_gan_weight`` when
    ``loss.adaptive_weight`` (clamped to ``[loss.adaptive_min, loss.adaptive_max]``), else 1."""

    def gan_fn(r):
        logits, _ = disc_logits(disc, params["disc"], collections["disc"], r, axis_name)
        return recon_losses.generator_loss(logits, kind=loss_cfg.gen_loss)

    g = gan_fn(recon)
    if not loss_cfg.adaptive_weight:
        return g, jnp.ones((), jnp.float32)
    w = adaptive_gan_weight(conv_out_params, dec_features, nll_fn, gan_fn, axis_name=axis_name,
                            min_weight=float(loss_cfg.get("adaptive_min", 0.0)),
                            max_weight=float(loss_cfg.adaptive_max))
    return g, w


def add_disc_grads(grads: dict, new_collections: dict, metrics: dict, disc, params, collections, real, recon,
                   loss_cfg, weight, axis_name=None) -> None:
    """In place: the discriminator's step on detached ``recon`` (when ``disc`` is not None) and zero
    gradients for the frozen LPIPS (when ``params`` has it)."""
    if disc is not None:
        grads["disc"], new_collections["disc"], d_metrics = disc_grads(
            disc, params["disc"], collections["disc"], real, jax.lax.stop_gradient(recon), d_loss_fn(loss_cfg),
            weight, axis_name)
        metrics.update(d_metrics)
    if "lpips" in params:
        grads["lpips"] = jax.tree.map(jnp.zeros_like, params["lpips"])


def adaptive_gan_weight(
    conv_out_params,
    dec_features: jax.Array,
    nll_fn: Callable[[jax.Array], jax.Array],
    gan_fn: Callable[[jax.Array], jax.Array],
    *,
    axis_name=None,
    min_weight: float = 0.0,
    max_weight: float = 1e4,
) -> jax.Array:
    """Adaptive GAN weight from the decoder's last conv (``params["decoder"]["conv_out"]``).

    ``nll_fn(recon)`` and ``gan_fn(recon)`` are the reconstruction and generator losses of a
    reconstruction; per device the two gradients are averaged over ``axis_name`` first, which
    makes the weight that of the global batch. Clamped to ``[min_weight, max_weight]``
    (taming [0, 1e4], DualToken [0.3, 10]); gradient-stopped.
    """
    feats = jax.lax.stop_gradient(dec_features)
    last = jax.lax.stop_gradient(conv_out_params)

    def recon_with(kernel):
        return vqgan_conv_out({"decoder": {"conv_out": {**last, "kernel": kernel}}}, feats)

    g_rec = jax.grad(lambda k: nll_fn(recon_with(k)))(last["kernel"])
    g_gan = jax.grad(lambda k: gan_fn(recon_with(k)))(last["kernel"])
    if axis_name is not None:
        g_rec = jax.lax.pmean(g_rec, axis_name)
        g_gan = jax.lax.pmean(g_gan, axis_name)
    return recon_losses.adaptive_weight(g_rec, g_gan, max_weight=max_weight, min_weight=min_weight)


__all__ = ["adaptive_gan_weight", "add_disc_grads", "build_parts", "d_loss_fn", "disc_grads", "disc_logits", "generator_term", "load_lpips"]
