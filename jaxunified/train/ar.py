"""Task ``ar``: LlamaGen-style text-to-image — a GPT over a frozen VQ's codes, conditioned on a
frozen text encoder's caption token states.

    loss = CE(GPT(caption states, codes[:-1]), codes)        teacher forcing, raster order

The caption states are the text tower's final-LayerNorm output at every position, pads included:
a SigLIP text tower attends over its pads and pools the last one, so the last condition token —
the one that predicts the first image token — carries the sentence. With ``text_encoder.family``
"lm" the encoder is a decoder LM instead (an ``mllm`` run's, HF Qwen2: LLM states as the condition);
its prompt is right-padded and unmasked, so the pads after it read the whole prompt causally, as a
SigLIP tower's pads do. On shapes the TokLIP ``mllm`` run's LM binds better than the SigLIP tower (a
linear probe reads a noun's own colour from its state 0.98 vs 0.83) yet conditions worse: GenEval
0.27 vs 0.41, swap preference 0.53 (0.54 with identity condition rows). Caption dropout (the model's
``class_dropout_prob``) swaps a row's states for the model's fixed ``uncond_embedding``, which is
then the unconditional half of classifier-free guidance at sampling time.
``model.input_noise`` swaps that fraction of the teacher-forced input codes for other codes of the
batch in training (``losses.teacher_forcing``; the targets stay the true codes).

Parameters: only the GPT (``params["gpt"]``). The VQ (whose decoder turns sampled codes into
images) and the text tower live in ``collections["frozen"]``; the GPT's non-trained
``uncond_embedding`` in ``collections["gpt"]``. Training can read both frozen outputs from a
cache built once per dataset (``data.cache_dir``; shapes has no augmentation).

``loss.negative_kinds`` (shapes) adds a caption-contrast term on ``loss.negative_rows`` rows a step
that have a hard negative of those kinds (``data.shapes.negative_caption``, drawn per example):

    + negative_weight · softplus(NLL(codes | caption) − NLL(codes | negative caption))

(sequence NLLs, in nats), run in the same forward pass as the batch. Maximum likelihood alone
leaves which colour goes with which shape to about one bit per object of a 64-code image, and a
GPT trained on it tells a caption from its shapes-swapped twin at chance; the contrast asks for
exactly that distinction (``eval.negative_kinds`` measures it). On shapes it did not pay: the gap's
gradient touches every code of a row and swamps the CE's at weights 0.1–0.5, and at 0.02 the swap
distinction stays at chance while GenEval drops.

Evaluation: teacher-forced loss and token accuracy over the split, then CFG samples for the
split's captions (or ``eval.prompts_file``) scored by shapes-GenEval per category, with a PNG
grid of samples per category. With ``sample.best_of`` n > 1 every caption gets n independent draws
and the frozen SigLIP (the text encoder's image and text towers) keeps the one whose image–caption
logit is highest (``jaxunified.sample.rerank``, DALL·E's CLIP reranking); ``plain_*`` then scores each
caption's first draw — the very images ``best_of`` 1 samples — so the two figures are paired.
``eval.negative_kinds`` adds, per kind of one-word hard negative (a changed colour, shape, count or
relation, or the two objects' shapes swapped), how often the GPT's likelihood of the target codes
prefers the true caption: whether the condition carries that distinction at all (0.5: it does not),
apart from how well the sampler draws it.
"""

from __future__ import annotations

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunified.data import cache, shapes
from jaxunified.data.pipeline import as_float_images, fixed_size_chunks, to_global
from jaxunified.data.shapes_text import HardNegativeCaptions
from jaxunified.eval import shapes_geneval
from jaxunified.eval import t2i_report
from jaxunified.losses.teacher_forcing import noisy_inputs
from jaxunified.models import llamagen_gpt as gpt_lib
from jaxunified.models import lm as lm_lib
from jaxunified.models import siglip as siglip_lib
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.quant import simplify
from jaxunified.sample import rerank as rerank_lib
from jaxunified.sample.llamagen import sample_images
from jaxunified.sample.strategies import Greedy, guidance_from, strategy_from
from jaxunified.train import frozen as frozen_parts
from jaxunified.train.planning import is_shapes_only
from jaxunified.train.task import Task, eval_params, fill_boxes, kwargs

