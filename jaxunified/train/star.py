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

Evaluation: teacher-forced loss and token accuracy over the split, then CFG samples for the
split's captions scored by shapes-GenEval per category, with PNG grids (``eval.t2i_report``).
"""

from __future__ import annotations

import dataclasses
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunified import convert
from jaxunified.data import cache, pipeline, shapes_chat
from jaxunified.data.pipeline import as_float_images, to_global
from jaxunified.eval import shapes_geneval, t2i_report
from jaxunified.models import lm as lm_lib
from jaxunified.models import star as star_lib
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.sample import star as star_sample
from jaxunified.sample.strategies import guidance_from, strategy_from
from jaxunified.train import frozen as frozen_parts
from jaxunified.train.runs import load_run
from jaxunified.train.task import Task, eval_params, fill_boxes, kwargs, host_variables

BASE_KINDS = ("workdir", "hf_qwen2", "star", "random")
TRAINED = ("stacked", "adapter", "head")


def left_padded_prompt(ids, length: int) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) > length:
        raise ValueError(f"a prompt of {len(ids)} tokens exceeds data.max_prompt_len={length}")
    out = np.full((length,), shapes_chat.PAD, np.int32)
    valid = np.zeros((length,), bool)
    out[length - len(ids):], valid[length - len(ids):] = ids, True
    return out, valid


class GenerationPrompts(grain.transforms.RandomMap):
    """Adds ``prompt``/``prompt_valid`` [max_prompt_len] (left-padded), STAR's unconditional row
    with probability ``dropout``."""

    def __init__(self, max_len: int, dropout: float):
        self.vocab, self.max_len, self.dropout = shapes_chat.ChatVocab(), max_len, dropout

    def random_map(self, element, rng: np.random.Generator):
        caption = element["caption"]
        ids = shapes_chat.generation_ids(self.vocab, caption.decode() if isinstance(caption, bytes) else str(caption))
        if self.dropout and rng.random() < self.dropout:
            ids = star_sample.uncond_ids(ids, shapes_chat.FIM_PAD, shapes_chat.GENERATION_TAIL)
        prompt, valid = left_padded_prompt(ids, self.max_len)
        return {**element, "prompt": prompt, "prompt_valid": valid}


def _load_base(bc):
    """(LMConfig, base params, STAR params or None) of the ``base`` block."""
    kind = bc.kind
    if kind == "workdir":
        _, module, variables = load_run(bc.workdir, bc.get("config") or None)
        lm_cfg = getattr(module.config, "lm", module.config)  # an MLLM run's LM, or an LM run
        params = variables["params"]
        return lm_cfg, params.get("lm", params), None
    if kind == "hf_qwen2":
        module, variables = convert.load("hf_qwen2", bc.path, **kwargs(bc.get("overrides")))
        return module.config, variables["params"], None
    if kind == "star":
        module, variables = convert.load("star", bc.path, **kwargs(bc.get("overrides")))
        return module.config.base, variables["params"]["base"], variables["params"]
    if kind == "random":  # smoke tests only
        cfg = lm_lib.variant(bc.variant, **{**kwargs(bc.get("overrides")), "vocab_size": shapes_chat.ChatVocab().size})
        model = lm_lib.DecoderLM(cfg)
        return cfg, host_variables(model, jax.random.key(int(bc.get("seed", 0))), jnp.zeros((1, 4), jnp.int32))[
            "params"], None
    raise ValueError(f"base.kind={kind!r}; use one of {', '.join(BASE_KINDS)}")


class STARTask(Task):
    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.vocab = shapes_chat.ChatVocab()
        self.vq, self._vq_vars = frozen_parts.load_vq(config.tokenizer)
        lm_cfg, self._base_params, self._star_params = _load_base(config.base)
        lm_cfg = dataclasses.replace(lm_cfg, **kwargs(config.model.get("lm_overrides")))
        if self._star_params is not None and self._star_params["head"]["bias"].shape[0] != self.vq.cfg.vq.codebook_size:
            raise ValueError("the STAR checkpoint's image head does not match the tokenizer's codebook size")
        self.model_cfg = star_lib.STARConfig(lm_cfg, int(config.model.num_stacked), self.vq.cfg,
                                             int(config.model.adapter_depth))
        self.model = star_lib.STAR(self.model_cfg)

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
        return {"image": np.zeros((b, r, r, 3), np.float32), "prompt": np.zeros((b, p), np.int32),
                "prompt_valid": np.ones((b, p), bool)}

    def init_variables(self, rng, batch):
        boxed = self.model.init(rng, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 2), jnp.int32), text_logits=True)
        trained = {k: boxed["params"][k] for k in TRAINED}
        plain = nn.meta.unbox(trained)
        if self._star_params is not None:
            plain = {k: self._star_params[k] for k in TRAINED}
        elif self.config.model.get("init_stacked", "base_top") == "base_top":
            plain = {**plain, "stacked": star_lib.init_stacked_from_base(
                self.model_cfg, {"base": self._base_params})["stacked"]}
        trained = {k: fill_boxes(trained[k], plain[k], f"STAR {k}") for k in TRAINED}
        r = int(self.config.data.resolution)
        vq_abs = jax.eval_shape(lambda: self.vq.init(jax.random.key(0), jnp.zeros((1, r, r, 3))))
        frozen = {"base": fill_boxes(boxed["params"]["base"], self._base_params, "the frozen base LM"),
                  "vq": fill_boxes(vq_abs, self._vq_vars, "the frozen VQ tokenizer")}
        return {"star": trained}, {"frozen": frozen}

    def param_labels(self, params):
        return {"star": jax.tree.map(lambda _: "star", params["star"])}

    # ---- the step ----
    def codes(self, frozen, images) -> jax.Array:
        variables = frozen["vq"]
        _, codes, _ = self.vq.apply(variables, as_float_images(images), method=vqgan_lib.VQGAN.encode)
        return jax.lax.stop_gradient(codes.reshape(codes.shape[0], -1).astype(jnp.int32))

    def logits(self, star_params, collections, batch):
        """Teacher-forced image logits [B, h·w, K] and the codes they predict."""
        codes = batch["codes"] if "codes" in batch else self.codes(collections["frozen"], batch["image"])
        valid = batch["prompt_valid"].astype(bool)
        b, n = codes.shape
        attention = jnp.concatenate([valid, jnp.ones((b, n), bool)], axis=1)
        pads = jnp.sum(~valid, axis=1, keepdims=True)
        positions = jnp.maximum(jnp.arange(valid.shape[1] + n)[None] - pads, 0)
        out = self.model.apply(self.variables(star_params, collections), batch["prompt"], codes,
                               attention_mask=attention, positions=positions)
        return out["image_logits"], codes

    def loss_and_metrics(self, star_params, collections, batch):
        logits, codes = self.logits(star_params, collections, batch)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, codes).mean(axis=-1)
        acc = (jnp.argmax(logits, -1) == codes).mean(axis=-1)
        return ce, acc

    def grad_fn(self, params, collections, batch, rng, step, axis_name=None):
        def loss_fn(p):
            ce, acc = self.loss_and_metrics(p, collections, batch)
            loss = ce.mean()
            return loss, {"loss": loss, "token_acc": acc.mean()}

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params["star"])
        return {"star": grads}, collections, metrics

    # ---- data ----
    def build_dataset(self, split: str):
        drop = float(self.config.model.prompt_dropout) if split == "train" else 0.0
        return pipeline.build_dataset(self.config.data, split, self.mesh,
                                      extra_transforms=(GenerationPrompts(self.prompt_len, drop),))

    # ---- evaluation ----
    def decode_images(self, frozen, codes) -> jax.Array:
        g = self.grid
        return jnp.clip(self.vq.apply(frozen["vq"], codes.reshape(-1, g, g), method=vqgan_lib.VQGAN.decode_codes),
                        -1.0, 1.0)

    def sample(self, star_params, collections, captions, *, key, batch_size: int = 0):
        """Images [N, H, W, 3] in [-1, 1] and codes [N, h·w] for ``captions`` (CFG per ``config.sample``)."""
        sc = self.config.sample
        variables = self.variables(star_params, collections)
        bs = batch_size or int(self.config.data.get("eval_batch_size", 64))
        decode = jax.jit(self.decode_images)
        images, codes = [], []
        for i in range(0, len(captions), bs):
            chunk = list(captions[i:i + bs])
            n = len(chunk)
            chunk += [chunk[-1]] * (bs - n)  # one compiled shape
            prompts = [shapes_chat.generation_ids(self.vocab, c) for c in chunk]
            c = star_sample.generate_images(self.model, variables, prompts, num_tokens=self.grid ** 2,
                                            strategy=strategy_from(sc), guidance=guidance_from(sc),
                                            key=jax.random.fold_in(key, i), fim_pad_id=shapes_chat.FIM_PAD,
                                            keep_tail=shapes_chat.GENERATION_TAIL, pad_id=shapes_chat.PAD,
                                            bucket=self.prompt_len)
            images.append(np.asarray(decode(collections["frozen"], c))[:n])
            codes.append(np.asarray(c)[:n])
        return np.concatenate(images), np.concatenate(codes)

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
        with jax.set_mesh(self.mesh):
            for host in data:
                mask = np.asarray(host["mask"], np.float32)
                if limit:
                    mask = mask * (np.cumsum(mask) <= limit - tot[2])
                caps = [str(c) for c in host["caption"]]
                captions += [c for c, m in zip(caps, mask) if m]
                rows = [left_padded_prompt(shapes_chat.generation_ids(self.vocab, c), self.prompt_len) for c in caps]
                b = to_global({"image": host["image"], "prompt": np.stack([r[0] for r in rows]),
                               "prompt_valid": np.stack([r[1] for r in rows])}, self.mesh)
                tot += np.asarray(jax.device_get(tf_step(star_params, colls, b, jnp.asarray(mask))), np.float64)
                if limit and tot[2] >= limit:
                    break
        n = max(tot[2], 1.0)
        out = {"val_loss": tot[0] / n, "val_token_acc": tot[1] / n, "num_examples": tot[2]}
        k = int(self.config.eval.get("num_samples", 0)) or len(captions)
        captions = captions[:k]
        images, _ = self.sample(star_params, colls, captions, key=jax.random.key(int(self.config.sample.seed)))
        report = shapes_geneval.evaluate(images, captions)
        out.update(t2i_report.geneval_metrics(report))
        if workdir is not None and jax.process_index() == 0:
            t2i_report.write_samples(workdir, split, step, images, captions, report,
                                     int(self.config.eval.get("grid_per_category", 16)))
        return out
