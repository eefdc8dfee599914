"""Task ``dualtoken``: DualToken tokenizer training (the official stage-0/1/2 recipe) and evaluation.

One generator step combines every term, each weighted in ``config.loss`` and logged on its own:

    sem_weight · (sem_token_weight · (MSE − cos)(zq_sem, teacher layer-``layer_sem`` tokens)
                  + sem_pooled_weight · (MSE − cos)(pooled, teacher pooled))
    + commit_pix_weight · commit_pix + commit_sem_weight · commit_sem
    + pixel_weight · MSE(recon, x) + perceptual_weight · LPIPS(recon, x)
    + disc_weight · d_weight · G(recon)                 (d_weight adaptive, clamped to [0.3, 10])
    + contrastive_weight · SigLIP/CLIP loss(pooled, text tower)           (optional)

The teacher is a frozen copy of the initial vision tower (``params["teacher"]``). The discriminator
(PatchGAN, hinge written with leaky ReLU) takes its step on the same detached reconstructions,
its loss weighted by ``disc_loss_weight``. ``model.stage`` reproduces the reference's freezing:
0 = embeddings and layers 1..layer_sem frozen; 1 = everything but the text tower and logit
scale/bias trains; 2 = embeddings, layers 1..layer_shortcut and the whole pixel branch frozen and
the pixel codebook kept in eval mode. Frozen parts carry no optimizer state.

The initial tower (and teacher) comes from a trained ``siglip`` run (``model.siglip_workdir``), an
HF SigLIP folder (``model.siglip_init_from``) or a fresh random tower (``model.siglip_variant``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxunified import convert
from jaxunified.convert.common import read_state_dict
from jaxunified.convert.siglip import config_from_hf, convert_state_dict
from jaxunified.data.pipeline import as_float_images
from jaxunified.eval import image_metrics
from jaxunified.eval.image_text import encoder_pair, evaluate_image_text
from jaxunified.eval.recon import depth_usage, evaluate_reconstruction, grid_path
from jaxunified.losses import contrastive, distill
from jaxunified.losses import recon as recon_losses
from jaxunified.models import dualtoken as dt
from jaxunified.models import siglip as siglip_lib
from jaxunified.models.vqgan import VQGANConfig
from jaxunified.quant.rq import RQConfig
from jaxunified.train import frozen as frozen_parts
from jaxunified.train import planning
from jaxunified.train import gan, runs
from jaxunified.train.optim import FROZEN
from jaxunified.train.task import Task, eval_params, fill_boxes, kwargs

STAGES = dt.STAGES

def _with_towers(sc: siglip_lib.SigLIPConfig, m) -> siglip_lib.SigLIPConfig:
    """``sc`` with ``model.vision`` / ``model.text`` overrides; scan off (DualToken runs sub-ranges of the tower)."""
    vision = {**kwargs(m.get("vision")), "scan": False}
    sc = dataclasses.replace(sc, vision=dataclasses.replace(sc.vision, **vision))
    if sc.text is not None:
        sc = dataclasses.replace(sc, text=dataclasses.replace(sc.text, **kwargs(m.get("text"))))
    return sc


def siglip_source(m) -> str:
    """Where the initial tower (and teacher) weights come from: "workdir", "hf" or "random"."""
    if m.get("siglip_workdir"):
        return "workdir"
    if m.get("siglip_init_from"):
        return "hf"
    return "random"


def siglip_source_config(cfg) -> siglip_lib.SigLIPConfig:
    """The SigLIP tower config of the run's weight source (see ``siglip_source``), scan off."""
    m = cfg.model
    source = siglip_source(m)
    def from_variant():  # a random tower, or the shapes of a plan (no file read)
        if not m.get("siglip_variant"):
            raise FileNotFoundError(f"no run in model.siglip_workdir={m.siglip_workdir!r} to plan from; set "
                                    "model.siglip_preset (the config that trains it) or model.siglip_variant")
        return siglip_lib.get_config(m.siglip_variant, image_size=m.get("image_size") or None)

    if source == "workdir":
        block = {"workdir": m.siglip_workdir, "config": m.get("siglip_config") or "",
                 "preset": m.get("siglip_preset") or ""}
        sc = frozen_parts.run_model_config(block, from_variant)
    elif source == "hf" and not (planning.is_shapes_only() and m.get("siglip_variant")):
        sc = config_from_hf(json.loads((pathlib.Path(m.siglip_init_from).expanduser() / "config.json").read_text()))
    elif source == "hf" or m.get("siglip_variant"):
        sc = from_variant()
    else:
        raise ValueError(
            "config.model needs one of siglip_workdir (a trained `siglip` run), siglip_init_from (an HF SigLIP "
            "folder) or siglip_variant (a random tower), or a released `variant`"
        )
    return _with_towers(sc, m)


