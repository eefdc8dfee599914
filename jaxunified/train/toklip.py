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
(``precompute_cache``: codes, teacher embeddings, text embeddings); a batch may carry any of
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
import logging
import os
import pathlib
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.data.text import PIPELINE_FIELDS
from jaxunified.losses import contrastive, distill
from jaxunified.models import siglip as siglip_lib
from jaxunified.models import toklip as toklip_lib
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.nn.transformer import resize_posemb
from jaxunified.train.task import Task

log = logging.getLogger(__name__)

CACHE_FIELDS = ("codes", "teacher_embeds", "text_embeds")
# The data fields that decide which records (and pixels) a cache holds.
_CACHE_DATA_FIELDS = ("name", "path", "captions_file", "data_dir", "resolution", "num_train", "num_test", "shapes_seed")


def _plain(d) -> dict:
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d or {})
    out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    if "dtype" in out:
        out["dtype"] = jnp.dtype(out["dtype"])
    return out


# ---------------------------------------------------------------------------------------------
# Frozen parts


def load_tokenizer(tc) -> tuple[vqgan_lib.VQGANConfig, dict]:
    """The frozen VQ from ``config.tokenizer``: a ``vqgan`` run (``workdir`` + ``config`` spec), a
    checkpoint file (``kind`` "llamagen_vq" / "star_vq" / "ibq", ``path``) or, for smoke tests,
    ``"random"`` (``variant`` + ``overrides``). Returns the inference config and
    the params the encoder path needs (encoder, quant_conv, codebook; an EMA codebook moved to params)."""
    kind = tc.kind
    if kind == "workdir":
        from jaxunified.train.restore import load_config, read_run_config, restore_params
        from jaxunified.train.vqgan import model_config

        run_cfg = load_config(tc.config) if tc.get("config") else read_run_config(tc.workdir)
        vq_cfg = model_config(run_cfg)
        params, colls = restore_params(tc.workdir, run_cfg)
        params, colls = params["generator"], colls.get("generator", {})
    elif kind in ("llamagen_vq", "star_vq"):
        from jaxunified import convert

        module, variables = convert.load(kind, tc.path, **_plain(tc.get("overrides")))
        vq_cfg, params, colls = module.cfg, variables["params"], {k: v for k, v in variables.items() if k != "params"}
    elif kind == "ibq":
        from jaxunified.convert import vq as vq_convert
        from jaxunified.convert.common import read_state_dict
        from jaxunified.convert.toklip import taming_to_llamagen

        vq_cfg = toklip_lib.IBQ_262144
        sd = read_state_dict(tc.path)  # a Lightning checkpoint: loss/EMA entries are not the model
        sd = {taming_to_llamagen(k, len(vq_cfg.ch_mult)): v for k, v in sd.items()
              if k.split(".")[0] in ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")}
        params, colls = vq_convert.convert_state_dict(sd, vq_cfg, what=f"IBQ checkpoint {tc.path}")["params"], {}
    elif kind == "random":  # smoke tests only: an untrained tokenizer
        vq_cfg = vqgan_lib.get_config(tc.variant, **_plain(tc.get("overrides")))
        f = vq_cfg.downsample_factor
        variables = jax.jit(vqgan_lib.VQGAN(vq_cfg).init)(jax.random.key(int(tc.get("seed", 0))), jnp.zeros((1, f, f, 3)))
        variables = jax.device_get(nn.meta.unbox(variables))
        params, colls = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    else:
        raise ValueError(f"tokenizer.kind={kind!r}; use 'workdir', 'llamagen_vq', 'star_vq', 'ibq' or 'random'")
    quantize = dict(params.get("quantize", {}))
    if "embedding" not in quantize:  # EMA codebook: its statistics stay behind, the vectors move to params
        quantize = {"embedding": colls["codebook"]["quantize"]["embedding"]}
    keep = {k: params[k] for k in ("encoder", "quant_conv")}
    return toklip_lib.frozen_vq_config(vq_cfg), {**keep, "quantize": quantize}


def load_teacher(tc) -> tuple[siglip_lib.SigLIPConfig, dict]:
    """The frozen SigLIP teacher from ``config.teacher``: a ``siglip`` run (``workdir`` + ``config``),
    an HF SiglipModel folder (``kind="hf_siglip"``) or an open_clip SigLIP ``.pt`` (``kind="open_clip"``,
    e.g. the file TokLIP's covert.py writes; ``variant``/``image_size`` name its shape)."""
    kind = tc.kind
    if kind == "workdir":
        from jaxunified.train.siglip import load_siglip_from_workdir

        return load_siglip_from_workdir(tc.workdir, tc.get("config") or None)
    if kind == "hf_siglip":
        from jaxunified import convert

        module, variables = convert.load("hf_siglip", tc.path, vision=_plain(tc.get("vision")),
                                         text=_plain(tc.get("text")))
        return module.cfg, variables["params"]
    if kind == "open_clip":
        from jaxunified.convert.toklip import load_open_clip_siglip

        module, variables = load_open_clip_siglip(tc.path, tc.variant, tc.get("image_size") or None,
                                                  vision=_plain(tc.get("vision")), text=_plain(tc.get("text")))
        return module.cfg, variables["params"]
    if kind == "random":  # smoke tests only: an untrained teacher
        cfg = siglip_lib.get_config(tc.variant, vision=_plain(tc.get("vision")), text=_plain(tc.get("text")))
        r = cfg.vision.image_size
        variables = jax.jit(siglip_lib.SigLIP(cfg).init)(jax.random.key(int(tc.get("seed", 0))), jnp.zeros((1, r, r, 3)),
                                                         jnp.zeros((1, cfg.text.max_len), jnp.int32))
        return cfg, jax.device_get(nn.meta.unbox(variables))["params"]
    raise ValueError(f"teacher.kind={kind!r}; use 'workdir', 'hf_siglip', 'open_clip' or 'random'")


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
    from jaxunified.nn.transformer import stack_layers, unstack_layers

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
        from jaxunified.data.text import make_tokenizer

        self.loss_cfg = config.loss
        if self.loss_cfg.kind not in ("softmax", "sigmoid"):
            raise ValueError(f"loss.kind={self.loss_cfg.kind!r}; use 'softmax' (TokLIP) or 'sigmoid'")
        self.vq_cfg, self._vq_params = load_tokenizer(config.tokenizer)
        self.teacher_cfg, self._teacher_params = load_teacher(config.teacher)
        self.teacher = siglip_lib.SigLIP(self.teacher_cfg)
        r = int(config.data.resolution)
        self.cfg = student_config(self.teacher_cfg, self.vq_cfg, r, self.loss_cfg.kind, _plain(config.model.get("vision")),
                                  config.model.get("causal_stem", ()))
        self.model = toklip_lib.TokLIP(self.cfg)
        self.tokenizer = make_tokenizer(config.data.text)
        if self.tokenizer.max_len > self.cfg.text.max_len:
            raise ValueError(f"data.text.max_len={self.tokenizer.max_len} exceeds the text tower's {self.cfg.text.max_len}")

    # ---- variables ----
    def dummy_batch(self):
        r, b = int(self.config.data.resolution), int(self.config.data.batch_size)
        return {"image": np.zeros((b, r, r, 3), np.float32), "tokens": np.zeros((b, self.tokenizer.max_len), np.int32)}

    def _boxed_like(self, values, abstract):
        """Loaded arrays wearing the logical-partitioning boxes of ``abstract`` (so they shard like params)."""
        def one(box, v):
            return box.replace_boxed(jnp.asarray(v)) if isinstance(box, nn.meta.AxisMetadata) else jnp.asarray(v)

        return jax.tree.map(one, abstract, values, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))

    def init_variables(self, rng, batch):
        cfg = self.config
        # From images, so the tokenizer's encoder is part of the tree the loaded weights must fill.
        boxed = self.model.init(rng, jnp.asarray(batch["image"][:1]), method=toklip_lib.TokLIP.encode)
        boxed_params = dict(boxed["params"])
        tok_box = boxed_params.pop("tokenizer")
        student = nn.meta.unbox(boxed_params)
        teacher = self._teacher_params
        init = cfg.model.get("init", "teacher")
        if init == "teacher":
            student = student_from_teacher(student, teacher, self.cfg, self.teacher_cfg)
        elif init != "random":
            raise ValueError(f"model.init={init!r}; use 'teacher' or 'random'")
        scale = cfg.model.get("init_logit_scale")
        scale = float(teacher["logit_scale"]) if scale is None else float(scale)
        if self.loss_cfg.kind == "softmax":
            scale = float(np.clip(scale, 0.0, contrastive.CLIP_MAX_LOGIT_SCALE))
        student["logit_scale"] = jnp.asarray(scale, jnp.float32)
        if self.cfg.init_logit_bias is not None:
            student["logit_bias"] = jnp.asarray(teacher["logit_bias"], jnp.float32)
        student = self._boxed_like(student, boxed_params)
        # The teacher and tokenizer shard like the modules they belong to (FSDP at real sizes).
        t_abs = jax.eval_shape(lambda: self.teacher.init(
            jax.random.key(0), batch["image"][:1], batch["tokens"][:1]))["params"]
        frozen = {"tokenizer": self._boxed_like(self._vq_params, tok_box), "teacher": self._boxed_like(teacher, t_abs)}
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
        _, codes, _ = vqgan_lib.VQGAN(self.vq_cfg).apply({"params": frozen["tokenizer"]}, batch["image"],
                                                         method=vqgan_lib.VQGAN.encode)
        return jax.lax.stop_gradient(codes)

    def teacher_embeds(self, frozen, batch):
        if "teacher_embeds" in batch:
            return batch["teacher_embeds"]
        x = batch["image"]
        r = self.teacher_cfg.vision.image_size
        if x.shape[1:3] != (r, r):  # the legacy 432→378 student/teacher pairing; bilinear as the reference
            x = jax.image.resize(x, (x.shape[0], r, r, x.shape[3]), "bilinear")
        return self.teacher.apply({"params": frozen["teacher"]}, x, normalize=False, method=siglip_lib.SigLIP.encode_image)

    def caption_embeds(self, frozen, tokens):
        """The frozen text tower on ``tokens`` [N, L]: raw (unnormalised) caption embeddings [N, D]."""
        return self.teacher.apply({"params": frozen["teacher"]}, tokens, normalize=False,
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
        if lc.kind == "softmax":
            con, m = contrastive.clip_loss(z_img, z_txt, student["logit_scale"], axis_name=axis_name,
                                           negatives=negatives)
        else:
            con, m = contrastive.sigmoid_loss(z_img, z_txt, student["logit_scale"], student["logit_bias"],
                                              axis_name=axis_name, negatives=negatives)
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
        """The run's batches: images, or the cache in ``data.cache_dir`` (see ``precompute_cache``) for training."""
        from jaxunified.data.pipeline import build_dataset

        cache = self.config.data.get("cache_dir") or ""
        if split == "train" and cache:
            key = self.cache_key()
            if not cache_path(cache, split, key).exists():
                if not self.config.data.get("build_cache", False):
                    raise FileNotFoundError(f"no TokLIP cache at {cache_path(cache, split, key)}; build it with "
                                            "train.toklip.precompute_cache or set data.build_cache=True")
                precompute_cache(self, self.frozen_params(), split, cache, key=key)
            return cached_dataset(self.config.data, split, self.mesh, cache, key)
        return build_dataset(self.config.data, split, self.mesh)

    def frozen_params(self) -> dict:
        """The frozen tokenizer and teacher, host-resident (what ``collections["frozen"]`` holds)."""
        return {"tokenizer": self._vq_params, "teacher": self._teacher_params}

    def cache_key(self, frozen=None) -> str:
        """A digest of what the cached values depend on: the frozen weights (default the task's own),
        their configs and the data fields that pick the records (a retrained teacher or tokenizer
        never reads a stale cache)."""
        import hashlib

        h = hashlib.sha256()
        for leaf in jax.tree.leaves(nn.meta.unbox(self.frozen_params() if frozen is None else frozen)):
            a = np.ascontiguousarray(np.asarray(leaf))
            h.update(str((a.shape, a.dtype)).encode())
            h.update(a.tobytes())
        d = self.config.data
        text = d.get("text")
        # Hard negatives are drawn per step, never cached: they do not key the cache.
        text = None if text is None else {k: v for k, v in text.to_dict().items() if k not in PIPELINE_FIELDS}
        h.update(repr((self.vq_cfg, self.teacher_cfg, [d.get(k) for k in _CACHE_DATA_FIELDS], text)).encode())
        return h.hexdigest()[:16]

    # ---- evaluation ----
    def encoders(self, student, frozen, *, teacher: bool = False):
        @jax.jit
        def enc_img(batch):
            if teacher:
                z = self.teacher.apply({"params": frozen["teacher"]}, batch["image"], method=siglip_lib.SigLIP.encode_image)
                return z
            return toklip_lib.l2_normalize(self.student_embeds(student, frozen, self.codes(frozen, batch)))

        @jax.jit
        def enc_txt(tokens):
            return self.teacher.apply({"params": frozen["teacher"]}, tokens, method=siglip_lib.SigLIP.encode_text)

        return enc_img, enc_txt

    def evaluate(self, state, split, workdir, step) -> dict:
        from jaxunified.eval.image_text import evaluate_image_text

        student = (state.ema_params or state.params)["student"]
        frozen = state.collections["frozen"]
        limit = int(self.config.eval.get("num_examples", 0)) or None
        out = evaluate_image_text(*self.encoders(student, frozen), self.tokenizer, self.config.data, split,
                                  self.mesh, num_examples=limit)
        if self.config.eval.get("teacher", False):
            t = evaluate_image_text(*self.encoders(student, frozen, teacher=True), self.tokenizer, self.config.data,
                                    split, self.mesh, num_examples=limit)
            out.update({f"teacher_{k}": v for k, v in t.items() if k != "num_examples"})
        return out


# ---------------------------------------------------------------------------------------------
# Precomputed codes / teacher / text embeddings


class CachedSource:
    """A random-access source whose records carry the cached fields; ``drop`` removes fields the
    step no longer needs (``image``), so training reads no pixels."""

    def __init__(self, source, arrays: Mapping[str, np.ndarray], drop: tuple[str, ...] = ("image",)):
        n = len(source)
        for k, a in arrays.items():
            if len(a) != n:
                raise ValueError(f"cache field {k!r} has {len(a)} rows but the data source {n}; rebuild the cache")
        self.source, self.arrays, self.drop = source, dict(arrays), tuple(drop)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        record = self.source[index]
        if record is None:
            return None
        out = {k: v for k, v in record.items() if k not in self.drop}
        out.update({k: a[index] for k, a in self.arrays.items()})
        return out

    def __repr__(self):
        return f"CachedSource({self.source!r}, fields={sorted(self.arrays)})"


def cache_path(cache_dir, split: str, key: str = "") -> pathlib.Path:
    """``toklip_cache_<split>[_<key>].npz``; the task names its caches by ``TokLIPTask.cache_key``."""
    return pathlib.Path(cache_dir).expanduser() / f"toklip_cache_{split}{'_' + key if key else ''}.npz"


def in_order_batches(data_cfg, split: str, batch_size: int, source=None):
    """Every record of ``split`` (or of ``source``) once, in index order, in padded batches (with
    ``mask``). Returns ``(source, iterator)``."""
    from jaxunified.data import pipeline

    source = pipeline.make_source(data_cfg, split) if source is None else source
    transforms = pipeline.text_transforms(data_cfg, split, negatives=False)
    pixels = not (isinstance(source, CachedSource) and "image" in source.drop)
    loader = pipeline.make_loader(source, batch_size, seed=0, shuffle=False, num_epochs=1, drop_remainder=False,
                                  transforms=transforms, shard_by_process=False, normalize=pixels,
                                  read_threads=pipeline.read_threads(data_cfg))
    return source, pipeline.DataIterator(loader, batch_size, source=source)


def precompute_cache(task: TokLIPTask, frozen, split: str = "train", cache_dir=None,
                     fields: tuple[str, ...] = CACHE_FIELDS, batch_size: int = 256,
                     key: str | None = None) -> pathlib.Path:
    """Runs the frozen parts once over ``split`` and writes ``toklip_cache_<split>_<key>.npz``
    (``codes`` [N, h, w] int32, ``teacher_embeds`` / ``text_embeds`` [N, D] float32; ``key``
    defaults to ``task.cache_key(frozen)``, pass it when already computed). Valid while the data
    has no random augmentation (the built-in shapes pipeline has none). Single-process."""
    cfg = task.config
    cache_dir = cache_dir or cfg.data.get("cache_dir")
    if not cache_dir:
        raise ValueError("no cache directory: pass cache_dir= or set data.cache_dir")
    bad = sorted(set(fields) - set(CACHE_FIELDS))
    if bad:
        raise ValueError(f"unknown cache field(s) {bad}; known: {CACHE_FIELDS}")
    fns = {"codes": task.codes, "teacher_embeds": task.teacher_embeds, "text_embeds": task.text_embeds}
    frozen = nn.meta.unbox(frozen)
    step = jax.jit(lambda fr, b: {k: fns[k](fr, b) for k in fields})
    grid = task.cfg.grid
    _, data = in_order_batches(cfg.data, split, batch_size)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in fields}
    for host in data:
        b = {k: jnp.asarray(host[k]) for k in ("image", "tokens")}
        out = jax.device_get(step(frozen, b))
        keep = np.asarray(host["mask"], bool)
        for k in fields:
            parts[k].append(np.asarray(out[k])[keep])
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    if "codes" in arrays:
        arrays["codes"] = arrays["codes"].reshape(-1, grid, grid).astype(np.int32)
    path = cache_path(cache_dir, split, key or task.cache_key(frozen))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # atomic: an interrupted build never leaves a truncated cache behind
    log.info("wrote %s (%s)", path, {k: v.shape for k, v in arrays.items()})
    return path