CACHE_FIELDS = ("codes", "caption_states")
# The text encoder: a SigLIP text tower, or a decoder LM (an mllm/LM run, HF Qwen2) read as one.
TEXT_FAMILIES = ("siglip", "lm")


def hard_negatives(captions, kind: str, rng) -> tuple[list[str], np.ndarray]:
    """One ``kind`` edit of each shapes caption (``data.shapes.negative_caption``) and where one
    applies (elsewhere the caption itself stands in)."""
    negs, ok = zip(*(shapes.negative_or_self(c, rng, (kind,)) for c in captions))
    return list(negs), np.asarray(ok, bool)


class ARTask(Task):
    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.vq, self._vq_vars = frozen_parts.load_vq(config.tokenizer)
        self.text_tokenizer = frozen_parts.text_tokenizer(config.data.text)
        self.scorer = None  # (SigLIP, variables): best-of-n sampling's judge (sample.best_of)
        if self.text_family == "siglip":
            siglip, sv = frozen_parts.load_siglip(config.text_encoder)
            if siglip.cfg.text is None:
                raise ValueError("text_encoder has no text tower")
            if self.best_of > 1 and not is_shapes_only():  # a plan never samples
                self.scorer = (siglip, nn.meta.unbox(sv))
            self.text_cfg = siglip.cfg.text
            self.text_model = siglip_lib.TextTower(self.text_cfg)
            self._text_params = sv["params"]["text"]
            siglip_lib.check_select_layer(self.text_layer, self.text_cfg.depth)
            if self.text_tokenizer.max_len > self.text_cfg.max_len:
                raise ValueError(f"data.text.max_len={self.text_tokenizer.max_len} exceeds the text tower's "
                                 f"{self.text_cfg.max_len}")
            width = self.text_cfg.width
        else:
            if self.best_of > 1:
                raise ValueError(f"sample.best_of={self.best_of} reranks with the text encoder's SigLIP; "
                                 "text_encoder.family='lm' has no image tower to score with")
            self.text_cfg, self._text_params, _, _ = frozen_parts.load_lm(config.text_encoder, "text_encoder")
            self.text_model = lm_lib.DecoderLM(self.text_cfg)
            # As in HF, the LM's hidden states are the embeddings, L − 1 block outputs and the final-normed output.
            siglip_lib.check_select_layer(self.text_layer, self.text_cfg.num_layers, "the LM")
            if self.append_pooled:
                raise ValueError("text_encoder.append_pooled needs a SigLIP tower (an LM has no pooled position)")
            if self.text_tokenizer.vocab_size > self.text_cfg.vocab_size:
                raise ValueError(f"data.text's tokenizer ({self.text_tokenizer!r}) has more ids than the text "
                                 f"encoder LM's vocab_size={self.text_cfg.vocab_size}: not the LM's tokenizer")
            width = self.text_cfg.hidden_size
        self.model_cfg = self.gpt_config(config, self.vq.cfg, width,
                                         self.text_tokenizer.max_len + int(self.append_pooled))
        # Found here, not lazily: ``codes`` needs it while being traced.
        self.fill_code = self._find_fill_code() if self.simplify_tol > 0 else -1
        self.model = gpt_lib.LlamaGenGPT(self.model_cfg)

    @staticmethod
    def gpt_config(config, vq_cfg, text_width: int, caption_len: int) -> gpt_lib.GPTConfig:
        grid = int(config.data.resolution) // vq_cfg.downsample_factor
        over = kwargs(config.model.get("overrides"))
        return gpt_lib.variant(config.model.variant, **{
            **over, "vocab_size": vq_cfg.vq.codebook_size, "block_size": grid * grid,
            "cls_token_num": caption_len, "caption_dim": text_width})

    @classmethod
    def model_config(cls, config) -> gpt_lib.GPTConfig:
        return cls(config, None).model_cfg

    def export(self, params, collections):
        return self.model, {"params": params["gpt"], **collections.get("gpt", {})}

    # ---- variables ----
    @property
    def grid(self) -> int:
        return int(self.config.data.resolution) // self.vq.cfg.downsample_factor

    def dummy_batch(self):
        r, b = int(self.config.data.resolution), int(self.config.data.batch_size)
        return {"image": np.zeros((b, r, r, 3), np.uint8),
                "tokens": np.zeros((b, self.text_tokenizer.max_len), np.int32)}

    def train_batch_example(self):
        batch = self.dummy_batch()
        if self.config.data.get("cache_dir"):
            batch = self.cached_batch_example(batch)
        if self.negative_rows:  # HardNegativeCaptions' fields
            b, n = int(self.config.data.batch_size), self.text_tokenizer.max_len
            batch.update(neg_tokens=np.zeros((b, 1, n), np.int32), neg_valid=np.zeros((b, 1), bool))
        return batch

    def init_variables(self, rng, batch):
        n = self.model_cfg.block_size
        states = jnp.zeros((1, self.model_cfg.cls_token_num, self.model_cfg.caption_dim), jnp.float32)
        boxed = self.model.init(rng, states, jnp.zeros((1, n - 1), jnp.int32))
        gpt_colls = {k: nn.meta.unbox(v) for k, v in boxed.items() if k != "params"}
        r = int(self.config.data.resolution)
        vq_abs = jax.eval_shape(lambda: self.vq.init(jax.random.key(0), jnp.zeros((1, r, r, 3))))
        t_abs = jax.eval_shape(lambda: self.text_model.init(jax.random.key(0), jnp.zeros(
            (1, self.text_tokenizer.max_len), jnp.int32)))["params"]
        frozen = {"tokenizer": fill_boxes(vq_abs, self._vq_vars, "the frozen VQ tokenizer"),
                  "text": fill_boxes(t_abs, self._text_params, "the frozen text tower")}
        return {"gpt": boxed["params"]}, {"frozen": frozen, "gpt": gpt_colls}

    def param_labels(self, params):
        # One group; the frozen parts are collections. (The labelled path also lets optax's
        # weight-decay mask see plain leaves rather than partitioning boxes.)
        return {"gpt": jax.tree.map(lambda _: "gpt", params["gpt"])}

    # ---- frozen work ----
    def codes(self, frozen, batch) -> jax.Array:
        """[B, h·w] int32 raster-order codes of the batch's images (or the cached ones), simplified
        when ``tokenizer.simplify_tol`` > 0 (quant/simplify.py)."""
        if "codes" in batch:
            return batch["codes"].reshape(batch["codes"].shape[0], -1).astype(jnp.int32)
        codes = self._encode(frozen, batch["image"])
        if self.simplify_tol > 0:
            codes = simplify.simplify_codes(lambda c: self.decode_images(frozen, c), codes, self.fill_code,
                                            self.simplify_tol)
        return jax.lax.stop_gradient(codes.reshape(codes.shape[0], -1))

    def _encode(self, frozen, images) -> jax.Array:
        _, codes, _ = self.vq.apply(frozen["tokenizer"], as_float_images(images), method=vqgan_lib.VQGAN.encode)
        return codes.astype(jnp.int32)

    @property
    def simplify_tol(self) -> float:
        return float(self.config.tokenizer.get("simplify_tol", 0.0))

    def _find_fill_code(self) -> int:
        frozen = {"tokenizer": nn.meta.unbox(self._vq_vars)}
        return frozen_parts.fill_code(self.config.data, jax.jit(lambda x: self._encode(frozen, x)),
                                      self.vq.cfg.vq.codebook_size)

    def caption_states(self, frozen, batch) -> jax.Array:
        if "caption_states" in batch:
            return batch["caption_states"].astype(jnp.float32)
        return self.encode_text(frozen, batch["tokens"])

    @property
    def text_family(self) -> str:
        family = str(self.config.text_encoder.get("family", "siglip"))
        if family not in TEXT_FAMILIES:
            raise ValueError(f"text_encoder.family={family!r}; use one of {TEXT_FAMILIES}")
        return family

    @property
    def text_layer(self) -> int:
        return int(self.config.text_encoder.get("select_layer", 0))

    @property
    def best_of(self) -> int:
        sc = self.config.sample
        n = int(sc.get("best_of", 1))
        if n < 1:
            raise ValueError(f"sample.best_of must be >= 1 (1: one draw per caption), got {n}")
        if n > 1 and (isinstance(strategy_from(sc), Greedy) or int(sc.top_k) == 1):
            raise ValueError(f"sample.best_of={n} with a deterministic strategy (temperature {sc.temperature}, "
                             f"top_k {sc.top_k}) draws the same image {n} times; sample with temperature > 0")
        return n

    @property
    def append_pooled(self) -> bool:
        return bool(self.config.text_encoder.get("append_pooled", False))

    def encode_text(self, frozen, tokens) -> jax.Array:
        if self.text_family == "siglip":
            states = siglip_lib.selected_states(self.text_model, {"params": frozen["text"]}, tokens, self.text_layer,
                                                self.append_pooled)
        else:  # every position attends (causally) over the prompt; the pads after it read all of it
            layer = self.text_layer
            out = self.text_model.apply({"params": frozen["text"]}, tokens, return_hidden=bool(layer),
                                        compute_logits=False)
            states = out["hidden_states"][layer] if layer else out["last_hidden"]
        return jax.lax.stop_gradient(states.astype(jnp.float32))

    # ---- the step ----
    def _gpt_vars(self, gpt_params, collections):
        return {"params": gpt_params, **collections.get("gpt", {})}

    def logits(self, gpt_params, collections, states, codes, *, train: bool, rng=None):
        """Teacher-forced logits [B, h·w, V]: ``[:, i]`` predicts ``codes[:, i]``; in training with
        ``model.input_noise`` > 0, that fraction of the input codes are swapped (``noisy_inputs``)."""
        inputs = codes[:, :-1]
        noise = float(self.config.model.get("input_noise", 0.0))
        if train and rng is not None and noise > 0:
            rng, noise_rng = jax.random.split(rng)
            inputs = noisy_inputs(inputs, noise, noise_rng)
        rngs = {"dropout": rng} if rng is not None else None
        out = self.model.apply(self._gpt_vars(gpt_params, collections), states, inputs, train=train, rngs=rngs)
        return out[:, self.model_cfg.cls_token_num - 1:]

    def token_losses(self, gpt_params, collections, states, codes, *, train: bool, rng=None):
        """Per-token cross-entropy and hits, each [B, h·w]."""
        logits = self.logits(gpt_params, collections, states, codes, train=train, rng=rng)
        v = logits.shape[-1]
        ls = float(self.config.loss.get("label_smoothing", 0.0))
        targets = optax.smooth_labels(jax.nn.one_hot(codes, v), ls) if ls else jax.nn.one_hot(codes, v)
        return optax.softmax_cross_entropy(logits, targets), jnp.argmax(logits, -1) == codes

    def loss_and_metrics(self, gpt_params, collections, batch, rng=None, train=True):
        frozen = collections["frozen"]
        ce, hit = self.token_losses(gpt_params, collections, self.caption_states(frozen, batch),
                                    self.codes(frozen, batch), train=train, rng=rng)
        return ce.mean(axis=-1), hit.mean(axis=-1)  # per example

    @property
    def negative_rows(self) -> int:
        kinds = tuple(self.config.loss.get("negative_kinds", ()))
        rows = int(self.config.loss.get("negative_rows", 0))
        if bool(kinds) != (rows > 0):
            raise ValueError(f"loss.negative_kinds={kinds} and loss.negative_rows={rows}: set both or neither")
        return rows

    def contrast_loss(self, gpt_params, collections, batch, rng=None):
        """The batch's CE, token accuracy and the caption-contrast term (module docstring) from one
        forward pass over the batch and ``negative_rows`` of its rows under their negative captions
        (rows with a valid negative first)."""
        frozen = collections["frozen"]
        codes, states = self.codes(frozen, batch), self.caption_states(frozen, batch)
        b, m = codes.shape[0], min(self.negative_rows, codes.shape[0])
        valid = jnp.asarray(batch["neg_valid"])[:, 0]
        rows = jnp.argsort(~valid, stable=True)[:m]
        neg_states = self.encode_text(frozen, jnp.asarray(batch["neg_tokens"])[rows, 0])
        ce, hit = self.token_losses(gpt_params, collections, jnp.concatenate([states, neg_states]),
                                    jnp.concatenate([codes, codes[rows]]), train=True, rng=rng)
        margin = ce[rows].sum(-1) - ce[b:].sum(-1)  # NLL under the true caption minus under the negative
        w = valid[rows].astype(jnp.float32)
        n = jnp.maximum(w.sum(), 1.0)
        contrast = (jax.nn.softplus(margin) * w).sum() / n
        return ce[:b].mean(), hit[:b].mean(), contrast, ((margin < 0) * w).sum() / n

    def grad_fn(self, params, collections, batch, rng, step, axis_name=None):
        weight = float(self.config.loss.get("negative_weight", 1.0))

        def loss_fn(p):
            if not self.negative_rows:
                ce, acc = self.loss_and_metrics(p, collections, batch, rng)
                loss = ce.mean()
                return loss, {"loss": loss, "token_acc": acc.mean(), "perplexity": jnp.exp(loss)}
            loss, acc, contrast, prefers = self.contrast_loss(p, collections, batch, rng)
            return loss + weight * contrast, {"loss": loss, "token_acc": acc, "perplexity": jnp.exp(loss),
                                              "contrast_loss": contrast, "prefers_caption": prefers}

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params["gpt"])
        return {"gpt": grads}, collections, metrics

    # ---- data ----
    def build_dataset(self, split: str):
        extra = ()
        if split == "train" and self.negative_rows:
            if self.config.data.get("name") != "shapes":
                raise ValueError("loss.negative_kinds needs the shapes caption grammar (data.name='shapes'), got "
                                 f"data.name={self.config.data.get('name')!r}")
            extra = (HardNegativeCaptions(self.text_tokenizer, 1, self.config.loss.negative_kinds, optional=True),)
        return self.cached_train_dataset(split, "ar", self.cache_key,
                                         pixel_fields=("codes",), token_field="caption_states", extra_transforms=extra)

    def cache_key(self) -> str:
        simplified = ("simplify_tol", self.simplify_tol) if self.simplify_tol > 0 else ()
        layer = ("text_layer", self.text_layer) if self.text_layer else ()
        layer += ("append_pooled", True) if self.append_pooled else ()
        return cache.dataset_key(self.config.data, [nn.meta.unbox(self._vq_vars), nn.meta.unbox(self._text_params)],
                                 (self.vq.cfg, self.text_cfg, *simplified, *layer))

    def _frozen_host(self) -> dict:
        return {"tokenizer": nn.meta.unbox(self._vq_vars), "text": nn.meta.unbox(self._text_params)}

    def _cache_fns(self) -> dict:
        """(frozen, batch) -> each cached field (CACHE_FIELDS)."""
        g = self.grid
        return {"codes": lambda fr, b: self.codes(fr, b).reshape(-1, g, g), "caption_states": self.caption_states}

    # ---- evaluation ----
    def decode_images(self, frozen, codes) -> jax.Array:
        g = self.grid
        return jnp.clip(self.vq.apply(frozen["tokenizer"], codes.reshape(-1, g, g),
                                      method=vqgan_lib.VQGAN.decode_codes), -1.0, 1.0)

    def sample(self, gpt_params, collections, captions, *, key, batch_size: int = 0):
        """Images [N, H, W, 3] in [-1, 1] and codes [N, h·w] for ``captions`` (CFG per ``config.sample``;
        with ``sample.best_of`` n > 1, the frozen SigLIP's pick of n draws per caption)."""
        images, codes, ranked = self.sample_candidates(gpt_params, collections, captions, key=key,
                                                       batch_size=batch_size)
        return ranked.best(images), ranked.best(codes)

    def sample_candidates(self, gpt_params, collections, captions, *, key, batch_size: int = 0):
        """``sample.best_of`` draws per caption, prompt-major (the ``jaxunified.sample.rerank`` layout):
        images [N·n, H, W, 3], codes [N·n, h·w] and the ``Reranked`` choice by the frozen SigLIP's
        image–caption logit. Each caption's first draw is exactly what ``best_of`` 1 samples (same
        keys); the others come from keys of their own (n = 1: nothing is scored)."""
        n, captions = self.best_of, list(captions)
        extra = jax.random.split(key)[1]
        rounds = [self._draw(gpt_params, collections, captions, key=key if r == 0 else jax.random.fold_in(extra, r),
                             batch_size=batch_size) for r in range(n)]
        prompt_major = lambda xs: np.stack(xs, axis=1).reshape(-1, *xs[0].shape[1:])  # noqa: E731
        images, codes = prompt_major([im for im, _ in rounds]), prompt_major([c for _, c in rounds])
        rows = rerank_lib.repeat(captions, n)
        scores = self.match_scores(images, rows, batch_size=batch_size) if n > 1 else np.zeros(len(rows))
        return images, codes, rerank_lib.rerank(scores, n)

    @functools.cached_property
    def _sampling_fns(self):
        """The text encoder and the VQ decoder, compiled once for every round of ``best_of`` draws."""
        return jax.jit(self.encode_text), jax.jit(self.decode_images)

    def _draw(self, gpt_params, collections, captions, *, key, batch_size: int = 0):
        sc = self.config.sample
        frozen = collections["frozen"]
        variables = self._gpt_vars(gpt_params, collections)
        strategy, guidance = strategy_from(sc), guidance_from(sc)
        bs = batch_size or int(self.config.data.get("eval_batch_size", 64))
        encode, decode = self._sampling_fns
        images, codes = [], []
        for i, idx, n in fixed_size_chunks(len(captions), bs):
            states = encode(frozen, jnp.asarray(self.text_tokenizer.encode([captions[j] for j in idx])))
            c = sample_images(self.model, variables, states, num_tokens=self.model_cfg.block_size,
                              strategy=strategy, key=jax.random.fold_in(key, i), guidance=guidance)
            images.append(np.asarray(decode(frozen, c))[:n])
            codes.append(np.asarray(c)[:n])
        return np.concatenate(images), np.concatenate(codes)

    def match_scores(self, images, captions, *, batch_size: int = 0) -> np.ndarray:
        """[N] the frozen SigLIP's logit that image i shows caption i (``SigLIP.pair_logits``)."""
        if self.scorer is None:
            raise ValueError("no scorer: set sample.best_of > 1 with a SigLIP text encoder")
        model, variables = self.scorer[0], jax.device_put(self.scorer[1])  # once, not per chunk
        score = jax.jit(lambda v, x, t: model.apply(v, x, t, method=siglip_lib.SigLIP.pair_logits))
        bs = batch_size or int(self.config.data.get("eval_batch_size", 64))
        out = []
        for _, idx, n in fixed_size_chunks(len(captions), bs):
            tokens = self.text_tokenizer.encode([captions[j] for j in idx])
            x = np.asarray(images[idx], np.float32)
            out.append(np.asarray(score(variables, jnp.asarray(x), jnp.asarray(tokens)))[:n])
        return np.concatenate(out)

    def _eval_batches(self, split):
        _, data = cache.in_order_batches(self.config.data, split, int(self.config.data.get("eval_batch_size", 64)))
        return data

    def evaluate(self, state, split, workdir, step) -> dict:
        gpt_params = eval_params(state)["gpt"]
        colls = state.collections
        limit = self.eval_num_examples()

        @jax.jit
        def tf_step(p, c, batch, mask):
            # The targets once: scored here, and decoded for the ceiling below.
            codes = self.codes(c["frozen"], batch)
            ce, acc = self.loss_and_metrics(p, c, {**batch, "codes": codes}, train=False)
            return (ce * mask).sum(), (acc * mask).sum(), mask.sum(), self.decode_images(c["frozen"], codes), ce, codes

        @jax.jit
        def caption_nll(p, c, codes, tokens):
            return self.loss_and_metrics(p, c, {"codes": codes, "tokens": tokens}, train=False)[0]

        kinds = tuple(self.config.eval.get("negative_kinds", ()))
        neg_rng = np.random.default_rng(0)
        prefers = {k: np.zeros(2) for k in kinds}  # [true caption more likely, negatives scored]
        tot = np.zeros(3)
        captions: list[str] = []
        targets: list[np.ndarray] = []
        with jax.set_mesh(self.mesh):
            for host in self._eval_batches(split):
                mask = np.asarray(host["mask"], np.float32)
                if limit:  # exactly the first ``limit`` examples
                    mask = mask * (np.cumsum(mask) <= limit - tot[2])
                batch_captions = [str(c) for c in host["caption"]]
                captions += [c for c, m in zip(batch_captions, mask) if m]
                b = to_global({"image": host["image"], "tokens": host["tokens"]}, self.mesh)
                *sums, decodes, ce, codes = tf_step(gpt_params, colls, b, jnp.asarray(mask))
                tot += np.asarray(jax.device_get(sums), np.float64)
                targets.append(np.asarray(decodes)[mask > 0])
                ce = np.asarray(ce)
                for kind in kinds:
                    negs, ok = hard_negatives(batch_captions, kind, neg_rng)
                    neg_tokens = to_global({"tokens": self.text_tokenizer.encode(negs)}, self.mesh)["tokens"]
                    ce_neg = caption_nll(gpt_params, colls, codes, neg_tokens)
                    ok = ok & (mask > 0)
                    prefers[kind] += [(ce[ok] < np.asarray(ce_neg)[ok]).sum(), ok.sum()]
                if limit and tot[2] >= limit:
                    break
        n = max(tot[2], 1.0)
        out = {"val_loss": tot[0] / n, "val_token_acc": tot[1] / n, "num_examples": tot[2]}
        # The GPT as a generative classifier: how often its likelihood of the target codes prefers
        # the true caption to one with a single edit of this kind (0.5 = the edit is not seen).
        out.update({f"prefers_caption_over_{k}": float(w / t) for k, (w, t) in prefers.items() if t})
        # What a GPT that predicted every training target code would score: the tokenizer's ceiling.
        out.update(t2i_report.geneval_metrics(shapes_geneval.evaluate(np.concatenate(targets), captions),
                                              "ceiling"))

        prompts_file = self.config.eval.get("prompts_file") or ""
        if prompts_file:
            captions = [ln.strip() for ln in pathlib.Path(prompts_file).expanduser().read_text().splitlines()
                        if ln.strip()]
        k = int(self.config.eval.get("num_samples", 0)) or len(captions)
        captions = captions[:k]
        candidates, _, ranked = self.sample_candidates(gpt_params, colls, captions,
                                                       key=jax.random.key(int(self.config.sample.seed)))
        images = ranked.best(candidates)
        report = shapes_geneval.evaluate(images, captions)
        out.update(t2i_report.geneval_metrics(report))
        if ranked.n > 1:  # the same sampler without reranking: each caption's first draw
            out.update(t2i_report.geneval_metrics(shapes_geneval.evaluate(ranked.first(candidates), captions),
                                                  "plain"))
        if workdir is not None and jax.process_index() == 0:
            t2i_report.write_samples(workdir, split, step, images, captions, report,
                                     int(self.config.eval.get("grid_per_category", 16)))
        return out
