"""Qwen2 / Qwen2.5 decoder-only language model (and the text decoder of Qwen2.5-VL).

Token embedding → N pre-norm decoder blocks (``nn.decoder.DecoderBlock``: RMSNorm, GQA with
q/k/v bias and 1-D RoPE, SwiGLU) → final RMSNorm → LM head (its own [embed, vocab] kernel, or
the embedding table transposed when ``tie_embeddings``).

- Entry from token ids, from ``inputs_embeds``, or both with ``embeds_mask`` choosing per
  position (images enter as embeddings between text tokens). ``token_embedding=False`` builds
  the decoder without a token table (STAR's stacked layers read another model's states).
- ``return_hidden``: HF's ``hidden_states`` convention — the embeddings, then each layer's
  output, with the last entry replaced by the final-normed state (L + 1 arrays).
- ``decode=True``: every layer's attention keeps a static KV cache (``nn.attention``); a
  prefill of T tokens and then one-token calls reproduce the full causal forward. Pass
  ``attention_mask`` over the cache slots ([B, max_len]) when prompts are left-padded, and the
  RoPE ``positions`` [B, T] the tokens really have (a padded row starts later).
- ``mrope_section`` (Qwen2.5-VL's mRoPE): ``positions`` may then be [B, T, 3] (temporal, height,
  width ids; ``nn.rope.rope_mrope``), how image tokens get 2-D positions; [B, T] positions are the
  same on all three axes, i.e. plain 1-D RoPE (text, and STAR's text-to-image path).
- ``scan_layers``: one ``nn.scan`` over a stacked ``layers`` tree (one compiled block at any
  depth); ``remat`` picks what the backward pass keeps (``REMAT_POLICIES``).
- ``dtype`` bfloat16 runs the blocks and head matmuls in bf16 with a float32 residual stream
  and float32 logits; norms, RoPE and softmax always run in float32.

Variants (``VARIANTS``) carry the released configs; their ``jax.eval_shape`` parameter counts
equal the released checkpoints' (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxunified.nn.attention import padding_mask
from jaxunified.nn.decoder import DecoderBlock
from jaxunified.nn.norm import RMSNorm
from jaxunified.nn.rope import mrope_axes, rope_mrope
from jaxunified.nn.sharding import LOGIT_AXES, TOKEN_AXES

# name → what jax.checkpoint saves for the backward pass ("full": nothing; recompute everything).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 151936
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    mlp_dim: int = 4864
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qkv_bias: bool = True
    dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    # Qwen2.5-VL's mRoPE: rotary angles per (t, h, w) axis, summing to head_dim / 2 (() = 1-D RoPE only);
    # interleaved is Qwen3-VL's t, h, w, t, … assignment (nn.rope.mrope_axes).
    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False

    def __post_init__(self):
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.mrope_section:
            mrope_axes(self.head_dim // 2, self.mrope_section, self.mrope_interleaved)  # raises on a bad split

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


_QWEN25_7B = dict(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, mlp_dim=18944,
                  vocab_size=152064, tie_embeddings=False)
_QWEN25_3B = dict(hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, mlp_dim=11008)

VARIANTS: dict[str, LMConfig] = {
    "qwen2.5-0.5b": LMConfig(),
    "qwen2.5-1.5b": LMConfig(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, mlp_dim=8960),
    "qwen2.5-3b": LMConfig(**_QWEN25_3B),
    "qwen2.5-7b": LMConfig(**_QWEN25_7B),
    # The text decoders of Qwen2.5-VL-{3B,7B}-Instruct (what STAR stacks on): the same shapes, mRoPE.
    "qwen2.5-vl-3b": LMConfig(**_QWEN25_3B, mrope_section=(16, 24, 24)),
    "qwen2.5-vl-7b": LMConfig(**_QWEN25_7B, mrope_section=(16, 24, 24)),
    "tiny": LMConfig(vocab_size=128, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=128,
                     tie_embeddings=False),  # the shape of the hf_qwen2_tiny golden
}


def variant(name: str, **overrides) -> LMConfig:
    """A variant by name (``VARIANTS``) with ``LMConfig`` field overrides."""
    if name not in VARIANTS:
        raise ValueError(f"unknown LM variant {name!r}; known: {', '.join(VARIANTS)}")
    return dataclasses.replace(VARIANTS[name], **overrides)


class _ScanBlock(DecoderBlock):
    """A DecoderBlock shaped as an ``nn.scan`` body: (x, out) with out the layer's output or None."""

    emit: bool = False

    def __call__(self, x, mask, positions, rotary):  # positional: scan and remat broadcast them
        x = super().__call__(x, mask, positions=positions, rotary=rotary)
        return x, (x if self.emit else None)


