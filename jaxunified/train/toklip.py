"""Task ``toklip``: the causal token encoder trained by contrast with frozen text and distillation
from a frozen SigLIP teacher (TokLIP, arXiv 2505.05422).

    loss = contrastive(student image, frozen text)            softmax CLIP with learnable scale
                                                              (the reference), or sigmoid
         + 1000 · MSE(l2n(student pooled), l2n(teacher pooled))

Parameters (``params["student"]``, the only thing the optimizer sees): the code MLP
(``adapter``), the optional causal conv ``stem`` (``model.causal_stem``; not in TokLIP), the ViT
(blocks, position embedding, final norm, MAP head) and ``logit_scale`` (+ ``logit_bias`` for the
sigmoid option). The frozen parts — the VQ tokenizer (encoder and codebook; its decoder is not
loaded), the teacher SigLIP and its text tower, which is also the student's — live in
``collections["frozen"]``: no gradients, no optimizer state, no all-reduce, but saved with the run
so evaluation needs nothing else.

Frozen work is only what the loss uses: the tokenizer runs inference only, the teacher encodes
images only (the reference also encodes, all-gathers and scores texts with it), and the text
tower runs forward only. Each of the three can also be precomputed once per dataset
(``TokLIPTask.precompute_cache``, stored by ``data.cache``: codes, teacher embeddings, text embeddings); a batch may carry any of
``codes`` / ``teacher_embeds`` / ``text_embeds`` and the step then skips that computation, so a
cached batch and the image batch it came from give the same loss.

Initialisation (``model.init``): "teacher" copies the teacher's vision tower into the student
(position embedding resized to the code grid when the grids differ: the shapes pipeline's
teacher reads 4-px patches, the student 2×2-px VQ codes), as TokLIP starts from SigLIP2;
"random" starts from scratch. The MLP always starts from PyTorch's default init, as in the
reference. ``logit_scale`` starts from the teacher's, clamped to [0, ln 100].
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.data import cache
from jaxunified.data.pipeline import as_float_images
from jaxunified.eval.image_text import encoder_pair, evaluate_image_text
from jaxunified.losses import contrastive, distill
from jaxunified.models import siglip as siglip_lib
from jaxunified.models import toklip as toklip_lib
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.nn.transformer import resize_posemb, stack_layers, unstack_layers
from jaxunified.train import frozen as frozen_parts
from jaxunified.train import planning
from jaxunified.train.task import Task, eval_params, fill_boxes, kwargs

CACHE_FIELDS = ("codes", "teacher_embeds", "text_embeds")


# ---------------------------------------------------------------------------------------------
# Frozen parts


def load_tokenizer(tc) -> tuple[vqgan_lib.VQGANConfig, dict]:
    """The frozen VQ from ``config.tokenizer`` (``train.frozen.load_vq``). Returns the inference
    config and the params the encoder path needs (encoder, quant_conv, codebook; an EMA codebook
    moved to params)."""
    module, variables = frozen_parts.load_vq(tc)
    params, colls = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    quantize = dict(params.get("quantize", {}))
    if "embedding" not in quantize:  # EMA codebook: its statistics stay behind, the vectors move to params
        quantize = {"embedding": colls["codebook"]["quantize"]["embedding"]}
    keep = {k: params[k] for k in ("encoder", "quant_conv")}
    return toklip_lib.frozen_vq_config(module.cfg), {**keep, "quantize": quantize}


def load_teacher(tc) -> tuple[siglip_lib.SigLIPConfig, dict]:
    """The frozen SigLIP teacher from ``config.teacher`` (``train.frozen.load_siglip``)."""
    module, variables = frozen_parts.load_siglip(tc)
    return module.cfg, variables["params"]


def student_config(teacher: siglip_lib.SigLIPConfig, vq: vqgan_lib.VQGANConfig, resolution: int,
                   loss_kind: str, vision: Mapping | None = None, causal_stem=()) -> toklip_lib.TokLIPConfig:
    """The student: the teacher's ViT shape over the tokenizer's code grid, causal, with the teacher's text tower."""
    v = dataclasses.replace(teacher.vision, causal=True, pool="map", patch_size=vq.downsample_factor,
                            image_size=resolution, stem=(), **dict(vision or {}))
    bias = teacher.init_logit_bias if loss_kind == "sigmoid" else None
    stem = tuple((int(f), int(k)) for f, k in (causal_stem or ()))
    return toklip_lib.TokLIPConfig(vision=v, vq=vq, text=teacher.text, init_logit_bias=bias, causal_stem=stem)


