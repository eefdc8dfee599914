"""Task ``dualtoken``: DualToken tokenizer training (the official stage-0/1/2 recipe) and evaluation.

One generator step combines every term, each weighted in ``config.loss`` and logged on its own:

    sem_weight · (sem_token_weight · (MSE − cos)(zq_sem, teacher layer-``layer_sem`` tokens)
                  + sem_pooled_weight · (MSE − cos)(pooled, teacher pooled))
    + commit_pix_weight · commit_pix + commit_sem_weight · commit_sem
    + pixel_weight · MSE(recon, x) + perceptual_weight · LPIPS(recon, x)
    + disc_weight · g_weight · G(recon)                 (g_weight adaptive, clamped to [0.3, 10])
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
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.eval import image_metrics
from jaxunified.losses import distill
from jaxunified.losses import recon as recon_losses
from jaxunified.models import discriminator as disc_lib
from jaxunified.models import dualtoken as dt
from jaxunified.models import siglip as siglip_lib
from jaxunified.models.vqgan import VQGANConfig
from jaxunified.quant.rq import RQConfig
from jaxunified.train import gan
from jaxunified.train.metrics import image_grid, save_png
from jaxunified.train.optim import FROZEN
from jaxunified.train.task import Task
from jaxunified.train.vqgan import as_float_images


STAGES = (0, 1, 2)
# Parts the reference's stage 2 freezes: the pixel branch after the shared layers.
_PIXEL_BRANCH = ("prequant_pix", "prequant_shortcut", "postquant_pix", "post_quant_conv", "decoder")


def _plain(d) -> dict:
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d or {})
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


def _tower_overrides(m) -> tuple[dict, dict]:
    vision, text = _plain(m.get("vision")), _plain(m.get("text"))
    for d in (vision, text):
        if "dtype" in d:
            d["dtype"] = jnp.dtype(d["dtype"])
    vision["scan"] = False  # DualToken runs sub-ranges of the tower
    return vision, text


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
    vision, text = _tower_overrides(m)
    source = siglip_source(m)
    if source == "workdir":
        from jaxunified.train import siglip as siglip_task
        from jaxunified.train.restore import load_config, read_run_config

        spec = m.get("siglip_config") or ""
        run_cfg = load_config(spec) if spec else read_run_config(m.siglip_workdir)
        sc = siglip_task.model_config(run_cfg)
    elif source == "hf":
        import json

        from jaxunified.convert.siglip import config_from_hf

        folder = pathlib.Path(m.siglip_init_from).expanduser()
        sc = config_from_hf(json.loads((folder / "config.json").read_text()))
    elif m.get("siglip_variant"):
        sc = siglip_lib.get_config(m.siglip_variant, image_size=m.get("image_size") or None)
    else:
        raise ValueError(
            "config.model needs one of siglip_workdir (a trained `siglip` run), siglip_init_from (an HF SigLIP "
            "folder) or siglip_variant (a random tower), or a released `variant`"
        )
    sc = dataclasses.replace(sc, vision=dataclasses.replace(sc.vision, **vision))
    if sc.text is not None:
        sc = dataclasses.replace(sc, text=dataclasses.replace(sc.text, **text))
    return sc


def model_config(cfg) -> dt.DualTokenConfig:
    """The ``DualTokenConfig`` a run's ``config.model`` describes.

    ``model.variant`` names a released size (``models.dualtoken.VARIANTS``; only the tower overrides
    apply); otherwise the tower comes from ``siglip_source_config`` and the rest from the fields.
    """
    m = cfg.model
    if m.get("variant"):
        base = dt.get_config(m.variant)
        vision, text = _tower_overrides(m)
        sc = base.siglip
        sc = dataclasses.replace(sc, vision=dataclasses.replace(sc.vision, **vision))
        if sc.text is not None:
            sc = dataclasses.replace(sc, text=dataclasses.replace(sc.text, **text))
        return dataclasses.replace(base, siglip=sc)
    sc = siglip_source_config(cfg)
    latent = m.get("decoder_latent_shape")
    return dt.DualTokenConfig(
        siglip=sc,
        layer_recon=int(m.layer_recon),
        layer_sem=int(m.layer_sem),
        layer_shortcut=int(m.layer_shortcut) if m.get("layer_shortcut") else None,
        weight_shortcut=float(m.weight_shortcut),
        pix_rq=RQConfig(**_plain(m.pix_rq)),
        sem_rq=RQConfig(**_plain(m.sem_rq)),
        decoder=VQGANConfig(**_plain(m.decoder)),
        decoder_latent_shape=tuple(latent) if latent else None,
    )


def _fill(boxed, values, what: str):
    """Puts ``values`` (a plain tree) into the logical-axis boxes of ``boxed``; same structure and shapes."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    b_struct = jax.tree.structure(nn.meta.unbox(boxed))
    v_struct = jax.tree.structure(values)
    if b_struct != v_struct:
        raise ValueError(f"{what} does not have the model's parameter structure; check the tower config")

    def put(box, v):
        v = jnp.asarray(v)
        target = box.value if is_box(box) else box
        if v.shape != target.shape:
            raise ValueError(f"{what}: shape {v.shape} where the model has {target.shape}")
        v = v.astype(target.dtype)
        return box.replace_boxed(v) if is_box(box) else v

    return jax.tree.map(put, boxed, values, is_leaf=is_box)


