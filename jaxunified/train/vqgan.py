"""Task ``vqgan``: VQGAN tokenizer training (LlamaGen/taming recipe) and its evaluation.

Generator and discriminator are updated in one jitted step: the generator loss is
pixel + LPIPS + quantiser terms + (adaptive) GAN term; the discriminator sees the same
reconstructions, detached. Frozen LPIPS weights live in ``params["lpips"]`` under the
optimizer's ``frozen`` label so they checkpoint with the run but never train.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.eval import image_metrics
from jaxunified.losses import recon as recon_losses
from jaxunified.models import discriminator as disc_lib
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.train import gan
from jaxunified.train.metrics import image_grid, save_png
from jaxunified.train.optim import FROZEN
from jaxunified.train.task import Task


def model_config(cfg) -> vqgan_lib.VQGANConfig:
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.model.get("overrides", {}).items()}
    return vqgan_lib.get_config(cfg.model.variant, **overrides)


def as_float_images(x):
    """uint8 [0, 255] or float [-1, 1] → float32 [-1, 1]."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 127.5 - 1.0
    return x.astype(jnp.float32)


class VQGANTask(Task):
    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.loss_cfg = config.loss
        self.vq_cfg = model_config(config)
        self.vqgan = vqgan_lib.VQGAN(self.vq_cfg)
        self.use_disc = float(self.loss_cfg.disc_weight) > 0
        self.use_lpips = float(self.loss_cfg.perceptual_weight) > 0
        if self.use_disc:
            d = config.disc
            self.disc = disc_lib.NLayerDiscriminator(
                disc_lib.PatchGANConfig(ndf=int(d.ndf), n_layers=int(d.n_layers), bn_axis_name=None)
            )
        if self.use_lpips:
            self.lpips, self._lpips_vars = self._load_lpips()

    # ---- building ----
    def _load_lpips(self):
        return gan.load_lpips(self.loss_cfg)

    def dummy_batch(self):
        r = int(self.config.data.resolution)
        return {"image": np.zeros((int(self.config.data.batch_size), r, r, 3), np.float32)}

    def init_variables(self, rng, batch):
        x = as_float_images(jnp.asarray(batch["image"][:1]))
        k_gen, k_disc, k_lp, k_q = jax.random.split(rng, 4)
        gen = self.vqgan.init({"params": k_gen, "quant": k_q}, x)
        params = {"generator": gen["params"]}
        collections = {"generator": {k: v for k, v in gen.items() if k != "params"}}
        gan.init_disc_and_lpips(
            params, collections, x, k_disc, k_lp,
            disc=self.disc if self.use_disc else None,
            lpips=self.lpips if self.use_lpips else None,
            lpips_vars=self._lpips_vars if self.use_lpips else None,
        )
        return params, collections

    def param_labels(self, params):
        names = {"generator": "gen", "disc": "disc", "lpips": FROZEN}
        return {k: jax.tree.map(lambda _, n=names[k]: n, v) for k, v in params.items()}

    def group_lr(self):
        lr = float(self.config.optim.lr)
        return {"gen": lr, "disc": float(self.config.optim.get("disc_lr") or lr)}

    # ---- the step ----
    def _nll(self, params, x, recon):
        lc = self.loss_cfg
        rec = recon_losses.pixel_loss(x, recon, kind=lc.pixel) * float(lc.pixel_weight)
        if self.use_lpips:
            p = self.lpips.apply({"params": params["lpips"]}, x, recon).mean()
            return rec + float(lc.perceptual_weight) * p, (rec, p)
        return rec, (rec, jnp.zeros(()))

    def _disc_logits(self, dparams, stats, x, axis_name):
        return gan.disc_logits(self.disc, dparams, stats, x, axis_name)

    def grad_fn(self, params, collections, batch, rng, step, axis_name=None):
        lc = self.loss_cfg
        x = as_float_images(batch["image"])
        gen_colls = collections.get("generator", {})
        disc_factor = recon_losses.adopt_weight(float(lc.disc_weight), step, int(lc.disc_start)) if self.use_disc else 0.0
        vqgan = self.vqgan
        if axis_name is not None and gen_colls:
            # EMA statistics must be summed over the devices that each hold a slice of the batch.
            vq = dataclasses.replace(self.vq_cfg.vq, axis_name=axis_name)
            vqgan = vqgan_lib.VQGAN(dataclasses.replace(self.vq_cfg, vq=vq))

        def gen_loss(gp):
            out, mut = vqgan.apply({"params": gp, **gen_colls}, x, train=True, rngs={"quant": rng},
                                   mutable=list(gen_colls))
            recon = out["recon"]
            nll, (rec, perc) = self._nll(params, x, recon)
            q = out["vq_loss"] + out["commit_loss"] + out["entropy_loss"]
            total = nll + float(lc.codebook_weight) * q
            m = {"rec_loss": rec, "perceptual": perc, "vq_loss": out["vq_loss"], "commit_loss": out["commit_loss"],
                 "entropy_loss": out["entropy_loss"], "usage": out["usage"], "perplexity": out["perplexity"]}
            if self.use_disc:
                logits_fake, _ = self._disc_logits(params["disc"], collections["disc"], recon, axis_name)
                g = recon_losses.generator_loss(logits_fake, kind=lc.gen_loss)
                if lc.adaptive_weight:
                    w = self._adaptive_weight(gp, params, collections, x, out["dec_features"], axis_name)
                else:
                    w = jnp.ones(())
                total = total + disc_factor * w * g
                m.update(g_loss=g, d_weight=w)
            m["loss"] = total
            m["psnr"] = image_metrics.psnr(recon, x).mean()
            return total, (m, mut, recon)

        (_, (metrics, gen_mut, recon)), g_gen = jax.value_and_grad(gen_loss, has_aux=True)(params["generator"])
        grads = {"generator": g_gen}
        new_colls = dict(collections)
        if gen_colls:
            new_colls["generator"] = gen_mut
        if self.use_disc:
            fn = recon_losses.hinge_d_loss if lc.disc_loss == "hinge" else recon_losses.vanilla_d_loss
            grads["disc"], new_colls["disc"], d_metrics = gan.disc_grads(
                self.disc, params["disc"], collections["disc"], x, jax.lax.stop_gradient(recon), fn,
                disc_factor, axis_name)
            metrics.update(d_metrics)
        if self.use_lpips:
            grads["lpips"] = jax.tree.map(jnp.zeros_like, params["lpips"])
        return grads, new_colls, metrics

    def _adaptive_weight(self, gp, params, collections, x, dec_features, axis_name):
        """taming's ‖∇nll‖/‖∇G‖ at the decoder's last conv, from its input features (one conv re-run)."""
        lc = self.loss_cfg

        def gan_fn(recon):
            logits, _ = self._disc_logits(params["disc"], collections["disc"], recon, axis_name)
            return recon_losses.generator_loss(logits, kind=lc.gen_loss)

        return gan.adaptive_gan_weight(
            gp["decoder"]["conv_out"], dec_features, lambda recon: self._nll(params, x, recon)[0], gan_fn,
            axis_name=axis_name, max_weight=float(lc.adaptive_max))

    # ---- evaluation ----
    def eval_params(self, state):
        return state.ema_params if state.ema_params else state.params

    def evaluate(self, state, split, workdir, step) -> dict:
        from jaxunified.data.pipeline import build_dataset, to_global

        cfg = self.config
        params = self.eval_params(state)["generator"]
        colls = state.collections.get("generator", {})
        K = self.vq_cfg.codebook_size

        @jax.jit
        def eval_step(params, colls, images, mask):
            x = as_float_images(images)
            out = self.vqgan.apply({"params": params, **colls}, x, train=False)
            recon = jnp.clip(out["recon"], -1.0, 1.0)
            counts = jnp.zeros((K,), jnp.float32).at[out["codes"].reshape(x.shape[0], -1)].add(
                mask[:, None].astype(jnp.float32))
            return {
                "psnr": image_metrics.psnr(recon, x) * mask,
                "ssim": image_metrics.ssim(recon, x) * mask,
                "mask": mask.astype(jnp.float32),
                "counts": counts,
                "recon": recon,
            }

        data = build_dataset(cfg.data, split, self.mesh)
        total = {"psnr": 0.0, "ssim": 0.0, "n": 0.0}
        counts = np.zeros((K,), np.float64)
        limit = int(cfg.eval.get("num_examples", 0)) or None
        first = None
        with jax.set_mesh(self.mesh):
            for host_batch in data:
                b = to_global(host_batch, self.mesh)
                mask = b.get("mask", jnp.ones((b["image"].shape[0],), jnp.bool_))
                out = jax.device_get(eval_step(params, colls, b["image"], mask))
                total["psnr"] += float(out["psnr"].sum())
                total["ssim"] += float(out["ssim"].sum())
                total["n"] += float(out["mask"].sum())
                counts += out["counts"]
                if first is None:
                    first = (np.asarray(jax.device_get(b["image"])), out["recon"])
                if limit and total["n"] >= limit:
                    break
        n = max(total["n"], 1.0)
        stats = image_metrics.codebook_stats(counts)
        metrics = {"psnr": total["psnr"] / n, "ssim": total["ssim"] / n, "codebook_usage": float(stats["usage"]),
                   "codebook_perplexity": float(stats["perplexity"]), "num_examples": n}
        if first is not None and jax.process_index() == 0:
            real, rec = first
            k = min(16, real.shape[0])
            real = np.asarray(as_float_images(jnp.asarray(real[:k])))
            pairs = np.concatenate([real, rec[:k]], axis=0)
            save_png(pathlib.Path(workdir) / f"recon_{split}_{step:07d}.png", image_grid(pairs, ncol=k), upscale=4)
        return metrics