def _is_pixel_stem(name: str) -> bool:
    """The vision tower's pixel-side layers (conv stem, patch conv), which a code-reading student lacks."""
    return name == "patch_embed" or name.startswith("stem_")


def student_from_teacher(student: dict, teacher: Mapping, cfg: toklip_lib.TokLIPConfig,
                         teacher_cfg: siglip_lib.SigLIPConfig) -> dict:
    """Copies the teacher's vision tower (less its pixel stem) into fresh student params; the
    position embedding is resized to the code grid and layers are (un)stacked to the student's scan."""
    tv = {k: v for k, v in teacher["vision"].items() if not _is_pixel_stem(k)}
    g, tg = cfg.grid, teacher_cfg.vision.grid
    enc = tv["encoder"]
    if cfg.vision.scan and not teacher_cfg.vision.scan:
        enc = stack_layers(enc, cfg.vision.depth)
    elif teacher_cfg.vision.scan and not cfg.vision.scan:
        enc = unstack_layers(enc, cfg.vision.depth)
    out = dict(student)
    out["vision"] = {**tv, "encoder": enc,
                     "pos_embedding": resize_posemb(jnp.asarray(tv["pos_embedding"]), (tg, tg), (g, g))}
    want = jax.tree.map(jnp.shape, student["vision"])
    got = jax.tree.map(jnp.shape, out["vision"])
    if want != got:
        raise ValueError("the teacher's vision tower does not fit the student's (width/depth/heads must match); "
                         "use model.init='random' or a matching teacher")
    return out


# ---------------------------------------------------------------------------------------------
# The task