class DecoderLM(nn.Module):
    config: LMConfig
    decode: bool = False
    token_embedding: bool = True

    def _block_kwargs(self, emit: bool) -> dict[str, Any]:
        c = self.config
        return dict(num_heads=c.num_heads, mlp_dim=c.mlp_dim, num_kv_heads=c.num_kv_heads, norm_eps=c.norm_eps,
                    rope_theta=c.rope_theta, qkv_bias=c.qkv_bias, dtype=jnp.dtype(c.dtype), decode=self.decode,
                    emit=emit)

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        embeds_mask: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        return_hidden: bool = False,
        compute_logits: bool = True,
    ) -> dict[str, Any]:
        """→ {"logits" [B, T, V] float32 (if compute_logits), "last_hidden" [B, T, H] (final-normed),
        "hidden_states" (L + 1 arrays, if return_hidden)}.

        ``attention_mask`` [B, S] marks valid keys: S = T, or the cache's max_len when decoding.
        With both ``input_ids`` and ``inputs_embeds``, ``embeds_mask`` [B, T] (True = take the
        embedding) picks each position's input; the ids under it are not read.
        """
        c = self.config
        dtype = jnp.dtype(c.dtype)
        embed = None
        if self.token_embedding:
            embed = nn.Embed(
                c.vocab_size, c.hidden_size, param_dtype=jnp.float32,
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                name="embed")
        x = _inputs(c, embed, input_ids, inputs_embeds, embeds_mask)
        x = nn.with_logical_constraint(x, TOKEN_AXES)
        mask = None if attention_mask is None else padding_mask(attention_mask)
        positions, rotary = _rotary(c, positions)
        hidden = [x]

        block = _ScanBlock
        policy = REMAT_POLICIES[c.remat]
        if c.remat != "none":
            block = nn.remat(block, policy=policy, prevent_cse=not c.scan_layers)
        if c.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(**self._block_kwargs(return_hidden), name="layers")
            x, outs = stack(x, mask, positions, rotary)
            if return_hidden:
                hidden.extend(outs[i] for i in range(c.num_layers))
        else:
            for i in range(c.num_layers):
                x, _ = block(**self._block_kwargs(False), name=f"layers_{i}")(x, mask, positions, rotary)
                hidden.append(x)

        x = RMSNorm(c.norm_eps, name="final_norm")(x)
        out: dict[str, Any] = {"last_hidden": x}
        if return_hidden:
            out["hidden_states"] = tuple(hidden[:-1]) + (x,)
        if compute_logits:
            if not self.token_embedding:
                raise ValueError("a decoder built with token_embedding=False has no LM head; pass compute_logits=False")
            if c.tie_embeddings:
                table = embed.embedding
            else:
                table = self.param("lm_head", nn.with_logical_partitioning(
                    nn.initializers.normal(0.02), ("vocab", "embed")), (c.vocab_size, c.hidden_size), jnp.float32)
            # bf16 operands, float32 accumulation and result: the softmax over 150k entries needs it.
            logits = jnp.einsum("btd,vd->btv", x.astype(dtype), table.astype(dtype),
                                preferred_element_type=jnp.float32)
            out["logits"] = nn.with_logical_constraint(logits, LOGIT_AXES)
        return out


def _rotary(c: LMConfig, positions):
    """(1-D positions, None) or, for mRoPE ids [B, T, 3], (None, the (cos, sin) table all layers share)."""
    if positions is None or jnp.ndim(positions) < 3:
        return positions, None
    if not c.mrope_section:
        raise ValueError(f"positions of shape {jnp.shape(positions)} are (t, h, w) ids: the LM needs mrope_section")
    return None, rope_mrope(positions, c.head_dim, c.rope_theta, c.mrope_section, c.mrope_interleaved)


def _inputs(c: LMConfig, embed, input_ids, inputs_embeds, embeds_mask) -> jax.Array:
    """The decoder's input states [B, T, H] float32 (see ``DecoderLM.__call__``)."""
    if input_ids is None and inputs_embeds is None:
        raise ValueError("pass input_ids, inputs_embeds, or both with embeds_mask")
    if input_ids is not None and embed is None:
        raise ValueError("this decoder has no token embedding (token_embedding=False); pass inputs_embeds")
    if input_ids is not None and inputs_embeds is not None and embeds_mask is None:
        raise ValueError("with both input_ids and inputs_embeds, pass embeds_mask [B, T] (True = embedding)")
    if input_ids is None:
        return inputs_embeds.astype(jnp.float32)
    x = embed(input_ids)
    if inputs_embeds is None:
        return x
    if inputs_embeds.shape != x.shape or embeds_mask.shape != input_ids.shape:
        raise ValueError(f"inputs_embeds {inputs_embeds.shape} and embeds_mask {embeds_mask.shape} must match "
                         f"input_ids {input_ids.shape} (+ hidden {c.hidden_size})")
    return jnp.where(embeds_mask[..., None], inputs_embeds.astype(jnp.float32), x)


def init_cache(model: DecoderLM, batch: int, max_len: int) -> Any:
    """The zeroed "cache" collection of ``model`` (built with ``decode=True``) for ``max_len`` slots."""
    if not model.decode:
        raise ValueError("init_cache needs the model built with decode=True")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **_dummy_inputs(model, batch, max_len),
                                               compute_logits=False))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def abstract_params(model: DecoderLM) -> Any:
    """The (logically boxed) parameter shapes of ``model``; nothing is allocated."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **_dummy_inputs(model, 1, 1),
                                             compute_logits=model.token_embedding))["params"]


def _dummy_inputs(model: DecoderLM, batch: int, length: int) -> dict[str, jax.Array]:
    if model.token_embedding:
        return {"input_ids": jnp.zeros((batch, length), jnp.int32)}
    return {"inputs_embeds": jnp.zeros((batch, length, model.config.hidden_size), jnp.float32)}


def count_params(config: LMConfig) -> int:
    """Parameters of ``config`` from abstract shapes."""
    return sum(int(x.size) for x in jax.tree.leaves(nn.meta.unbox(abstract_params(DecoderLM(config)))))


__all__ = ["DecoderLM", "LMConfig", "VARIANTS", "REMAT_POLICIES", "variant", "init_cache", "abstract_params", "count_params"]
