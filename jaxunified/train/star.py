"""Task ``star``: STAR's text-to-image stage — stacked layers, adapter and image head learn to
generate a frozen VQ's codes on top of a frozen understanding LM (``models.star.STAR``).

    loss = CE(image head(stacked(base(prompt ++ adapter(codebook[codes[:-1]])))), codes)

Only ``params["star"]`` = {stacked, adapter, head} trains. The base LM and the VQ live in
``collections["frozen"]``: they are not in the optimizer state and no update can reach them, so
the base's understanding outputs stay bit-identical (tested).

The base (``base`` block): ``workdir`` (an ``mllm`` run: its LM), ``hf_qwen2`` (a HF folder),
``star`` (a STAR checkpoint through ``convert.load("star")``: base, stacked layers, adapter and
head, e.g. to continue a released model) or ``random`` (smoke tests). ``model.init_stacked``
"base_top" starts the stacked layers as copies of the base's top layers and final norm (the
reference's construction), "random" from scratch.

Prompts are STAR's chat layout (``data.shapes_chat.generation_ids``), left-padded so the image
codes follow every prompt directly. Prompt dropout (``model.prompt_dropout``) trains STAR's
unconditional row — the prompt between its first and last three tokens replaced by
``<|fim_pad|>`` — which is the guidance row at sampling time (``sample.star``).
``model.input_noise`` swaps that fraction of the teacher-forced input codes for other codes of the
batch (``losses.teacher_forcing``; the targets stay the true codes): training then sees the kind
of mistakes its sampling feeds back.

Stage 2 can train on simplified codes (``tokenizer.simplify_tol``, ``quant.simplify``, as the
``ar`` preset does) read from a cache built once per dataset (``data.cache_dir``); stage 3 takes
the scenes' own codes (an edit's source) from the same cache and either draws a new edit per row
and encodes its target in the step, or (``data.edits_per_scene`` > 0) draws that many edits of
each scene once and reads their instructions and target codes from a second cache. Edit options:
``data.edit_understanding`` (the source also as the base's own vision tokens, STAR's ViT block),
``data.edit_order`` ("instruction_first": the instruction before the source blocks),
``model.edit_positions`` ("shared": the output image at the source block's RoPE positions),
``tokenizer.edit_copy_tol`` (targets take the source's code wherever that decodes the same),
``model.edit_change_weight`` (the loss weight of the codes an edit changes).

Evaluation: teacher-forced loss and token accuracy over the split, then CFG samples for the
split's captions scored by shapes-GenEval per category, with PNG grids (``eval.t2i_report``);
edits (``eval.num_edits``) scored by ``data.shapes_edit.check_edit`` next to ``edit_ceiling``, the
score of the edited scenes' own VQ reconstructions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunified.data import cache, shapes, shapes_chat, shapes_edit
from jaxunified.data.pipeline import as_float_images, fixed_size_chunks, to_global
from jaxunified.eval import shapes_geneval, t2i_report
from jaxunified.eval.chat import text_answers
from jaxunified.eval.images import image_grid, save_png
from jaxunified.losses.teacher_forcing import noisy_inputs
from jaxunified.models import lm as lm_lib
from jaxunified.models import star as star_lib
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.quant import simplify
from jaxunified.sample import star as star_sample
from jaxunified.sample.lm import prompt_positions
from jaxunified.sample.strategies import guidance_from, strategy_from
from jaxunified.train import frozen as frozen_parts
from jaxunified.train import planning
from jaxunified.train.optim import FROZEN
from jaxunified.train.runs import load_run
from jaxunified.train.task import Task, eval_params, fill_boxes, kwargs
from jaxunified.train.vision_input import VisionInput

TRAINED = ("stacked", "adapter", "head")
# The edit cache's fields (STARTask.precompute_edit_cache), and its version: bump it when the edits
# drawn for a scene change (data/shapes_edit.py's proposals or wording, the renderer).
EDIT_INSTRUCTION, EDIT_CODES = "edit_instruction", "edit_codes"
EDIT_CACHE_VERSION = 1


def left_padded_prompt(ids, length: int) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) > length:
        raise ValueError(f"a prompt of {len(ids)} tokens exceeds data.max_prompt_len={length}")
    out = np.full((length,), shapes_chat.PAD, np.int32)
    out[length - len(ids):] = ids
    return out, out != shapes_chat.PAD  # PAD inside a prompt (edit_ids' instruction slots): masked


def draw_edit(labels, rng: np.random.Generator, resolution: int) -> tuple[str, np.ndarray | None]:
    """A random edit of the scene in ``labels`` (``data.shapes_edit``): its instruction and the edited
    scene rendered at ``resolution``, or ("", None) when the scene admits none."""
    edit = shapes_edit.random_edit(shapes.scene_objects(labels), rng)
    return ("", None) if edit is None else (edit.instruction, shapes.render_objects(edit.target, resolution))


class GenerationPrompts(grain.transforms.RandomMap):
    """Adds ``prompt``/``prompt_valid`` [max_prompt_len] (left-padded) and ``target_image``: the
    caption's t2i prompt and the image itself, or with probability ``edit_fraction`` an edit of the
    scene (``data.shapes_edit``): its instruction after the source image's block, and the edited
    scene rendered at ``resolution``. With probability ``dropout`` the prompt becomes STAR's
    unconditional row. When the image's codes come from a cache and pixels are not read, a
    text-to-image row's ``target_image`` is blank: the step takes its codes from the cache. Records
    carrying the edit cache's fields (``data.edits_per_scene``) get ``target_codes`` instead of
    ``target_image``: one of the scene's cached edits' codes, or the scene's own codes."""

    def __init__(self, max_len: int, dropout: float, edit_fraction: float = 0.0, edit_prompt=None,
                 resolution: int = 0):
        if edit_fraction and edit_prompt is None:
            raise ValueError("GenerationPrompts: edit_fraction > 0 needs edit_prompt= (STARTask.edit_prompt)")
        self.vocab, self.max_len, self.dropout = shapes_chat.ChatVocab(), max_len, dropout
        # instruction -> prompt ids: the one layout training and eval share (STARTask.edit_prompt)
        self.edit_prompt, self.edit_fraction, self.resolution = edit_prompt, edit_fraction, resolution

    def random_map(self, element, rng: np.random.Generator):
        element = dict(element)
        # edits drawn once per scene (STARTask.precompute_edit_cache): instructions and target codes
        instructions, edit_codes = element.pop(EDIT_INSTRUCTION, None), element.pop(EDIT_CODES, None)
        caption = element["caption"]
        ids = shapes_chat.generation_ids(self.vocab, caption.decode() if isinstance(caption, bytes) else str(caption))
        target = element.get("image")  # absent when the codes come from a cache
        instruction, target_codes = "", None
        if self.edit_fraction and rng.random() < self.edit_fraction:
            if edit_codes is not None:
                j = int(rng.integers(len(instructions)))
                instruction, target_codes = str(instructions[j]), edit_codes[j]  # "": the scene admits no edit
            else:
                instruction, image = draw_edit(element, rng, self.resolution or element["image"].shape[0])
                target = target if image is None else image
        if instruction:
            ids = self.edit_prompt(instruction)
        if edit_codes is not None:  # a text-to-image row's target is the scene itself
            target_codes = target_codes if instruction else element["codes"]
            target = None
        elif self.edit_fraction and target is None:  # every row of an edit batch carries a target image
            if not self.resolution:
                raise ValueError("GenerationPrompts: records without pixels need resolution=")
            target = np.zeros((self.resolution, self.resolution, 3), np.uint8)
        if self.dropout and rng.random() < self.dropout:
            ids = star_sample.uncond_ids(ids, shapes_chat.FIM_PAD, shapes_chat.GENERATION_TAIL, shapes_chat.IMAGE_BLOCK)
        prompt, valid = left_padded_prompt(ids, self.max_len)
        out = {**element, "prompt": prompt, "prompt_valid": valid}
        if target is not None:
            out["target_image"] = target
        if target_codes is not None:
            out["target_codes"] = target_codes
        return out