def model_config(cfg) -> dt.DualTokenConfig:
    """The ``DualTokenConfig`` a run's ``config.model`` describes.

    ``model.variant`` names a released size (``models.dualtoken.VARIANTS``; only the tower overrides
    apply); otherwise the tower comes from ``siglip_source_config`` and the rest from the fields.
    """
    m = cfg.model
    if m.get("variant"):
        base = dt.get_config(m.variant)
        return dataclasses.replace(base, siglip=_with_towers(base.siglip, m))
    latent = m.get("decoder_latent_shape")
    return dt.DualTokenConfig(
        siglip=siglip_source_config(cfg),
        layer_recon=int(m.layer_recon),
        layer_sem=int(m.layer_sem),
        layer_shortcut=int(m.layer_shortcut) if m.get("layer_shortcut") else None,
        weight_shortcut=float(m.weight_shortcut),
        pix_rq=RQConfig(**kwargs(m.pix_rq)),
        sem_rq=RQConfig(**kwargs(m.sem_rq)),
        decoder=VQGANConfig(**kwargs(m.decoder)),
        decoder_latent_shape=tuple(latent) if latent else None,
    )


class DualTokenTask(Task):
    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.lc = config.loss
        self.stage = int(config.model.get("stage", 1))
        if self.stage not in dt.STAGES:
            raise ValueError(f"model.stage={self.stage}; use one of {dt.STAGES}")
        self.model_cfg = model_config(config)
        self.model = dt.DualToken(self.model_cfg)
        self.teacher = siglip_lib.VisionTower(self.model_cfg.siglip.vision)
        planned = planning.is_shapes_only()  # AOT: no weights are read, only shapes matter
        if siglip_source(config.model) == "workdir" and not planned:  # zero-shot is noise unless the captions are the tower's
            runs.check_same_text(config.data.get("text"), config.model.siglip_workdir,
                                 config.model.get("siglip_config") or None)
        # Read checkpoints now: init_variables also runs under jax.eval_shape, where a restore cannot.
        self._siglip_params, self._init_vars = (None, None) if planned else self._initial_weights()
        text_cfg = config.data.get("text")
        has_text = text_cfg is not None and text_cfg.get("tokenizer")
        self.text_tokenizer = frozen_parts.text_tokenizer(text_cfg) if has_text else None
        self.use_contrastive = float(self.lc.get("contrastive_weight", 0.0)) > 0
        if self.use_contrastive:
            if self.text_tokenizer is None or self.model_cfg.siglip.text is None:
                raise ValueError("loss.contrastive_weight > 0 needs data.text (caption tokens) and a text tower")
            if self.text_tokenizer.max_len > self.model_cfg.siglip.text.max_len:
                raise ValueError(f"data.text.max_len={self.text_tokenizer.max_len} exceeds the text tower's max_len "
                                 f"{self.model_cfg.siglip.text.max_len}")
        self.disc, self.lpips, self._lpips_vars = gan.build_parts(self.lc, config.get("disc"))
        self.use_disc, self.use_lpips = self.disc is not None, self.lpips is not None

    @classmethod
    def model_config(cls, config) -> dt.DualTokenConfig:
        return model_config(config)

    def export(self, params, collections):
        return self.model, {"params": params["tokenizer"], **collections.get("tokenizer", {})}

    # ---- building ----
    def dummy_batch(self):
        r, b = int(self.config.data.resolution), int(self.config.data.batch_size)
        batch = {"image": np.zeros((b, r, r, 3), np.uint8)}
        if self.use_contrastive:
            batch["tokens"] = np.zeros((b, self.text_tokenizer.max_len), np.int32)
        return batch

    def _initial_weights(self):
        """(SigLIP params or None, DualToken variables or None)."""
        m = self.config.model
        siglip_params, source = None, siglip_source(m)
        if source == "workdir":
            _, _, variables = runs.load_run(m.siglip_workdir, m.get("siglip_config") or None)
            siglip_params = siglip_lib.unscanned_params(variables["params"], self.model_cfg.siglip)
        elif source == "hf":
            siglip_params = convert_state_dict(read_state_dict(m.siglip_init_from), self.model_cfg.siglip)["params"]
        tok_vars = None
        if m.get("init_from"):
            _, tok_vars = convert.load("dualtoken", m.init_from, **kwargs(m.get("init_from_overrides")))
        return siglip_params, tok_vars

    def init_variables(self, rng, batch):
        x = as_float_images(jnp.asarray(batch["image"][:1]))
        k_tok, k_disc, k_lp, k_q = jax.random.split(rng, 4)
        tokens = None
        if self.model_cfg.siglip.text is not None:
            tokens = jnp.zeros((1, self.model_cfg.siglip.text.max_len), jnp.int32)
        tv = self.model.init({"params": k_tok, "quant": k_q}, x, tokens)
        tparams, tcolls = tv["params"], {k: v for k, v in tv.items() if k != "params"}
        if self._siglip_params is not None:
            keep = {k: self._siglip_params[k] for k in tparams["siglip"] if k in self._siglip_params}
            missing = sorted(set(tparams["siglip"]) - set(keep))
            if missing:
                raise ValueError(f"the initial SigLIP weights lack {missing}")
            tparams = dict(tparams, siglip=fill_boxes(tparams["siglip"], keep, "the initial SigLIP weights"))
        # The teacher is the original vision tower, frozen; a DualToken checkpoint (init_from) only
        # replaces the student's starting point.
        teacher = tparams["siglip"]["vision"]
        if self._init_vars is not None:
            tparams = fill_boxes(tparams, self._init_vars["params"], f"model.init_from {self.config.model.init_from}")
            if "codebook" in self._init_vars:
                tcolls = dict(tcolls, codebook=fill_boxes(tcolls["codebook"], self._init_vars["codebook"], "the codebooks"))
        params, collections = {"tokenizer": tparams, "teacher": teacher}, {"tokenizer": tcolls}
        gan.init_disc_and_lpips(
            params, collections, x, k_disc, k_lp,
            disc=self.disc, lpips=self.lpips, lpips_vars=self._lpips_vars)
        return params, collections

    def param_labels(self, params):
        m = self.config.model

        def label(path, _):
            keys = [k.key for k in path if getattr(k, "key", None) is not None]
            frozen = dt.frozen_in_stage(keys, self.model_cfg, self.stage, train_text=m.get("train_text", False),
                                        train_logits=m.get("train_logits", False))
            return FROZEN if frozen else "gen"

        out = {"tokenizer": jax.tree_util.tree_map_with_path(label, params["tokenizer"])}
        for name, lab in (("teacher", FROZEN), ("disc", "disc"), ("lpips", FROZEN)):
            if name in params:
                out[name] = jax.tree.map(lambda _, lab=lab: lab, params[name])
        return out

    def group_lr(self):
        lr = float(self.config.optim.lr)
        return {"gen": lr, "disc": float(self.config.optim.get("disc_lr") or lr)}

    # ---- the step ----
    def _model_for(self, axis_name):
        if axis_name is None:
            return self.model
        c = self.model_cfg
        return dt.DualToken(dataclasses.replace(
            c, pix_rq=dataclasses.replace(c.pix_rq, axis_name=axis_name),
            sem_rq=dataclasses.replace(c.sem_rq, axis_name=axis_name)))

    def _perceptual(self, params, x, recon):
        if not self.use_lpips:
            return jnp.zeros((), jnp.float32)
        return self.lpips.apply({"params": params["lpips"]}, x, recon).mean()

    def _nll(self, params, x, recon):
        """The adaptive weight's reconstruction term: MSE + perceptual_weight·LPIPS (reference: unscaled MSE)."""
        rec = recon_losses.pixel_loss(x, recon, kind=self.lc.pixel)
        return rec + float(self.lc.perceptual_weight) * self._perceptual(params, x, recon)

    def teacher_features(self, vision_params, x):
        """The frozen original tower's layer-``layer_sem`` tokens and pooled output."""
        out = self.teacher.apply({"params": vision_params}, x, return_hidden=True)
        hs = out["hidden_states"][self.model_cfg.layer_sem]
        return jax.lax.stop_gradient(hs), jax.lax.stop_gradient(out["pooled"])

    def grad_fn(self, params, collections, batch, rng, step, axis_name=None):
        lc = self.lc
        x = as_float_images(batch["image"])
        tokens = batch.get("tokens") if self.use_contrastive else None
        model = self._model_for(axis_name)
        tcolls = collections["tokenizer"]
        t_tokens, t_pooled = self.teacher_features(params["teacher"], x)
        disc_on = recon_losses.adopt_weight(1.0, step, int(lc.disc_start)) if self.use_disc else 0.0

        def gen_loss(tp):
            out, mut = model.apply(
                {"params": tp, **tcolls}, x, tokens, train=True, pix_train=self.stage != 2,
                rngs={"quant": rng}, mutable=list(tcolls))
            recon = out["recon"]
            m = {
                "sem_token": distill.mse_minus_cos(out["zq_sem"], t_tokens),
                "sem_pooled": distill.mse_minus_cos(out["pooled"], t_pooled),
                "commit_pix": out["commit_pix"],
                "commit_sem": out["commit_sem"],
                "pixel": recon_losses.pixel_loss(x, recon, kind=lc.pixel),
            }
            total = float(lc.sem_weight) * (
                float(lc.sem_token_weight) * m["sem_token"] + float(lc.sem_pooled_weight) * m["sem_pooled"])
            total += float(lc.commit_pix_weight) * m["commit_pix"] + float(lc.commit_sem_weight) * m["commit_sem"]
            total = total + float(lc.pixel_weight) * m["pixel"]
            if self.use_lpips:
                m["perceptual"] = self._perceptual(params, x, recon)
                total = total + float(lc.perceptual_weight) * m["perceptual"]
            if self.use_contrastive:
                c_loss, c_metrics = contrastive.contrastive_loss(lc.contrastive_kind, out["pooled"], out["text_embeds"],
                                                                 tp["siglip"], axis_name=axis_name)
                m.update(contrastive=c_loss, i2t_acc=c_metrics["i2t_acc"], t2i_acc=c_metrics["t2i_acc"])
                total = total + float(lc.contrastive_weight) * c_loss
            if self.use_disc:
                g, w = gan.generator_term(self.disc, params, collections, recon, lc,
                                          conv_out_params=tp["decoder"]["conv_out"], dec_features=out["dec_features"],
                                          nll_fn=lambda r: self._nll(params, x, r), axis_name=axis_name)
                total = total + float(lc.disc_weight) * disc_on * w * g
                m.update(g_loss=g, d_weight=w)
            m.update(
                loss=total,
                psnr=image_metrics.psnr(recon, x).mean(),
                usage_pix=jnp.mean(out["usage_pix"]),
                usage_sem=jnp.mean(out["usage_sem"]),
                perplexity_pix=jnp.mean(out["perplexity_pix"]),
                perplexity_sem=jnp.mean(out["perplexity_sem"]),
            )
            return total, (m, mut, recon)

        (_, (metrics, tok_mut, recon)), g_tok = jax.value_and_grad(gen_loss, has_aux=True)(params["tokenizer"])
        grads = {"tokenizer": g_tok, "teacher": jax.tree.map(jnp.zeros_like, params["teacher"])}
        new_colls = dict(collections, tokenizer=tok_mut)
        gan.add_disc_grads(grads, new_colls, metrics, self.disc, params, collections, x, recon, lc,
                           float(lc.disc_loss_weight) * disc_on, axis_name)
        return grads, new_colls, metrics

    # ---- evaluation ----
    def evaluate(self, state, split, workdir, step) -> dict:
        """Reconstruction PSNR/SSIM, per-depth codebook usage of both branches, and (with caption
        tokens) zero-shot/retrieval through the semantic path next to the frozen original tower."""
        params = eval_params(state)
        variables = {"params": params["tokenizer"], **state.collections.get("tokenizer", {})}
        metrics = self._recon_and_usage(variables, split, workdir, step)
        if self.text_tokenizer is None or self.model_cfg.siglip.text is None:
            return metrics

        def image(w, batch):
            x = as_float_images(batch["image"])
            return self.model.apply(w["tokenizer"], x, method=dt.DualToken.encode_image)["image_embeds"]

        def teacher(w, batch):
            pooled = self.teacher.apply({"params": w["teacher"]}, as_float_images(batch["image"]))["pooled"]
            return siglip_lib.l2_normalize(pooled)

        def text(w, tokens):
            return self.model.apply(w["tokenizer"], tokens, method=dt.DualToken.encode_text)

        weights = {"tokenizer": variables, "teacher": params["teacher"]}
        pairs = {"": encoder_pair(image, text, weights), "teacher_": encoder_pair(teacher, text, weights)}
        for prefix, enc in pairs.items():
            res = evaluate_image_text(enc, self.text_tokenizer, self.config.data, split, self.mesh,
                                      num_examples=self.eval_num_examples())
            metrics.update({prefix + k: v for k, v in res.items() if k != "num_examples"})
        return metrics

    def _recon_and_usage(self, variables, split, workdir, step) -> dict:
        c = self.model_cfg

        def reconstruct(v, x):
            out = self.model.apply(v, x)
            return out["recon"], {"pix": out["code_pix"], "sem": out["code_sem"]}

        books = {"pix": (c.pix_rq.depth, c.pix_rq.codebook_size), "sem": (c.sem_rq.depth, c.sem_rq.codebook_size)}
        res = evaluate_reconstruction(reconstruct, variables, books, self.config.data, split, self.mesh,
                                      num_examples=self.eval_num_examples(), grid_path=grid_path(workdir, split, step))
        metrics = {k: res[k] for k in ("psnr", "ssim", "num_examples")}
        for branch, rq in (("pix", c.pix_rq), ("sem", c.sem_rq)):
            metrics.update(depth_usage(res["counts"][branch], branch, shared=rq.shared_codebook))
        return metrics


__all__ = ["DualTokenTask", "model_config", "siglip_source_config"]