def _unscanned(siglip_params: dict, sc: siglip_lib.SigLIPConfig) -> dict:
    """A scanned tower's stacked ``layers`` → ``layers_{i}`` (DualToken runs sub-ranges of layers)."""
    from jaxunified.nn.transformer import unstack_layers

    out = dict(siglip_params)
    for name, tc in (("vision", sc.vision), ("text", sc.text)):
        if tc is not None and name in out and "layers" in out[name]["encoder"]:
            out[name] = dict(out[name], encoder=unstack_layers(out[name]["encoder"], tc.depth))
    return out


class DualTokenTask(Task):
    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.lc = config.loss
        self.stage = int(config.model.get("stage", 1))
        if self.stage not in STAGES:
            raise ValueError(f"model.stage={self.stage}; use one of {STAGES}")
        self.model_cfg = model_config(config)
        self.model = dt.DualToken(self.model_cfg)
        self.teacher = siglip_lib.VisionTower(self.model_cfg.siglip.vision)
        self._init_cache = None
        self._check_teacher_text()
        # Read checkpoints now: init_variables also runs under jax.eval_shape, where a restore cannot.
        self._initial_weights()
        self.tokenizer = None
        text_cfg = config.data.get("text")
        if text_cfg is not None and text_cfg.get("tokenizer"):
            from jaxunified.data.text import make_tokenizer

            self.tokenizer = make_tokenizer(text_cfg)
        self.use_contrastive = float(self.lc.get("contrastive_weight", 0.0)) > 0
        if self.use_contrastive:
            if self.tokenizer is None or self.model_cfg.siglip.text is None:
                raise ValueError("loss.contrastive_weight > 0 needs data.text (caption tokens) and a text tower")
            if self.tokenizer.max_len > self.model_cfg.siglip.text.max_len:
                raise ValueError(
                    f"data.text.max_len={self.tokenizer.max_len} exceeds the text tower's max_len "
                    f"{self.model_cfg.siglip.text.max_len}"
                )
        self.use_disc = float(self.lc.disc_weight) > 0
        self.use_lpips = float(self.lc.perceptual_weight) > 0
        if self.use_disc:
            d = config.disc
            self.disc = disc_lib.NLayerDiscriminator(disc_lib.PatchGANConfig(
                ndf=int(d.ndf), n_layers=int(d.n_layers), negative_slope=float(d.get("negative_slope", 0.2))))
        if self.use_lpips:
            self.lpips, self._lpips_vars = gan.load_lpips(self.lc)

    def _check_teacher_text(self):
        """Caption tokens must be the ones the text tower was trained on, or zero-shot is noise."""
        m = self.config.model
        ours = self.config.data.get("text")
        if siglip_source(m) != "workdir" or ours is None or not ours.get("tokenizer"):
            return
        from jaxunified.train.restore import load_config, read_run_config

        spec = m.get("siglip_config") or ""
        theirs = (load_config(spec) if spec else read_run_config(m.siglip_workdir)).data.get("text")
        if theirs is None:
            return
        keys = ("tokenizer", "path", "max_len", "eos", "canonicalize")
        diff = {k: (ours.get(k), theirs.get(k)) for k in keys if ours.get(k) != theirs.get(k)}
        if diff:
            raise ValueError(
                f"data.text differs from the text tower's training run {m.siglip_workdir}: "
                + ", ".join(f"{k}={a!r} (run: {b!r})" for k, (a, b) in diff.items())
                + "; set data.text to the run's settings"
            )

    # ---- building ----
    def dummy_batch(self):
        r = int(self.config.data.resolution)
        b = int(self.config.data.batch_size)
        batch = {"image": np.zeros((b, r, r, 3), np.float32)}
        if self.use_contrastive:
            batch["tokens"] = np.zeros((b, self.tokenizer.max_len), np.int32)
        return batch

    def _initial_weights(self):
        """(SigLIP params or None, DualToken variables or None), read once per task."""
        if self._init_cache is None:
            m = self.config.model
            siglip_params = None
            source = siglip_source(m)
            if source == "workdir":
                from jaxunified.train.siglip import load_siglip_from_workdir

                _, siglip_params = load_siglip_from_workdir(m.siglip_workdir, m.get("siglip_config") or None)
                siglip_params = _unscanned(siglip_params, self.model_cfg.siglip)
            elif source == "hf":
                from jaxunified.convert.common import read_state_dict
                from jaxunified.convert.siglip import convert_state_dict

                siglip_params = convert_state_dict(read_state_dict(m.siglip_init_from), self.model_cfg.siglip)["params"]
            tok_vars = None
            if m.get("init_from"):
                from jaxunified import convert

                _, tok_vars = convert.load("dualtoken", m.init_from, **_plain(m.get("init_from_overrides")))
            self._init_cache = (siglip_params, tok_vars)
        return self._init_cache

    def init_variables(self, rng, batch):
        x = as_float_images(jnp.asarray(batch["image"][:1]))
        k_tok, k_disc, k_lp, k_q = jax.random.split(rng, 4)
        tokens = None
        if self.model_cfg.siglip.text is not None:
            tokens = jnp.zeros((1, self.model_cfg.siglip.text.max_len), jnp.int32)
        tv = self.model.init({"params": k_tok, "quant": k_q}, x, tokens)
        tparams, tcolls = tv["params"], {k: v for k, v in tv.items() if k != "params"}
        siglip_params, tok_vars = self._initial_weights()
        if siglip_params is not None:
            keep = {k: siglip_params[k] for k in tparams["siglip"] if k in siglip_params}
            missing = sorted(set(tparams["siglip"]) - set(keep))
            if missing:
                raise ValueError(f"the initial SigLIP weights lack {missing}")
            tparams = dict(tparams, siglip=_fill(tparams["siglip"], keep, "the initial SigLIP weights"))
        # The teacher is the original vision tower, frozen; a DualToken checkpoint (init_from) only
        # replaces the student's starting point.
        teacher = tparams["siglip"]["vision"]
        if tok_vars is not None:
            tparams = _fill(tparams, tok_vars["params"], f"model.init_from {self.config.model.init_from}")
            if "codebook" in tok_vars:
                tcolls = dict(tcolls, codebook=_fill(tcolls["codebook"], tok_vars["codebook"], "the codebooks"))
        params = {"tokenizer": tparams, "teacher": teacher}
        collections = {"tokenizer": tcolls}
        gan.init_disc_and_lpips(
            params, collections, x, k_disc, k_lp,
            disc=self.disc if self.use_disc else None,
            lpips=self.lpips if self.use_lpips else None,
            lpips_vars=self._lpips_vars if self.use_lpips else None,
        )
        return params, collections

    def _frozen(self, keys: list) -> bool:
        m, c = self.config.model, self.model_cfg
        if keys[0] == "siglip":
            part = keys[1]
            if part == "text":
                return not m.get("train_text", False)
            if part in ("logit_scale", "logit_bias"):
                return not m.get("train_logits", False)
            if part == "vision" and self.stage in (0, 2):
                upto = c.layer_sem if self.stage == 0 else (c.layer_shortcut or 0)
                if keys[2] in ("patch_embed", "pos_embedding") or keys[2].startswith("stem_"):
                    return True
                if keys[2] == "encoder" and keys[3].startswith("layers_"):
                    return int(keys[3].split("_")[1]) < upto
            return False
        return self.stage == 2 and keys[0] in _PIXEL_BRANCH

    def param_labels(self, params):
        def label(path, _):
            keys = [getattr(k, "key", None) for k in path]
            return FROZEN if self._frozen([k for k in keys if k is not None]) else "gen"

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
                from jaxunified.train.siglip import siglip_loss

                c_loss, c_metrics = siglip_loss(lc.contrastive_kind, out["pooled"], out["text_embeds"], tp["siglip"],
                                                axis_name)
                m.update(contrastive=c_loss, i2t_acc=c_metrics["i2t_acc"], t2i_acc=c_metrics["t2i_acc"])
                total = total + float(lc.contrastive_weight) * c_loss
            if self.use_disc:
                def gan_fn(r):
                    logits, _ = gan.disc_logits(self.disc, params["disc"], collections["disc"], r, axis_name)
                    return recon_losses.generator_loss(logits, kind=lc.gen_loss)

                g = gan_fn(recon)
                if lc.adaptive_weight:
                    w = gan.adaptive_gan_weight(
                        tp["decoder"]["conv_out"], out["dec_features"], lambda r: self._nll(params, x, r), gan_fn,
                        axis_name=axis_name, min_weight=float(lc.adaptive_min), max_weight=float(lc.adaptive_max))
                else:
                    w = jnp.ones((), jnp.float32)
                total = total + float(lc.disc_weight) * disc_on * w * g
                m.update(g_loss=g, g_weight=w)
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
        if self.use_disc:
            slope = float(lc.get("hinge_slope", 0.0))
            if lc.disc_loss == "hinge":
                fn = lambda r, f: recon_losses.hinge_d_loss(r, f, negative_slope=slope)  # noqa: E731
            else:
                fn = recon_losses.vanilla_d_loss
            weight = float(lc.disc_loss_weight) * disc_on
            grads["disc"], new_colls["disc"], d_metrics = gan.disc_grads(
                self.disc, params["disc"], collections["disc"], x, jax.lax.stop_gradient(recon), fn, weight, axis_name)
            metrics.update(d_metrics)
        if self.use_lpips:
            grads["lpips"] = jax.tree.map(jnp.zeros_like, params["lpips"])
        return grads, new_colls, metrics

    # ---- evaluation ----
    def eval_params(self, state):
        return state.ema_params if state.ema_params else state.params

    def evaluate(self, state, split, workdir, step) -> dict:
        """Reconstruction PSNR/SSIM, per-depth codebook usage of both branches, and (with caption
        tokens) zero-shot/retrieval through the semantic path next to the frozen original tower."""
        params = self.eval_params(state)
        tparams, tcolls = params["tokenizer"], state.collections.get("tokenizer", {})
        metrics = self._recon_and_usage(tparams, tcolls, split, workdir, step)
        if self.tokenizer is not None and self.model_cfg.siglip.text is not None:
            from jaxunified.eval.image_text import evaluate_image_text

            variables = {"params": tparams, **tcolls}
            limit = int(self.config.eval.get("num_examples", 0)) or None

            # Weights are arguments, not closed-over constants: at So400m size they are gigabytes.
            @jax.jit
            def image_embeds(v, batch):
                x = as_float_images(batch["image"])
                return self.model.apply(v, x, method=dt.DualToken.encode_image)["image_embeds"]

            @jax.jit
            def teacher_embeds(vp, batch):
                x = as_float_images(batch["image"])
                return siglip_lib.l2_normalize(self.teacher.apply({"params": vp}, x)["pooled"])

            @jax.jit
            def text_embeds(v, tokens):
                return self.model.apply(v, tokens, method=dt.DualToken.encode_text)

            enc_img = lambda batch: image_embeds(variables, batch)  # noqa: E731
            enc_teacher = lambda batch: teacher_embeds(params["teacher"], batch)  # noqa: E731
            enc_txt = lambda tokens: text_embeds(variables, tokens)  # noqa: E731
            for prefix, enc in (("", enc_img), ("teacher_", enc_teacher)):
                res = evaluate_image_text(enc, enc_txt, self.tokenizer, self.config.data, split, self.mesh,
                                          num_examples=limit)
                metrics.update({prefix + k: v for k, v in res.items() if k != "num_examples"})
        return metrics

    def _recon_and_usage(self, tparams, tcolls, split, workdir, step) -> dict:
        from jaxunified.data.pipeline import build_dataset, to_global

        c = self.model_cfg
        variables = {"params": tparams, **tcolls}

        def counts_of(codes, depth, k, mask):
            # [B, h, w, D] codes → [D, K] histogram over the valid rows.
            flat = codes.reshape(codes.shape[0], -1, depth)
            w = jnp.broadcast_to(mask[:, None, None].astype(jnp.float32), flat.shape)
            onehot_idx = flat.transpose(2, 0, 1).reshape(depth, -1)
            return jax.vmap(lambda i, ww: jnp.zeros((k,), jnp.float32).at[i].add(ww))(
                onehot_idx, w.transpose(2, 0, 1).reshape(depth, -1))

        @jax.jit
        def eval_step(variables, images, mask):
            x = as_float_images(images)
            out = self.model.apply(variables, x)
            recon = jnp.clip(out["recon"], -1.0, 1.0)
            return {
                "psnr": image_metrics.psnr(recon, x) * mask,
                "ssim": image_metrics.ssim(recon, x) * mask,
                "mask": mask.astype(jnp.float32),
                "counts_pix": counts_of(out["code_pix"], c.pix_rq.depth, c.pix_rq.codebook_size, mask),
                "counts_sem": counts_of(out["code_sem"], c.sem_rq.depth, c.sem_rq.codebook_size, mask),
                "recon": recon,
            }

        data = build_dataset(self.config.data, split, self.mesh)
        tot = {"psnr": 0.0, "ssim": 0.0, "n": 0.0}
        counts = {"pix": 0.0, "sem": 0.0}
        limit = int(self.config.eval.get("num_examples", 0)) or None
        first = None
        with jax.set_mesh(self.mesh):
            for host in data:
                b = to_global(host, self.mesh)
                mask = b.get("mask", jnp.ones((b["image"].shape[0],), jnp.bool_))
                out = jax.device_get(eval_step(variables, b["image"], mask))
                for k in ("psnr", "ssim"):
                    tot[k] += float(out[k].sum())
                tot["n"] += float(out["mask"].sum())
                counts["pix"] = counts["pix"] + np.asarray(out["counts_pix"], np.float64)
                counts["sem"] = counts["sem"] + np.asarray(out["counts_sem"], np.float64)
                if first is None:
                    first = (np.asarray(jax.device_get(b["image"])), out["recon"])
                if limit and tot["n"] >= limit:
                    break
        n = max(tot["n"], 1.0)
        metrics = {"psnr": tot["psnr"] / n, "ssim": tot["ssim"] / n, "num_examples": n}
        for branch in ("pix", "sem"):
            stats = image_metrics.codebook_stats(np.asarray(counts[branch]))
            usage, ppl = np.asarray(stats["usage"]), np.asarray(stats["perplexity"])
            metrics[f"usage_{branch}"] = float(usage.mean())
            if (c.pix_rq if branch == "pix" else c.sem_rq).shared_codebook:
                # One codebook serves every depth: the fraction of it any depth uses.
                metrics[f"usage_{branch}_all"] = float(np.mean(np.asarray(counts[branch]).sum(0) > 0))
            for d, (u, p) in enumerate(zip(usage, ppl)):
                metrics[f"usage_{branch}_d{d}"] = float(u)
                metrics[f"perplexity_{branch}_d{d}"] = float(p)
        if first is not None and jax.process_index() == 0:
            real, rec = first
            k = min(16, real.shape[0])
            real = np.asarray(as_float_images(jnp.asarray(real[:k])))
            save_png(pathlib.Path(workdir) / f"recon_{split}_{step:07d}.png",
                     image_grid(np.concatenate([real, rec[:k]], axis=0), ncol=k), upscale=4)
        return metrics


__all__ = ["DualTokenTask", "model_config", "siglip_source_config"]