class STARTask(Task):
    cache_inputs = ("image",)  # the cache holds the (simplified) codes; prompts are drawn per step

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.vocab = shapes_chat.ChatVocab()
        self.vq, self._vq_vars = frozen_parts.load_vq(config.tokenizer)
        lm_cfg, self._base_params, self._star_params, understanding = frozen_parts.load_lm(config.base)
        init_from = config.model.get("init_from") or ""
        if init_from and not planning.is_shapes_only():  # the previous stage's run: its trained parts (loaded here, not under init's trace)
            _, _, prev = load_run(init_from)
            self._star_params = {k: prev["params"][k] for k in TRAINED}
        lm_cfg = dataclasses.replace(lm_cfg, **kwargs(config.model.get("lm_overrides")))
        if self._star_params is not None and self._star_params["head"]["bias"].shape[0] != self.vq.cfg.vq.codebook_size:
            raise ValueError("the STAR checkpoint's image head does not match the tokenizer's codebook size")
        self.model_cfg = star_lib.STARConfig(lm_cfg, int(config.model.num_stacked), self.vq.cfg,
                                             int(config.model.adapter_depth))
        self.model = star_lib.STAR(self.model_cfg)
        self.understanding = None
        if config.data.get("edit_understanding") and not planning.is_shapes_only():
            if understanding is None:
                raise ValueError("data.edit_understanding needs base.kind='workdir' naming an mllm run: its vision "
                                 "model and projector give the source image's understanding tokens")
            vision_block, self.understanding_model, self._projector_params = understanding
            if self.understanding_model.config.image_grid:
                raise ValueError("data.edit_understanding reads an mllm run whose image tokens took 3-D mRoPE "
                                 "positions (model.image_positions='mrope'); STAR's edit prompt numbers them as a "
                                 "sequence, so that run's understanding tokens are not supported here")
            self.understanding = VisionInput(vision_block, int(config.data.resolution))
        if self.edit_fraction or int(config.eval.get("num_edits", 0)):
            need = len(self.edit_prompt(""))  # every edit prompt has this length (padded instruction slots)
            if need > self.prompt_len:
                raise ValueError(f"edit prompts here take {need} tokens (the source's blocks and the instruction "
                                 f"slots); set data.max_prompt_len >= {need} (it is {self.prompt_len})")
        # Found here, not lazily: ``codes`` needs it while being traced.
        self.fill_code = -1
        if self.simplify_tol > 0:
            vq_vars = {"vq": nn.meta.unbox(self._vq_vars)}
            self.fill_code = frozen_parts.fill_code(config.data, jax.jit(lambda x: self.codes(vq_vars, x, False)),
                                                    self.vq.cfg.vq.codebook_size)

    @classmethod
    def model_config(cls, config) -> star_lib.STARConfig:
        return cls(config, None).model_cfg

    def variables(self, star_params, collections) -> dict:
        """The whole STAR's variables: trained parts, the frozen base and VQ (every VQ collection)."""
        frozen = collections["frozen"]
        out = {"params": {**star_params, "base": frozen["base"], "vq": frozen["vq"]["params"]}}
        for col, tree in frozen["vq"].items():
            if col != "params":
                out[col] = {"vq": tree}
        return out

    def export(self, params, collections):
        return self.model, jax.tree.map(np.asarray, self.variables(params["star"], collections))

    @property
    def grid(self) -> int:
        return int(self.config.data.resolution) // self.vq.cfg.downsample_factor

    @property
    def prompt_len(self) -> int:
        return int(self.config.data.max_prompt_len)

    # ---- variables ----
    def dummy_batch(self):
        r, b, p = int(self.config.data.resolution), int(self.config.data.batch_size), self.prompt_len
        return {"image": np.zeros((b, r, r, 3), np.uint8), "target_image": np.zeros((b, r, r, 3), np.uint8),
                "prompt": np.zeros((b, p), np.int32), "prompt_valid": np.ones((b, p), bool)}

    def train_batch_example(self):
        batch = self.dummy_batch()
        if self.config.data.get("cache_dir"):  # build_dataset's cached form
            cached = self.cached_batch_example(batch)
            if not self.cached_batches_keep_pixels:
                del batch["image"]
            if self.edit_fraction == 0 or self.edits_per_scene:
                del batch["target_image"]
            batch.update(cached)
            if self.edit_fraction and self.edits_per_scene:
                batch["target_codes"] = np.zeros_like(cached["codes"])
        return batch

    def init_variables(self, rng, batch):
        boxed = self.model.init(rng, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 2), jnp.int32), text_logits=True)
        trained = {k: boxed["params"][k] for k in TRAINED}
        plain = nn.meta.unbox(trained)
        if self._star_params is not None:
            plain = {k: self._star_params[k] for k in TRAINED}
        elif self.config.model.get("init_stacked", "base_top") == "base_top":
            plain = {**plain, "stacked": star_lib.init_stacked_from_base(
                self.model_cfg, {"base": planning.materialize(self._base_params)})["stacked"]}
        trained = {k: fill_boxes(trained[k], plain[k], f"STAR {k}") for k in TRAINED}
        r = int(self.config.data.resolution)
        vq_abs = jax.eval_shape(lambda: self.vq.init(jax.random.key(0), jnp.zeros((1, r, r, 3))))
        frozen = {"base": fill_boxes(boxed["params"]["base"], self._base_params, "the frozen base LM"),
                  "vq": fill_boxes(vq_abs, self._vq_vars, "the frozen VQ tokenizer")}
        if self.understanding is not None:
            frozen["understanding"] = {"vision": self.understanding.frozen_variables(),
                                       "projector": jax.tree.map(jnp.asarray, self._projector_params)}
        return {"star": trained}, {"frozen": frozen}

    @property
    def trained_parts(self) -> tuple[str, ...]:
        """``model.train``: the parts of ``TRAINED`` that learn; the rest keep their (``init_from``)
        weights and hold no optimizer state."""
        parts = tuple(self.config.model.get("train", TRAINED))
        if not parts or set(parts) - set(TRAINED):
            raise ValueError(f"model.train={parts!r}: name some of {', '.join(TRAINED)}")
        return parts

    def param_labels(self, params):
        return {"star": {k: jax.tree.map(lambda _: "star" if k in self.trained_parts else FROZEN, v)
                         for k, v in params["star"].items()}}

    # ---- the step ----
    def codes(self, frozen, images, simplified: bool = True) -> jax.Array:
        """[B, h·w] raster codes of ``images``; simplified (``quant.simplify``) when
        ``tokenizer.simplify_tol`` > 0 — the generation targets and an edit's source alike: the copy
        an edit learns is then code for code wherever the decoder allows (on the shapes tokenizer 30%
        of an edit's codes differ from its source's, 38% against the raw source codes)."""
        _, codes, _ = self.vq.apply(frozen["vq"], as_float_images(images), method=vqgan_lib.VQGAN.encode)
        codes = codes.astype(jnp.int32)  # [B, h, w]
        if simplified and self.simplify_tol > 0:
            codes = simplify.simplify_codes(lambda c: self.decode_images(frozen, c), codes, self.fill_code,
                                            self.simplify_tol)
        return jax.lax.stop_gradient(codes.reshape(codes.shape[0], -1))

    @property
    def simplify_tol(self) -> float:
        return float(self.config.tokenizer.get("simplify_tol", 0.0))

    @property
    def edit_fraction(self) -> float:
        return float(self.config.data.get("edit_fraction", 0.0))

    def understanding_embeds(self, frozen, images) -> jax.Array | None:
        """The source images' understanding tokens [B, M, H] in the base's input space (the
        understanding run's frozen vision model and projector), or None without
        ``data.edit_understanding``."""
        if self.understanding is None:
            return None
        u = frozen["understanding"]
        vectors = self.understanding.vectors(u["vision"], images)
        projected = self.understanding_model.apply({"params": {"projector": u["projector"]}}, vectors,
                                                   method="project")
        return jax.lax.stop_gradient(projected)

    @property
    def num_understanding(self) -> int:
        return 0 if self.understanding is None else int(self.understanding.num_tokens)

    @property
    def edit_instruction_first(self) -> bool:
        order = self.config.data.get("edit_order", "image_first")
        if order not in ("image_first", "instruction_first"):
            raise ValueError(f"data.edit_order={order!r}; use 'image_first' (STAR's) or 'instruction_first'")
        return order == "instruction_first"

    @functools.cached_property
    def edit_prompt(self):
        """An edit instruction -> its prompt ids (``shapes_chat.edit_ids`` laid out as this config says):
        the training rows and the eval's prompts both come from here."""
        return functools.partial(shapes_chat.edit_ids, self.vocab, num_image_tokens=self.grid ** 2,
                                 num_understanding=self.num_understanding,
                                 instruction_first=self.edit_instruction_first)

    @property
    def edit_copy_tol(self) -> float:
        return float(self.config.tokenizer.get("edit_copy_tol", 0.0))

    def edit_targets(self, frozen, images, source_codes) -> jax.Array:
        """An edit's target codes [B, h·w]: the edited ``images`` tokenized as ``codes`` does, then
        ``copy_aligned`` against the source's ``source_codes``."""
        return self.copy_aligned(frozen, self.codes(frozen, images), source_codes)

    def copy_aligned(self, frozen, codes, source_codes) -> jax.Array:
        """Edit targets [B, h·w] that take the source's code wherever the edited image still decodes
        within ``tokenizer.edit_copy_tol`` of its own codes (``quant.simplify`` with the source as
        the fill); ``codes`` as they are when that is 0. The VQ's codes depend on their
        surroundings: on the shapes tokenizer a one-object edit changes about a third of the codes,
        most of them in pixels the edit left alone, and predicting which synonym the encoder picks
        there is noise a copy cannot learn."""
        if self.edit_copy_tol <= 0:
            return codes
        g = self.grid
        aligned = simplify.simplify_codes(lambda c: self.decode_images(frozen, c), codes.reshape(-1, g, g),
                                          source_codes.reshape(-1, g, g), self.edit_copy_tol)
        return jax.lax.stop_gradient(aligned.reshape(codes.shape))

    @property
    def edit_source_id(self) -> int | None:
        """The source-image slot id when edits take the source block's positions (``model.edit_positions``)."""
        layout = self.config.model.get("edit_positions", "sequential")
        if layout not in ("sequential", "shared"):
            raise ValueError(f"model.edit_positions={layout!r}; use 'sequential' (STAR's) or 'shared'")
        return shapes_chat.IMAGE_PAD if layout == "shared" else None

    def logits(self, star_params, collections, batch, edits: bool | None = None):
        """Teacher-forced image logits [B, h·w, K] and the codes they predict (the target image's, or
        the cached ``target_codes``; with editing on — ``edits``, by default when the run trains
        edits — ``image`` is the source whose codes, or the cached ``codes``, fill the prompt's
        ``IMAGE_PAD`` slots)."""
        logits, codes, _ = self.teacher_forced(star_params, collections, batch, edits)
        return logits, codes

    def teacher_forced(self, star_params, collections, batch, edits: bool | None = None, noise_rng=None):
        """``logits``' (logits, codes) and ``changed`` [B, h·w]: an edit row's target codes that
        differ from the source's code at their cell (none in text-to-image rows; the VQ's codes are
        not local, so cells the edit left alone differ too unless ``tokenizer.edit_copy_tol`` aligns
        them). With ``noise_rng``, ``model.input_noise`` of the input codes are swapped
        (``noisy_inputs``). ``batch["codes"]``, when there, are the image's cached codes."""
        frozen = collections["frozen"]
        if edits is None:
            edits = self.edit_fraction > 0
        if not edits and "target_image" in batch:
            image_codes = self.codes(frozen, batch["target_image"])
        elif "codes" in batch:  # the image's codes, cached
            image_codes = batch["codes"].reshape(batch["codes"].shape[0], -1).astype(jnp.int32)
        else:
            image_codes = self.codes(frozen, batch["image"])
        codes, source = image_codes, {}
        if edits:  # the image is the source; the target's codes are new only in edit rows
            source = {"source_codes": image_codes,
                      "source_mask": batch["prompt"] == shapes_chat.IMAGE_PAD,
                      "source_embeds": self.understanding_embeds(frozen, batch.get("image"))}
            has_source = source["source_mask"].any(axis=1)[:, None]  # edit rows, not the t2i rows among them
            if "target_codes" in batch:  # the edited scenes' codes, cached (``data.edits_per_scene``)
                target = batch["target_codes"].reshape(image_codes.shape).astype(jnp.int32)
                codes = jnp.where(has_source, target, image_codes)
            elif "target_image" in batch:  # (a text-to-image batch has none)
                codes = jnp.where(has_source, self.edit_targets(frozen, batch["target_image"], image_codes),
                                  image_codes)
        valid = batch["prompt_valid"].astype(bool)
        b, n = codes.shape
        attention = jnp.concatenate([valid, jnp.ones((b, n), bool)], axis=1)
        positions = star_lib.sequence_positions(batch["prompt"], prompt_positions(valid), n, self.edit_source_id)
        noise = float(self.config.model.get("input_noise", 0.0))
        inputs = codes if noise_rng is None else noisy_inputs(codes, noise, noise_rng)
        out = self.model.apply(self.variables(star_params, collections), batch["prompt"], inputs,
                               attention_mask=attention, positions=positions, pixel_logits=False, **source)
        changed = (codes != source["source_codes"]) & has_source if edits else jnp.zeros(codes.shape, bool)
        return out["image_logits"], codes, changed

    def loss_and_metrics(self, star_params, collections, batch, edits: bool | None = None, noise_rng=None):
        """Per row: the image codes' cross-entropy — an edit's changed codes weigh
        ``model.edit_change_weight`` times the copied ones — and the token accuracy."""
        logits, codes, changed = self.teacher_forced(star_params, collections, batch, edits, noise_rng)
        w = 1.0 + (float(self.config.model.get("edit_change_weight", 1.0)) - 1.0) * changed
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, codes)
        ce = (ce * w).sum(axis=-1) / w.sum(axis=-1)
        acc = (jnp.argmax(logits, -1) == codes).mean(axis=-1)
        return ce, acc

    def grad_fn(self, params, collections, batch, rng, step, axis_name=None):
        def loss_fn(p):
            # A part that does not train is a constant: with the adapter fixed nothing trained feeds
            # the base, so the step runs no backward pass through it.
            p = {k: v if k in self.trained_parts else jax.lax.stop_gradient(v) for k, v in p.items()}
            ce, acc = self.loss_and_metrics(p, collections, batch, noise_rng=rng)
            loss = ce.mean()
            return loss, {"loss": loss, "token_acc": acc.mean()}

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params["star"])
        return {"star": grads}, collections, metrics

    # ---- data ----
    def build_dataset(self, split: str):
        train = split == "train"
        drop = float(self.config.model.prompt_dropout) if train else 0.0
        prompts = GenerationPrompts(self.prompt_len, drop, self.edit_fraction if train else 0.0, self.edit_prompt,
                                    int(self.config.data.resolution))
        # The scene's own codes (an edit's source, a text-to-image row's target) come from the cache;
        # edit targets from the edit cache, or drawn per row and encoded in the step.
        pixels = ("image",) if self.cached_batches_keep_pixels else ()
        edits = (self.edit_cache(split),) if train and self.edit_fraction and self.edits_per_scene else ()
        return self.cached_train_dataset(split, "star", self.cache_key, pixel_fields=("codes", *pixels),
                                         token_field="", extra_transforms=(prompts,), extra_paths=edits)

    @property
    def cached_batches_keep_pixels(self) -> bool:
        """Cached training batches still read the image: for an edit source's understanding tokens."""
        return self.understanding is not None and self.edit_fraction > 0

    def cache_key(self) -> str:
        simplified = ("simplify_tol", self.simplify_tol) if self.simplify_tol > 0 else ()
        return cache.dataset_key(self.config.data, [nn.meta.unbox(self._vq_vars)], (self.vq.cfg, *simplified))

    @property
    def edits_per_scene(self) -> int:
        """``data.edits_per_scene``: > 0, stage 3's training edits are drawn once, that many per scene,
        and their target codes cached (``precompute_edit_cache``; encoding and simplifying every row's
        target was a fifth of the shapes edit step); 0 draws a new edit per row and encodes it in the step."""
        k = int(self.config.data.get("edits_per_scene", 0))
        if k < 0 or (k and not self.config.data.get("cache_dir")):
            raise ValueError(f"data.edits_per_scene={k}: use 0, or a count with data.cache_dir set")
        return k

    def edit_cache_key(self) -> str:
        # The edits themselves are the generator's output: a change to it (EDIT_CACHE_VERSION) or to its
        # kinds never reads a stale cache.
        return cache.dataset_key(self.config.data, [nn.meta.unbox(self._vq_vars)],
                                 (self.vq.cfg, self.simplify_tol, self.edit_copy_tol, "edits", EDIT_CACHE_VERSION,
                                  shapes_edit.EDIT_KINDS, self.edits_per_scene, self.edit_seed))

    @property
    def edit_seed(self) -> int:
        return int(self.config.data.get("seed", 0))

    def edit_cache(self, split: str) -> pathlib.Path:
        """The path of ``split``'s edit cache, built first when missing and ``data.build_cache``."""
        path = cache.cache_path(self.config.data.cache_dir, split, self.edit_cache_key(), prefix="star_edits")
        return self.ensure_cache(path, lambda: self.precompute_edit_cache(split, path), "precompute_edit_cache")

    def precompute_edit_cache(self, split: str, path, batch_size: int = 256) -> pathlib.Path:
        """Draws ``edits_per_scene`` edits of every scene of ``split`` (seeded by ``data.seed`` and the
        scene's index: a rebuild draws the same ones), renders their targets and tokenizes them as the
        step would (``codes``, then ``copy_aligned`` against the scene's codes), and writes
        ``edit_instruction`` [N, k] ("" where the scene admits no edit) and ``edit_codes`` [N, k, h, w]."""
        k, r, g, seed = self.edits_per_scene, int(self.config.data.resolution), self.grid, self.edit_seed

        def tokenize(frozen, targets, sources):
            source_codes = jnp.repeat(self.codes(frozen, sources), k, axis=0) if self.edit_copy_tol > 0 else None
            return self.edit_targets(frozen, targets, source_codes).reshape(-1, k, g, g)

        tokenize, frozen = jax.jit(tokenize), self._frozen_host()

        def draw(host, first):
            keep = np.asarray(host["mask"], bool)
            instructions = np.full((len(keep), k), "", dtype=object)
            targets = np.zeros((len(keep), k, r, r, 3), np.uint8)
            for i in np.flatnonzero(keep):
                rng = np.random.default_rng([seed, first + i])
                labels = {f: v[i] for f, v in host.items()}
                for j in range(k):
                    instruction, image = draw_edit(labels, rng, r)
                    if image is not None:
                        instructions[i, j], targets[i, j] = instruction, image
            return {EDIT_INSTRUCTION: instructions.astype(str), "edit_targets": targets}

        def compute(batch):
            return {EDIT_CODES: tokenize(frozen, batch["edit_targets"].reshape(-1, r, r, 3), batch["image"])}

        cache.write_cache(compute, self.config.data, split, path, inputs=("image", "edit_targets"),
                          batch_size=batch_size, prepare=draw)
        return pathlib.Path(path)

    def _frozen_host(self) -> dict:
        return {"vq": nn.meta.unbox(self._vq_vars)}

    def _cache_fns(self) -> dict:
        """(frozen, batch) -> each cached field: the split's (simplified) codes [N, h, w]."""
        g = self.grid
        return {"codes": lambda fr, b: self.codes(fr, b["image"]).reshape(-1, g, g)}

    # ---- evaluation ----
    def decode_images(self, frozen, codes) -> jax.Array:
        g = self.grid
        return jnp.clip(self.vq.apply(frozen["vq"], codes.reshape(-1, g, g), method=vqgan_lib.VQGAN.decode_codes),
                        -1.0, 1.0)

    def sample(self, star_params, collections, prompts, *, key, source_images=None, batch_size: int = 0,
               sample_cfg=None):
        """Images [N, H, W, 3] in [-1, 1] and codes [N, h·w] for chat ``prompts`` (id lists; CFG per
        ``sample_cfg``, by default ``config.sample``); edits pass their ``source_images`` [N, H, W, 3]
        (uint8 or [-1, 1])."""
        sc = sample_cfg or self.config.sample
        frozen = collections["frozen"]
        variables = self.variables(star_params, collections)
        bs = batch_size or int(self.config.data.get("eval_batch_size", 64))
        # an edit's source enters tokenized as in training (``teacher_forced``)
        decode, encode = jax.jit(self.decode_images), jax.jit(self.codes)
        understand = jax.jit(self.understanding_embeds)
        images, codes = [], []
        for i, idx, n in fixed_size_chunks(len(prompts), bs):
            chunk = [list(prompts[j]) for j in idx]
            source = {}
            if source_images is not None:
                src = np.stack([np.asarray(source_images[j]) for j in idx])
                source = {"source_codes": encode(frozen, jnp.asarray(src)), "source_id": shapes_chat.IMAGE_PAD,
                          "source_embeds": understand(frozen, jnp.asarray(src)),
                          "uncond_keep": shapes_chat.IMAGE_BLOCK, "shared_positions": self.edit_source_id is not None}
            c = star_sample.generate_images(self.model, variables, chunk, num_tokens=self.grid ** 2,
                                            strategy=strategy_from(sc), guidance=guidance_from(sc),
                                            key=jax.random.fold_in(key, i), fim_pad_id=shapes_chat.FIM_PAD,
                                            keep_tail=shapes_chat.GENERATION_TAIL, pad_id=shapes_chat.PAD,
                                            bucket=self.prompt_len, masked_id=shapes_chat.PAD, **source)
            images.append(np.asarray(decode(frozen, c))[:n])
            codes.append(np.asarray(c)[:n])
        return np.concatenate(images), np.concatenate(codes)

    def t2i_prompts(self, captions) -> list[list[int]]:
        return [shapes_chat.generation_ids(self.vocab, c) for c in captions]

    def evaluate(self, state, split, workdir, step) -> dict:
        star_params = eval_params(state)["star"]
        colls = state.collections
        limit = self.eval_num_examples()
        bs = int(self.config.data.get("eval_batch_size", 64))
        _, data = cache.in_order_batches(self.config.data, split, bs)

        @jax.jit
        def tf_step(p, c, batch, mask):
            ce, acc = self.loss_and_metrics(p, c, batch)
            return (ce * mask).sum(), (acc * mask).sum(), mask.sum()

        tot = np.zeros(3)
        captions: list[str] = []
        scenes: list[dict] = []
        with jax.set_mesh(self.mesh):
            for host in data:
                mask = np.asarray(host["mask"], np.float32)
                if limit:
                    mask = mask * (np.cumsum(mask) <= limit - tot[2])
                caps = [str(c) for c in host["caption"]]
                for i in np.flatnonzero(mask):
                    captions.append(caps[i])
                    scenes.append({"image": host["image"][i], "objects": shapes.scene_objects(
                        {k: host[k][i] for k in ("obj_shape", "obj_color", "obj_size", "obj_center", "count")})})
                rows = [left_padded_prompt(ids, self.prompt_len) for ids in self.t2i_prompts(caps)]
                b = to_global({"image": host["image"], "prompt": np.stack([r[0] for r in rows]),
                               "prompt_valid": np.stack([r[1] for r in rows])}, self.mesh)
                tot += np.asarray(jax.device_get(tf_step(star_params, colls, b, jnp.asarray(mask))), np.float64)
                if limit and tot[2] >= limit:
                    break
        n = max(tot[2], 1.0)
        out = {"val_loss": tot[0] / n, "val_token_acc": tot[1] / n, "num_examples": tot[2]}
        key = jax.random.key(int(self.config.sample.seed))
        write = workdir is not None and jax.process_index() == 0
        per = int(self.config.eval.get("grid_per_category", 16))

        k = int(self.config.eval.get("num_samples", 0)) or len(captions)
        images, _ = self.sample(star_params, colls, self.t2i_prompts(captions[:k]), key=key)
        report = shapes_geneval.evaluate(images, captions[:k])
        out.update(t2i_report.geneval_metrics(report))
        out.update(self.geneval_ceiling(colls, [sc["image"] for sc in scenes[:k]], captions[:k]))
        if write:
            t2i_report.write_samples(workdir, split, step, images, captions[:k], report, per)

        num_edits = int(self.config.eval.get("num_edits", 0))
        if num_edits:
            out.update(self.evaluate_edits(star_params, colls, scenes[:num_edits], key, workdir if write else None,
                                           split, step))
        num_reasoning = int(self.config.eval.get("num_reasoning", 0))
        if num_reasoning:
            out.update(self.evaluate_reasoning(star_params, colls, scenes[:num_reasoning], key,
                                               workdir if write else None, split, step))
        return out

    def evaluate_edits(self, star_params, colls, scenes, key, workdir, split, step) -> dict:
        """Edit success (``shapes_edit.check_edit``) overall and per kind, one random edit per scene."""
        edits, sources = [], []
        for i, sc in enumerate(scenes):
            e = shapes_edit.random_edit(sc["objects"], np.random.default_rng(i))
            if e is not None:
                edits.append(e)
                sources.append(sc["image"])
        if not edits:
            return {}
        prompts = [self.edit_prompt(e.instruction) for e in edits]
        targets = [shapes.render_objects(e.target, int(self.config.data.resolution)) for e in edits]
        out = self.edit_teacher_forced(star_params, colls, prompts, sources, targets)
        out["edit_ceiling"] = self.edit_ceiling(colls, edits, sources, targets)
        sc = self.config.eval.get("edit_sample") or self.config.sample
        images, _ = self.sample(star_params, colls, prompts, key=key, source_images=np.stack(sources), sample_cfg=sc)
        checks = [shapes_edit.check_edit(im, e) for im, e in zip(images, edits)]
        if workdir is not None:
            n = min(16, len(edits))
            rows = []
            for j in range(n):  # source | edited | wanted
                rows += [as_unit(sources[j]), images[j], as_unit(targets[j])]
            save_png(pathlib.Path(workdir) / f"edits_{split}_{step:07d}.png", image_grid(np.stack(rows), ncol=6),
                     upscale=4)
            (pathlib.Path(workdir) / f"edits_{split}_{step:07d}.json").write_text(json.dumps(
                [{"instruction": e.instruction, "kind": e.kind, "passed": c.passed, "reason": c.reason}
                 for e, c in zip(edits, checks)], indent=0))
        return {**out, **shapes_edit.summarize(edits, checks)}

    def geneval_ceiling(self, colls, images, captions) -> dict:
        """``ceiling_*``: shapes-GenEval of the training targets' decodes (the images' simplified
        codes) — what a model that predicted every target code right would score."""
        bs = int(self.config.data.get("eval_batch_size", 64))
        rec = jax.jit(lambda frozen, x: self.decode_images(frozen, self.codes(frozen, x)))
        decodes = np.concatenate([np.asarray(rec(colls["frozen"], jnp.asarray(np.stack(images[i:i + bs]))))
                                  for i in range(0, len(images), bs)])
        return t2i_report.geneval_metrics(shapes_geneval.evaluate(decodes, captions), "ceiling")

    def edit_ceiling(self, colls, edits, sources, targets) -> float:
        """Edit success of the training targets' decodes (the edited scenes' codes, simplified and
        copy-aligned as in ``teacher_forced``): what a model that predicted every target code right
        would score (the tokenizer's blur of small shapes caps it)."""
        bs = int(self.config.data.get("eval_batch_size", 64))

        @jax.jit
        def rec(frozen, src, tgt):
            codes = self.edit_targets(frozen, tgt, self.codes(frozen, src))
            return self.decode_images(frozen, codes)

        images = np.concatenate([np.asarray(rec(colls["frozen"], jnp.asarray(np.stack(sources[i:i + bs])),
                                                jnp.asarray(np.stack(targets[i:i + bs]))))
                                 for i in range(0, len(targets), bs)])
        return float(np.mean([shapes_edit.check_edit(im, e).passed for im, e in zip(images, edits)]))

    def edit_teacher_forced(self, star_params, colls, prompts, sources, targets) -> dict:
        """Teacher-forced accuracy on edit rows: per code (``edit_token_acc``), on the codes equal to
        the source's (``edit_copy_acc``) and on those that differ (``edit_change_acc``), and the
        fraction of rows whose every code is the argmax (``edit_row_exact``: what greedy decoding
        would copy exactly)."""
        bs = int(self.config.data.get("eval_batch_size", 64))

        @jax.jit
        def step(p, c, batch):
            logits, codes, changed = self.teacher_forced(p, c, batch, edits=True)
            hit = jnp.argmax(logits, -1) == codes
            return hit, changed

        hits, changes = [], []
        with jax.set_mesh(self.mesh):
            for _, idx, n in fixed_size_chunks(len(prompts), bs):
                take = lambda xs: np.stack([xs[j] for j in idx])  # noqa: E731
                rows = [left_padded_prompt(prompts[j], self.prompt_len) for j in idx]
                batch = to_global({"image": take(sources), "target_image": take(targets),
                                   "prompt": np.stack([r[0] for r in rows]),
                                   "prompt_valid": np.stack([r[1] for r in rows])}, self.mesh)
                h, c = jax.device_get(step(star_params, colls, batch))
                hits.append(np.asarray(h)[:n])
                changes.append(np.asarray(c)[:n])
        hit, changed = np.concatenate(hits), np.concatenate(changes)
        rate = lambda m: float(hit[m].mean()) if m.any() else 0.0  # noqa: E731
        return {"edit_token_acc": float(hit.mean()), "edit_row_exact": float(hit.all(axis=1).mean()),
                "edit_copy_acc": rate(~changed), "edit_change_acc": rate(changed)}

    def evaluate_reasoning(self, star_params, colls, scenes, key, workdir, split, step) -> dict:
        """Reasoning mode on prompts that name an object indirectly ("a plus sign the color of
        grass"): shapes-GenEval of plain generation from the indirect prompt vs generation from the
        frozen base's text rewrite of it (STAR's ``generate_images_reasoning``)."""
        rng = np.random.default_rng(0)
        direct, indirect = [], []
        for sc in scenes:
            s, c = sc["objects"][int(rng.integers(len(sc["objects"])))][:2]
            direct.append(shapes.object_phrase(s, c))
            indirect.append(shapes_chat.indirect_caption(s, c, rng))
        base = lm_lib.DecoderLM(self.model_cfg.base)
        rewrites = text_answers(base, {"params": colls["frozen"]["base"]}, [f"rewrite {p}" for p in indirect], 6)
        out = {"reasoning_rewrite_acc": float(np.mean([r == d for r, d in zip(rewrites, direct)]))}
        for name, prompts in (("plain", indirect), ("reasoning", rewrites)):
            ids = [shapes_chat.generation_ids(self.vocab, p) if p else shapes_chat.generation_ids(self.vocab, q)
                   for p, q in zip(prompts, indirect)]
            images, _ = self.sample(star_params, colls, ids, key=key)
            report = shapes_geneval.evaluate(images, direct)
            out[f"geneval_indirect_{name}"] = float(report["overall"])
        if workdir is not None:
            (pathlib.Path(workdir) / f"reasoning_{split}_{step:07d}.json").write_text(json.dumps(
                [{"indirect": i, "rewrite": r, "direct": d} for i, r, d in zip(indirect, rewrites, direct)], indent=0))
        return out


def as_unit(image) -> np.ndarray:
    """uint8 or [-1, 1] float → float [-1, 1]."""
    image = np.asarray(image)
    return image.astype(np.float32) / 127.5 - 1.0 if image.dtype == np.uint8 else image.astype(np.float32)