def cached_dataset(data_cfg, split: str, mesh, cache_dir, key: str = ""):
    """Training batches whose records come from the cache (``precompute_cache``) instead of pixels,
    in the same shuffled order ``pipeline.build_dataset`` would give."""
    from jaxunified.data import pipeline

    path = cache_path(cache_dir, split, key)
    if not path.exists():
        raise FileNotFoundError(f"no TokLIP cache at {path}; build it with train.toklip.precompute_cache")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    pixels_needed = not {"codes", "teacher_embeds"} <= set(arrays)
    source = CachedSource(pipeline.make_source(data_cfg, split), arrays, drop=() if pixels_needed else ("image",))
    transforms = pipeline.text_transforms(data_cfg, split, tokens="text_embeds" not in arrays)
    bs = int(data_cfg.batch_size)
    loader = pipeline.make_loader(source, bs, seed=int(data_cfg.get("seed", 0)), shuffle=bool(data_cfg.get("shuffle", True)),
                                  num_epochs=data_cfg.get("num_epochs"), drop_remainder=True, transforms=transforms,
                                  worker_count=int(data_cfg.get("worker_count", 0)), normalize=pixels_needed,
                                  read_threads=pipeline.read_threads(data_cfg))
    return pipeline.DataIterator(loader, bs // jax.process_count(), source=source)


__all__ = [
    "CACHE_FIELDS",
    "CachedSource",
    "TokLIPTask",
    "cache_path",
    "cached_dataset",
    "in_order_batches",
    "load_teacher",
    "load_tokenizer",
    "precompute_cache",
    "student_config",
    "student_from_teacher",
]
