"""Task ``vqgan``: VQGAN tokenizer training (LlamaGen/taming recipe) and its evaluation.

Generator and discriminator are updated in one jitted step: the generator loss is
pixel + LPIPS + quantiser terms + (adaptive) GAN term; the discriminator sees the same
reconstructions, detached. Frozen LPIPS weights live in ``params["lpips"]`` under the
optimizer's ``frozen`` label so they checkpoint with the run but never train.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.data.pipeline import as_float_images
from jaxunified.eval import image_metrics
from jaxunified.eval.recon import evaluate_reconstruction, grid_path
from jaxunified.losses import recon as recon_losses
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.train import gan
from jaxunified.train.optim import FROZEN
from jaxunified.train.task import Task, eval_params, kwargs


class VQGANTask(Task):
    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.loss_cfg = config.loss
        self.vq_cfg = self.model_config(config)
        self.vqgan = vqgan_lib.VQGAN(self.vq_cfg)
        self.disc, self.lpips, self._lpips_vars = gan.build_parts(self.loss_cfg, config.get("disc"))
        self.use_disc, self.use_lpips = self.disc is not None, self.lpips is not None

    @staticmethod
    def model_config(config) -> vqgan_lib.VQGANConfig:
        """``model.variant`` with ``model.overrides`` (``models.vqgan.get_config``)."""
        return vqgan_lib.get_config(config.model.variant, **kwargs(config.model.get("overrides")))

    def export(self, params, collections):
        return self.vqgan, {"params": params["generator"], **collections.get("generator", {})}

    # ---- building ----
    def dummy_batch(self):
        r = int(self.config.data.resolution)
        return {"image": np.zeros((int(self.config.data.batch_size), r, r, 3), np.uint8)}

    def init_variables(self, rng, batch):
        x = as_float_images(jnp.asarray(batch["image"][:1]))
        k_gen, k_disc, k_lp, k_q = jax.random.split(rng, 4)
        gen = self.vqgan.init({"params": k_gen, "quant": k_q}, x)
        params = {"generator": gen["params"]}
        collections = {"generator": {k: v for k, v in gen.items() if k != "params"}}
        gan.init_disc_and_lpips(
            params, collections, x, k_disc, k_lp,
            disc=self.disc, lpips=self.lpips, lpips_vars=self._lpips_vars)
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

    def forward(self, params, collections, batch):
        vqgan, variables = self.export(params, collections)
        return vqgan.apply(variables, as_float_images(batch["image"]), train=False)["recon"]

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
                g, w = gan.generator_term(self.disc, params, collections, recon, lc,
                                          conv_out_params=gp["decoder"]["conv_out"], dec_features=out["dec_features"],
                                          nll_fn=lambda r: self._nll(params, x, r)[0], axis_name=axis_name)
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
        gan.add_disc_grads(grads, new_colls, metrics, self.disc, params, collections, x, recon, lc, disc_factor,
                           axis_name)
        return grads, new_colls, metrics

    # ---- evaluation ----
    def evaluate(self, state, split, workdir, step) -> dict:
        variables = {"params": eval_params(state)["generator"], **state.collections.get("generator", {})}

        def reconstruct(v, x):
            out = self.vqgan.apply(v, x, train=False)
            return out["recon"], {"codes": out["codes"]}

        res = evaluate_reconstruction(reconstruct, variables, {"codes": (1, self.vq_cfg.codebook_size)},
                                      self.config.data, split, self.mesh, num_examples=self.eval_num_examples(),
                                      grid_path=grid_path(workdir, split, step))
        stats = image_metrics.codebook_stats(res["counts"]["codes"][0])
        return {"psnr": res["psnr"], "ssim": res["ssim"], "codebook_usage": float(stats["usage"]),
                "codebook_perplexity": float(stats["perplexity"]), "num_examples": res["num_examples"]}