class TokLIPTask(Task):
    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.loss_cfg = config.loss
        if self.loss_cfg.kind not in contrastive.LOSS_KINDS:
            raise ValueError(f"loss.kind={self.loss_cfg.kind!r}; use 'softmax' (TokLIP) or 'sigmoid'")
        self.vq_cfg, self._vq_params = load_tokenizer(config.tokenizer)
        self.teacher_cfg, self._teacher_params = load_teacher(config.teacher)
        self.teacher = siglip_lib.SigLIP(self.teacher_cfg)
        self.model_cfg = student_config(self.teacher_cfg, self.vq_cfg, int(config.data.resolution),
                                        self.loss_cfg.kind, kwargs(config.model.get("vision")),
                                        config.model.get("causal_stem", ()))
        self.model = toklip_lib.TokLIP(self.model_cfg)
        self.text_tokenizer = frozen_parts.text_tokenizer(config.data.text)
        if self.text_tokenizer.max_len > self.model_cfg.text.max_len:
            raise ValueError(f"data.text.max_len={self.text_tokenizer.max_len} exceeds the text tower's "
                             f"{self.model_cfg.text.max_len}")

    @classmethod
    def model_config(cls, config) -> toklip_lib.TokLIPConfig:
        return cls(config, None).model_cfg  # the student's shape follows its teacher and tokenizer

    def export(self, params, collections):
        """The whole TokLIP (its text tower is the frozen teacher's), as ``convert.load("toklip")`` gives."""
        frozen = collections["frozen"]
        variables = self._student_vars(params["student"], frozen)
        if self.model_cfg.text is not None:
            variables["params"]["text"] = frozen["teacher"]["text"]
        return self.model, variables

    # ---- variables ----
    def dummy_batch(self):
        r, b = int(self.config.data.resolution), int(self.config.data.batch_size)
        return {"image": np.zeros((b, r, r, 3), np.uint8),
                "tokens": np.zeros((b, self.text_tokenizer.max_len), np.int32)}

    def init_variables(self, rng, batch):
        cfg = self.config
        # From images, so the tokenizer's encoder is part of the tree the loaded weights must fill.
        boxed = self.model.init(rng, as_float_images(jnp.asarray(batch["image"][:1])), method=toklip_lib.TokLIP.encode)
        boxed_params = dict(boxed["params"])
        tok_box = boxed_params.pop("tokenizer")
        student = nn.meta.unbox(boxed_params)
        teacher = planning.materialize(self._teacher_params)
        init = cfg.model.get("init", "teacher")
        if init == "teacher":
            student = student_from_teacher(student, teacher, self.model_cfg, self.teacher_cfg)
        elif init != "random":
            raise ValueError(f"model.init={init!r}; use 'teacher' or 'random'")
        scale = cfg.model.get("init_logit_scale")
        scale = jnp.asarray(teacher["logit_scale"] if scale is None else float(scale), jnp.float32)
        if self.loss_cfg.kind == "softmax":
            scale = jnp.clip(scale, 0.0, contrastive.CLIP_MAX_LOGIT_SCALE)
        student["logit_scale"] = scale
        if self.model_cfg.init_logit_bias is not None:
            student["logit_bias"] = jnp.asarray(teacher["logit_bias"], jnp.float32)
        student = fill_boxes(boxed_params, student, "the TokLIP student")
        # The teacher and tokenizer shard like the modules they belong to (FSDP at real sizes).
        t_abs = jax.eval_shape(lambda: self.teacher.init(
            jax.random.key(0), as_float_images(jnp.asarray(batch["image"][:1])), batch["tokens"][:1]))["params"]
        frozen = {"tokenizer": fill_boxes(tok_box, self._vq_params, "the frozen VQ tokenizer"),
                  "teacher": fill_boxes(t_abs, teacher, "the frozen teacher")}
        return {"student": student}, {"frozen": frozen}

    def param_labels(self, params):
        # One group: the frozen parts are not params at all. (Going through the labelled path also
        # lets optax's weight-decay mask see plain leaves rather than partitioning boxes.)
        return {"student": jax.tree.map(lambda _: "student", params["student"])}

    # ---- the step ----
    def _student_vars(self, student, frozen):
        return {"params": {**student, "tokenizer": frozen["tokenizer"]}}

    def codes(self, frozen, batch):
        if "codes" in batch:
            return batch["codes"].astype(jnp.int32)
        _, codes, _ = vqgan_lib.VQGAN(self.vq_cfg).apply({"params": frozen["tokenizer"]}, as_float_images(batch["image"]),
                                                         method=vqgan_lib.VQGAN.encode)
        return jax.lax.stop_gradient(codes)

    def teacher_embeds(self, frozen, batch):
        if "teacher_embeds" in batch:
            return batch["teacher_embeds"]
        x = as_float_images(batch["image"])
        r = self.teacher_cfg.vision.image_size
        if x.shape[1:3] != (r, r):  # the legacy 432→378 student/teacher pairing; bilinear as the reference
            x = jax.image.resize(x, (x.shape[0], r, r, x.shape[3]), "bilinear")
        return self.teacher.apply({"params": frozen["teacher"]}, x, normalize=False, method=siglip_lib.SigLIP.encode_image)

    def caption_embeds(self, frozen, tokens, normalize: bool = False):
        """The frozen text tower on ``tokens`` [N, L]: caption embeddings [N, D], raw by default."""
        return self.teacher.apply({"params": frozen["teacher"]}, tokens, normalize=normalize,
                                  method=siglip_lib.SigLIP.encode_text)

    def text_embeds(self, frozen, batch):
        if "text_embeds" in batch:
            return batch["text_embeds"]
        return self.caption_embeds(frozen, batch["tokens"])

    def student_embeds(self, student, frozen, codes):
        return self.model.apply(self._student_vars(student, frozen), codes=codes,
                                method=toklip_lib.TokLIP.encode)["pooled"]

    def loss_and_metrics(self, student, frozen, batch, axis_name=None):
        lc = self.loss_cfg
        codes = self.codes(frozen, batch)
        t_img = jax.lax.stop_gradient(self.teacher_embeds(frozen, batch))
        z_txt = jax.lax.stop_gradient(self.text_embeds(frozen, batch))
        negatives = None
        if "neg_tokens" in batch:  # hard-negative captions through the frozen text tower (never cached)
            neg = batch["neg_tokens"]
            negatives = jax.lax.stop_gradient(self.caption_embeds(frozen, neg.reshape(-1, neg.shape[-1])))
        z_img = self.student_embeds(student, frozen, codes)
        con, m = contrastive.contrastive_loss(lc.kind, z_img, z_txt, student, negatives=negatives,
                                              axis_name=axis_name)
        mse = distill.embedding_mse(z_img, t_img)
        cos = distill.cosine_similarity(z_img, t_img)
        total = float(lc.contrastive_weight) * con + float(lc.distill_weight) * mse
        return total, {**m, "loss": total, "contrastive": con, "distill_mse": mse, "teacher_cos": cos}

    def grad_fn(self, params, collections, batch, rng, step, axis_name=None):
        frozen = collections["frozen"]
        (_, metrics), grads = jax.value_and_grad(
            lambda s: self.loss_and_metrics(s, frozen, batch, axis_name), has_aux=True)(params["student"])
        return {"student": grads}, collections, metrics

    # ---- data ----
    def build_dataset(self, split: str):
        """The run's batches: images, or the cache in ``data.cache_dir`` (``precompute_cache``) for training."""
        return self.cached_train_dataset(
            split, "toklip", self.cache_key,
            lambda path, key: self.precompute_cache(self.frozen_params(), split, path.parent, key=key))

    def frozen_params(self) -> dict:
        """The frozen tokenizer and teacher, host-resident (what ``collections["frozen"]`` holds)."""
        return {"tokenizer": self._vq_params, "teacher": self._teacher_params}

    def cache_key(self, frozen=None) -> str:
        """A digest of what the cached values depend on: the frozen weights (default the task's own),
        their configs and the data fields that pick the records (a retrained teacher or tokenizer
        never reads a stale cache)."""
        frozen = self.frozen_params() if frozen is None else frozen
        return cache.dataset_key(self.config.data, [nn.meta.unbox(frozen)], (self.vq_cfg, self.teacher_cfg))

    def _cache_fns(self) -> dict:
        """(frozen, batch) -> each cached field."""
        g = self.model_cfg.grid
        return {"codes": lambda fr, b: self.codes(fr, b).reshape(-1, g, g).astype(jnp.int32),
                "teacher_embeds": self.teacher_embeds, "text_embeds": self.text_embeds}

    def train_batch_example(self):
        batch = self.dummy_batch()
        if not self.config.data.get("cache_dir"):
            return batch
        return self.cached_fields_example(self._cache_fns(), nn.meta.unbox(self.frozen_params()), batch)

    def precompute_cache(self, frozen, split: str = "train", cache_dir=None, fields: tuple[str, ...] = CACHE_FIELDS,
                         batch_size: int = 256, key: str | None = None):
        """Runs the frozen parts once over ``split`` and writes ``toklip_cache_<split>_<key>.npz``
        (``codes`` [N, h, w] int32, ``teacher_embeds`` / ``text_embeds`` [N, D] float32; ``key``
        defaults to ``cache_key(frozen)``, pass it when already computed). Returns its path."""
        cache_dir = cache_dir or self.config.data.get("cache_dir")
        if not cache_dir:
            raise ValueError("no cache directory: pass cache_dir= or set data.cache_dir")
        bad = sorted(set(fields) - set(CACHE_FIELDS))
        if bad:
            raise ValueError(f"unknown cache field(s) {bad}; known: {CACHE_FIELDS}")
        fns = self._cache_fns()
        frozen = nn.meta.unbox(frozen)
        path = cache.cache_path(cache_dir, split, key or self.cache_key(frozen))
        return self.write_cache_fields({k: fns[k] for k in fields}, frozen, split, path, batch_size=batch_size)

    # ---- evaluation ----
    def encoders(self, student, frozen, *, teacher: bool = False):
        """The student's (or, with ``teacher``, the teacher's) image encoder beside the frozen text tower."""
        def image(w, batch):
            if teacher:
                return self.teacher.apply({"params": w["frozen"]["teacher"]}, as_float_images(batch["image"]),
                                          method=siglip_lib.SigLIP.encode_image)
            z = self.student_embeds(w["student"], w["frozen"], self.codes(w["frozen"], batch))
            return siglip_lib.l2_normalize(z)

        text = lambda w, tokens: self.caption_embeds(w["frozen"], tokens, normalize=True)  # noqa: E731
        return encoder_pair(image, text, {"student": student, "frozen": frozen})

    def evaluate(self, state, split, workdir, step) -> dict:
        student, frozen = eval_params(state)["student"], state.collections["frozen"]
        run = lambda enc: evaluate_image_text(enc, self.text_tokenizer, self.config.data, split, self.mesh,  # noqa: E731
                                              num_examples=self.eval_num_examples())
        out = run(self.encoders(student, frozen))
        if self.config.eval.get("teacher", False):
            t = run(self.encoders(student, frozen, teacher=True))
            out.update({f"teacher_{k}": v for k, v in t.items() if k != "num_examples"})
        return out
