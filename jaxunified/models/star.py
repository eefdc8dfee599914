"""STAR (MM-MVR/STAR): image generation stacked on a frozen understanding LM.

    prompt ids ──► base DecoderLM (frozen, L layers + final norm) ──► stacked decoder (N layers +
    own final norm, no token table) ──► image head (Linear H → K, bias) ──► next image code

Image codes re-enter as input embeddings of the base: the frozen VQ codebook row of the code
through the adapter (Linear D → H, then (GELU, Linear H → H) × (depth − 1)). Image codes never
enter the text vocabulary and the base's LM head is only used for text (understanding and the
reasoning mode's rewrite). The stacked decoder starts as a copy of the base's top N layers and
final norm (``init_stacked_from_base``) and reads the base's *final-normed* last hidden state.

Both decoders use plain 1-D RoPE over their own positions (the released t2i path passes no
position ids, so Qwen2.5-VL's mRoPE sections all carry the same index). With ``decode=True``
each keeps its own static KV cache (``cache/base``, ``cache/stacked``), as the reference keeps
two DynamicCaches.

The VQ (``vq``, a ``models.vqgan.VQGAN``) is part of the module, as ``pixel_encoder`` is of the
reference: its codebook feeds the adapter and its decoder turns sampled codes into pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxunified.models import lm as lm_lib
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.nn.dense import dense
from jaxunified.nn.projector import MlpProjector
from jaxunified.nn.sharding import LOGIT_AXES

FROZEN_SUBTREES = ("base", "vq")  # what STAR's generation stages never train


@dataclasses.dataclass(frozen=True)
class STARConfig:
    base: lm_lib.LMConfig
    num_stacked: int
    vq: vqgan_lib.VQGANConfig
    adapter_depth: int = 2

    def __post_init__(self):
        if not 1 <= self.num_stacked <= self.base.num_layers:
            raise ValueError(f"num_stacked must be in [1, {self.base.num_layers}] (the stacked layers start as "
                             f"copies of the base's top layers), got {self.num_stacked}")
        if self.adapter_depth < 1:
            raise ValueError(f"adapter_depth must be ≥ 1, got {self.adapter_depth}")

    @property
    def stacked(self) -> lm_lib.LMConfig:
        return dataclasses.replace(self.base, num_layers=self.num_stacked)

    @property
    def image_vocab(self) -> int:
        return self.vq.vq.codebook_size


VARIANTS: dict[str, STARConfig] = {
    # star/configs/STAR_Qwen2.5-VL-{3B,7B}.json
    "star-3b": STARConfig(lm_lib.VARIANTS["qwen2.5-vl-3b"], 16, vqgan_lib.VARIANTS["STAR-VQ"], adapter_depth=2),
    "star-7b": STARConfig(lm_lib.VARIANTS["qwen2.5-vl-7b"], 14, vqgan_lib.VARIANTS["STAR-VQ"], adapter_depth=4),
}


def variant(name: str, **overrides) -> STARConfig:
    if name not in VARIANTS:
        raise ValueError(f"unknown STAR variant {name!r}; known: {', '.join(VARIANTS)}")
    return dataclasses.replace(VARIANTS[name], **overrides)


class STAR(nn.Module):
    config: STARConfig
    decode: bool = False

    def setup(self):
        c = self.config
        self.base = lm_lib.DecoderLM(c.base, decode=self.decode)
        self.stacked = lm_lib.DecoderLM(c.stacked, decode=self.decode, token_embedding=False)
        self.adapter = MlpProjector(c.base.hidden_size, c.adapter_depth, jnp.dtype(c.base.dtype))
        self.head = dense(c.image_vocab, ("embed", "vocab"), dtype=jnp.dtype(c.base.dtype), name="head")
        self.vq = vqgan_lib.VQGAN(c.vq)

    def embed_images(self, codes: jax.Array) -> jax.Array:
        """Image codes [...] → base input embeddings [..., H] (codebook row → adapter)."""
        return self.adapter(self.vq.lookup(codes))

    def image_logits(self, stacked_hidden: jax.Array) -> jax.Array:
        logits = self.head(stacked_hidden.astype(jnp.dtype(self.config.base.dtype)))
        # constrained where the head writes them: [B, T, K] is the step's largest activation
        return nn.with_logical_constraint(logits, LOGIT_AXES).astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        image_codes: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        embeds_mask: jax.Array | None = None,
        source_codes: jax.Array | None = None,
        source_mask: jax.Array | None = None,
        source_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        return_hidden: bool = False,
        text_logits: bool = False,
        pixel_logits: bool = True,
    ) -> dict[str, Any]:
        """Teacher-forced (or, with ``decode``, one prefill/step) pass over prompt ids followed by
        ``image_codes`` [B, T] (or any mix given as ``inputs_embeds`` + ``embeds_mask``).

        Editing: ``source_codes`` [B, N] (the source image's VQ codes) enter the prompt, in order,
        at the N positions ``source_mask`` [B, P] marks (the reference's VQ block after the user
        turn's opening), through the same codebook + adapter path as generated codes;
        ``source_embeds`` [B, M, H] (its understanding tokens, already in the base's input space)
        fill the M marked slots after them (the reference's ViT block after its VQ block).

        Returns "pixel_logits" [B, S, K] for every position, "image_logits" [B, T, K] (position j
        predicts ``image_codes[:, j]``; only with ``image_codes``), the base's and stacked
        decoder's final-normed states ("base_last_hidden", "stacked_last_hidden"), their
        ``hidden_states`` with ``return_hidden``, and the base's text "logits" with ``text_logits``.
        ``pixel_logits=False`` runs the head only where "image_logits" need it (training).
        """
        if source_codes is not None:
            if input_ids is None or inputs_embeds is not None or source_mask is None:
                raise ValueError("source_codes need input_ids and source_mask (their slots), not inputs_embeds")
            inputs_embeds = self._source_embeds(source_codes, source_mask, source_embeds)
            embeds_mask = source_mask.astype(bool)
        num_image = 0
        if image_codes is not None:
            if input_ids is None or (inputs_embeds is not None and source_codes is None):
                raise ValueError("image_codes go after input_ids; pass inputs_embeds/embeds_mask for other layouts")
            num_image = image_codes.shape[1]
            batch = input_ids.shape[0]
            if inputs_embeds is None:
                inputs_embeds = jnp.zeros(input_ids.shape + (self.config.base.hidden_size,), jnp.float32)
                embeds_mask = jnp.zeros(input_ids.shape, bool)
            inputs_embeds = jnp.concatenate([inputs_embeds, self.embed_images(image_codes)], axis=1)
            embeds_mask = jnp.concatenate([embeds_mask, jnp.ones((batch, num_image), bool)], axis=1)
            input_ids = jnp.concatenate([input_ids, jnp.zeros((batch, num_image), input_ids.dtype)], axis=1)
        base = self.base(input_ids, inputs_embeds=inputs_embeds, embeds_mask=embeds_mask,
                         attention_mask=attention_mask, positions=positions, return_hidden=return_hidden,
                         compute_logits=text_logits)
        stacked = self.stacked(inputs_embeds=base["last_hidden"], attention_mask=attention_mask,
                               positions=positions, return_hidden=return_hidden, compute_logits=False)
        out = {"base_last_hidden": base["last_hidden"], "stacked_last_hidden": stacked["last_hidden"]}
        if pixel_logits:
            out["pixel_logits"] = self.image_logits(stacked["last_hidden"])
        if num_image:
            out["image_logits"] = (out["pixel_logits"][:, -num_image - 1:-1] if pixel_logits
                                   else self.image_logits(stacked["last_hidden"][:, -num_image - 1:-1]))
        if return_hidden:
            out["base_hidden_states"] = base["hidden_states"]
            out["stacked_hidden_states"] = stacked["hidden_states"]
        if text_logits:
            out["logits"] = base["logits"]
        return out

    def _source_embeds(self, codes: jax.Array, mask: jax.Array, extra: jax.Array | None = None) -> jax.Array:
        emb = self.embed_images(codes)  # [B, N, H]
        if extra is not None:
            emb = jnp.concatenate([emb, extra.astype(emb.dtype)], axis=1)
        slot = jnp.clip(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0, emb.shape[1] - 1)
        return jnp.take_along_axis(emb, slot[..., None], axis=1)

    def step_codes(self, codes: jax.Array, *, attention_mask=None, positions=None) -> jax.Array:
        """One decode step fed image codes [R, T]: the pixel logits [R, T, K] (``decode=True``)."""
        return self(inputs_embeds=self.embed_images(codes), attention_mask=attention_mask,
                    positions=positions)["pixel_logits"]

    def text(self, input_ids: jax.Array, **kw) -> dict[str, Any]:
        """The frozen base alone, as an understanding LM (text logits)."""
        return self.base(input_ids, **kw)

    def decode_image(self, codes: jax.Array) -> jax.Array:
        """Codes [B, h, w] → images [B, H, W, 3] in [-1, 1] (unclipped) through the VQ decoder."""
        return self.vq.decode_codes(codes)


def _dummy(config: STARConfig, length: int):
    f = config.vq.downsample_factor
    return jnp.zeros((1, length), jnp.int32), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, f, f, 3))


def _init_all(model: STAR, key, length: int):
    ids, codes, image = _dummy(model.config, length)
    v = model.init(key, ids, codes, text_logits=True)
    # the VQ's encoder/quant convs are only built by a forward through it
    vq_vars = model.init(key, image, method=lambda m, x: m.vq(x))
    return {col: {**v.get(col, {}), **vq_vars.get(col, {})} for col in set(v) | set(vq_vars)}


def abstract_variables(config: STARConfig) -> dict:
    """Every variable of ``STAR(config)`` as shapes (logically boxed); nothing is allocated."""
    return jax.eval_shape(lambda: _init_all(STAR(config), jax.random.key(0), 1))


def init_variables(config: STARConfig, key) -> dict:
    return _init_all(STAR(config), key, 1)


def init_stacked_from_base(config: STARConfig, params: dict) -> dict:
    """``params`` with ``stacked`` set to copies of the base's top ``num_stacked`` layers and its
    final norm (the reference's construction; each stage then trains the copies)."""
    n, total = config.num_stacked, config.base.num_layers
    base = params["base"]
    if config.base.scan_layers:
        layers = jax.tree.map(lambda x: x[total - n:], base["layers"])
        stacked = {"layers": layers}
    else:
        stacked = {f"layers_{i}": base[f"layers_{total - n + i}"] for i in range(n)}
    stacked["final_norm"] = base["final_norm"]
    return {**params, "stacked": jax.tree.map(jnp.array, stacked)}


def image_origin(prompt_ids: jax.Array, prompt_positions: jax.Array, source_id: int | None = None) -> jax.Array:
    """[B] the RoPE position of each row's last prompt token, the one that predicts the first code;
    code j - 1 is then fed at ``origin + j``.

    With ``source_id`` (an edit's source-image slots), rows holding such slots start the output
    image where the source block starts instead: output code j takes source code j's position, so
    the code to copy sits one position ahead of the token predicting it, whatever the instruction
    between them — the 1-D counterpart of mRoPE giving two same-sized images the same spatial
    positions. Rows without a source block (text-to-image) keep the sequential position."""
    last = prompt_positions[:, -1]
    if source_id is None:
        return last
    slots = prompt_ids == source_id
    first = jnp.take_along_axis(prompt_positions, jnp.argmax(slots, axis=1)[:, None], axis=1)[:, 0]
    return jnp.where(slots.any(axis=1), first - 1, last)


def sequence_positions(prompt_ids: jax.Array, prompt_positions: jax.Array, num_tokens: int,
                       source_id: int | None = None) -> jax.Array:
    """[B, P + num_tokens] positions of a prompt followed by ``num_tokens`` image codes (teacher
    forcing), laid out as ``image_origin`` says."""
    origin = image_origin(prompt_ids, prompt_positions, source_id)
    tail = origin[:, None] + jnp.arange(num_tokens + 1)[None]
    return jnp.concatenate([prompt_positions[:, :-1], tail.astype(prompt_positions.dtype)], axis=1)


def count_params(config: STARConfig) -> dict[str, int]:
    """Parameter counts per part: base, stacked, adapter, head, vq (from abstract shapes)."""
    params = nn.meta.unbox(abstract_variables(config)["params"])
    return {k: sum(int(x.size) for x in jax.tree.leaves(v)) for k, v in params.items()}


__all__ = ["STAR", "STARConfig", "VARIANTS", "FROZEN_SUBTREES", "variant", "abstract_variables",
           "init_variables", "init_stacked_from_base", "count_params", "image_origin", "sequence_positions"]
