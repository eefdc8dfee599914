"""LlamaGen's class- and text-conditional image GPT (``autoregressive/models/gpt.py``).

Sequence layout: ``cls_token_num`` condition tokens, then the image codes in raster order.
c2i has one condition token (a class-embedding row); t2i has ``cls_token_num`` (120 in the
release) caption tokens, frozen FLAN-T5 states through ``CaptionEmbedder``. The teacher-forced
forward over ``cond`` and codes ``tokens`` [B, T] returns logits [B, cls_token_num + T, V]
where ``logits[:, cls_token_num - 1 + i]`` predicts ``tokens[:, i]`` (LlamaGen's training loss
reads ``logits[:, cls_token_num - 1:]``; the last position predicts a token after T).

Blocks are ``nn.decoder.DecoderBlock`` (pre-norm RMSNorm eps 1e-5, GQA without biases, SwiGLU
hidden ``find_multiple(int(ffn_dim_multiplier · int(8·dim/3)), multiple_of)``), with LlamaGen's
resid/ffn dropout on the two branches and token dropout on the embeddings.

Quirks kept for weight-faithful outputs:

- 2-D RoPE over the image grid (``nn.rope.rope_2d``): half of each head's angles follow the row,
  half the column, LlamaGen's interleaved pairs (2i, 2i + 1). The condition positions get
  cos = sin = 0 rows, which multiplies their queries and keys to **zero**: a condition token's
  query attends uniformly, and every query gives the condition keys logit 0. They still pass
  their values. This is the reference behaviour (also reported in hustvl/ControlAR#18), and the
  default; ``cond_rope="identity"`` gives the condition rows cos 1, sin 0 instead, so image
  tokens attend to individual caption tokens by content, and ``"sequence"`` rotates condition
  token i as position i - cls_token_num on both axes, so the causal stack sees the caption's word
  order (a shape word can read the colour word just before it) — options for models trained here.
- The c2i table has ``num_classes + 1`` rows (the last is the null class for CFG) only when
  ``class_dropout_prob > 0``, exactly as the reference sizes it; a checkpoint trained without
  label dropout has no null row and cannot be guided.
- t2i: the null caption is ``uncond_embedding`` [cls_token_num, caption_dim], randn/√caption_dim,
  never trained: a variable of the ``"constants"`` collection, not of ``"params"``, so optimisers
  never see it; the converter loads the released one. Padded caption tokens (``cond_mask``
  False) are hidden from every query, except that each position always sees itself (LlamaGen
  forces the mask's diagonal to 1, so a padded query has one key and never a NaN row).

Decoding (``decode=True``): every layer keeps a static KV cache (``nn.attention``); the cache
slot of a token is its sequence position, and so is its RoPE table row. ``init_cache`` sizes it;
``prefill`` runs the condition tokens and returns the logits for image token 0; ``step`` feeds
one token at an explicit ``position`` and returns the logits for the next. Prefill then steps
reproduce the teacher-forced logits (tested to 1e-5).

``dtype`` bfloat16 runs the blocks and head matmuls in bf16 with a float32 residual stream and
float32 logits. ``scan_layers`` stacks the layers into one ``nn.scan`` (one compiled block);
``remat`` names what the backward pass keeps (``models.lm.REMAT_POLICIES``).

Differences from the reference: stochastic depth (``drop_path_rate``, 0 in every released
config) is not implemented; from-scratch block kernels use ``nn``'s initialisers rather than
N(0, 0.02) (embeddings are N(0, 0.02) and the head starts at zero, as in the reference).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.models.lm import REMAT_POLICIES
from jaxunified.nn.activations import activation
from jaxunified.nn.decoder import DecoderBlock
from jaxunified.nn.dense import dense
from jaxunified.nn.norm import RMSNorm
from jaxunified.nn.rope import COND_ROWS, rope_2d
from jaxunified.nn.sharding import LOGIT_AXES, TOKEN_AXES
from jaxunified.nn.transformer import EncoderBlock

# The null caption is a fixed draw, the same for every init (the reference's is one torch.randn).
UNCOND_SEED = 0


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Field names follow LlamaGen's ``ModelArgs`` so its JSON/kwargs map one to one.

    ``caption_dim`` 0 is c2i (class labels); > 0 is t2i (caption states [B, cls_token_num,
    caption_dim]). ``block_size`` image tokens form a square grid.
    """

    vocab_size: int = 16384
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    # "zero": the reference's all-zero RoPE rows for condition tokens (module docstring);
    # "identity": unrotated condition queries/keys, so image tokens attend to caption words by content;
    # "sequence": condition tokens rotated as a 1-D sequence ending before the grid (word order).
    cond_rope: str = "zero"
    # Not in LlamaGen (0): bidirectional encoder blocks over the embedded caption, so each caption
    # token can take in its neighbours (bind "blue" to "square") before the image tokens read it.
    caption_layers: int = 0
    block_size: int = 256
    cls_token_num: int = 1
    num_classes: int = 1000
    caption_dim: int = 0
    class_dropout_prob: float = 0.1
    token_dropout_p: float = 0.1
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads}")
        if self.head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dim divisible by 4; dim/n_head = {self.head_dim}")
        if self.grid_size ** 2 != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square grid of image tokens")
        if self.cond_rope not in COND_ROWS:
            raise ValueError(f"cond_rope must be one of {COND_ROWS}, got {self.cond_rope!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.caption_dim < 0:
            raise ValueError(f"caption_dim must be ≥ 0 (0 = class-conditional), got {self.caption_dim}")
        if self.caption_layers < 0 or (self.caption_layers and not self.caption_dim):
            raise ValueError(f"caption_layers must be ≥ 0 and needs a t2i model (caption_dim > 0), got "
                             f"{self.caption_layers} with caption_dim={self.caption_dim}")
        if self.caption_dim == 0 and self.cls_token_num != 1:
            raise ValueError(f"class-conditional models have one condition token, got cls_token_num={self.cls_token_num}")
        jnp.dtype(self.dtype)  # a bad name raises here, not mid-trace

    @property
    def model_type(self) -> str:
        return "t2i" if self.caption_dim else "c2i"

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return int(round(self.block_size ** 0.5))

    @property
    def ffn_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def has_null_class(self) -> bool:
        return self.caption_dim == 0 and self.class_dropout_prob > 0

    @property
    def null_class(self) -> int:
        return self.num_classes


# gpt.py's GPT_models: layers, heads, width. B…XXXL are LlamaGen's c2i sizes, 1B/3B/7B the t2i
# ones (the released c2i "3B" checkpoint is GPT-3B). All start as c2i with the reference's
# defaults (vocab 16384, 256 tokens, 1000 classes); t2i: ``caption_dim=2048, cls_token_num=120``.
_SIZES = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-1B": (22, 32, 2048),
    "GPT-3B": (24, 32, 3200),
    "GPT-7B": (32, 32, 4096),
}
VARIANTS: dict[str, GPTConfig] = {
    name: GPTConfig(n_layer=layers, n_head=heads, dim=dim) for name, (layers, heads, dim) in _SIZES.items()
}
# The shape of the llamagen_gpt_c2i_tiny golden (trained without label dropout: no null row).
VARIANTS["tiny"] = GPTConfig(vocab_size=64, dim=64, n_layer=2, n_head=4, n_kv_head=2, multiple_of=32, block_size=16,
                             num_classes=10, class_dropout_prob=0.0)


def variant(name: str, **overrides) -> GPTConfig:
    """A variant by name (``VARIANTS``) with ``GPTConfig`` field overrides."""
    if name not in VARIANTS:
        raise ValueError(f"unknown LlamaGen GPT variant {name!r}; known: {', '.join(VARIANTS)}")
    return dataclasses.replace(VARIANTS[name], **overrides)


def _embed(num: int, dim: int, axes, name: str) -> nn.Embed:
    return nn.Embed(num, dim, param_dtype=jnp.float32, name=name,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes))


class LabelEmbedder(nn.Module):
    """Class ids [B] → [B, 1, dim]; at train time each label becomes the null class with
    probability ``dropout_prob`` (the 'dropout' rng), which is what CFG's null row learns from."""

    num_classes: int
    dim: int
    dropout_prob: float

    @nn.compact
    def __call__(self, labels: jax.Array, train: bool) -> jax.Array:
        rows = self.num_classes + int(self.dropout_prob > 0)
        labels = jnp.asarray(labels).astype(jnp.int32)
        if train and self.dropout_prob > 0:
            drop = jax.random.uniform(self.make_rng("dropout"), labels.shape) < self.dropout_prob
            labels = jnp.where(drop, self.num_classes, labels)
        return _embed(rows, self.dim, (None, "embed"), "embedding_table")(labels)[:, None]


class CaptionEmbedder(nn.Module):
    """Caption states [B, L, caption_dim] → [B, L, dim] through fc1 → GELU(tanh) → fc2 (no biases),
    then ``layers`` bidirectional pre-LN encoder blocks (``GPTConfig.caption_layers``; none in
    LlamaGen) that see the valid caption tokens (``cond_mask``).

    At train time a row's caption is replaced by ``uncond_embedding`` with probability
    ``dropout_prob``; the replacement keeps the row's ``cond_mask``, as in LlamaGen.
    """

    caption_dim: int
    dim: int
    token_num: int
    dropout_prob: float
    dtype: Any = jnp.float32
    layers: int = 0
    num_heads: int = 1

    @nn.compact
    def __call__(self, caption: jax.Array, train: bool, cond_mask: jax.Array | None = None) -> jax.Array:
        caption = jnp.asarray(caption, jnp.float32)
        if caption.shape[1:] != (self.token_num, self.caption_dim):
            raise ValueError(f"captions must be [B, {self.token_num}, {self.caption_dim}] (cls_token_num tokens, "
                             f"left-padded, with cond_mask), got {caption.shape}")
        if self.is_initializing():
            self.uncond_embedding()  # created with the parameters; an eval apply may leave it out
        if train and self.dropout_prob > 0:
            drop = jax.random.uniform(self.make_rng("dropout"), caption.shape[:1]) < self.dropout_prob
            caption = jnp.where(drop[:, None, None], self.uncond_embedding(), caption)
        h = dense(self.dim, (None, "mlp"), use_bias=False, dtype=self.dtype, name="fc1")(caption)
        h = activation("gelu_tanh")(h)
        h = dense(self.dim, ("mlp", "embed"), use_bias=False, dtype=self.dtype, name="fc2")(h)
        mask = None if cond_mask is None else jnp.asarray(cond_mask, jnp.bool_)[:, None, None, :]
        for i in range(self.layers):
            h, _ = EncoderBlock(self.num_heads, 4 * self.dim, ln_eps=1e-5, dtype=self.dtype,
                                name=f"encoder_{i}")(h.astype(jnp.float32), mask)
        return h

    def uncond_embedding(self) -> jax.Array:
        """The null caption [token_num, caption_dim] (a 'constants' variable)."""
        if not self.has_variable("constants", "uncond_embedding") and not self.is_mutable_collection("constants"):
            raise ValueError("a t2i LlamaGen GPT needs variables['constants'] (the uncond_embedding); pass the "
                             "whole variables dict from init or convert.load, not only 'params'")

        def init():
            draw = jax.random.normal(jax.random.key(UNCOND_SEED), (self.token_num, self.caption_dim), jnp.float32)
            return draw / np.float32(np.sqrt(self.caption_dim))

        return self.variable("constants", "uncond_embedding", init).value


class _Block(DecoderBlock):
    """A DecoderBlock as an ``nn.scan`` body: positional (x, mask, rotary, deterministic) → (x, None)."""

    def __call__(self, x, mask, rotary, deterministic):
        return super().__call__(x, mask, rotary=rotary, deterministic=deterministic), None


class LlamaGenGPT(nn.Module):
    """LlamaGen's ``Transformer`` (module docstring). ``cond``: class ids [B] (c2i) or caption
    states [B, cls_token_num, caption_dim] (t2i); ``cond_mask`` [B, cls_token_num] marks the
    valid caption tokens (None: all valid)."""

    config: GPTConfig
    decode: bool = False

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        if c.caption_dim:
            self.cls_embedding = CaptionEmbedder(c.caption_dim, c.dim, c.cls_token_num, c.class_dropout_prob, dtype,
                                                 c.caption_layers, c.n_head)
        else:
            self.cls_embedding = LabelEmbedder(c.num_classes, c.dim, c.class_dropout_prob)
        self.tok_embeddings = _embed(c.vocab_size, c.dim, ("vocab", "embed"), "tok_embeddings")
        self.tok_dropout = nn.Dropout(c.token_dropout_p)
        block_kw = dict(num_heads=c.n_head, mlp_dim=c.ffn_dim, num_kv_heads=c.kv_heads, norm_eps=c.norm_eps,
                        rope_theta=None, rope_interleaved=True, qkv_bias=False, dtype=dtype, decode=self.decode,
                        resid_dropout=c.resid_dropout_p, mlp_dropout=c.ffn_dropout_p)
        block = _Block
        if c.remat != "none":
            # argnums count self: (self, x, mask, rotary, deterministic); the flag picks Python branches.
            block = nn.remat(block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers,
                             static_argnums=(4,))
        if c.scan_layers:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.n_layer,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(**block_kw)
        else:
            self.layers = [block(**block_kw) for _ in range(c.n_layer)]
        self.norm = RMSNorm(c.norm_eps)
        self.output = self.param("output", nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "vocab")),
                                 (c.dim, c.vocab_size), jnp.float32)

    # ---- pieces ----

    def _rope_table(self) -> tuple[jax.Array, jax.Array]:
        c = self.config
        return rope_2d(c.grid_size, c.grid_size, c.head_dim, c.rope_base, num_cond=c.cls_token_num,
                       cond_rows=c.cond_rope)

    def _cond_embed(self, cond: jax.Array, train: bool, cond_mask: jax.Array | None = None) -> jax.Array:
        if self.config.caption_dim:
            return self.cls_embedding(cond, train, cond_mask).astype(jnp.float32)
        return self.cls_embedding(cond, train).astype(jnp.float32)

    def _mask(self, cond_mask: jax.Array | None, q_pos: jax.Array, key_len: int) -> jax.Array | None:
        """[B, 1, Tq, key_len] from the caption validity: keys before ``cls_token_num`` only where
        valid, everything after, and always the query's own slot (LlamaGen's forced diagonal).
        ``q_pos`` [1 or B, Tq]. Causality is added by the blocks / the cache."""
        if cond_mask is None:
            return None
        c = self.config
        cond_mask = jnp.asarray(cond_mask, jnp.bool_)
        if cond_mask.shape[-1] != c.cls_token_num:
            raise ValueError(f"cond_mask must be [B, cls_token_num={c.cls_token_num}], got {cond_mask.shape}")
        pad = max(key_len - c.cls_token_num, 0)
        keys = jnp.pad(cond_mask, ((0, 0), (0, pad)), constant_values=True)[:, :key_len]
        own = jnp.arange(key_len)[None, None, :] == q_pos[..., None]
        return jnp.logical_or(keys[:, None, :], own)[:, None]

    def _cache_len(self) -> int | None:
        """The cache's slot count, or None before the cache exists (the sizing call of init)."""
        if not self.decode or "cache" not in self.variables:
            return None
        leaves = [x for p, x in jax.tree_util.tree_flatten_with_path(self.variables["cache"])[0]
                  if getattr(p[-1], "key", None) == "cached_key"]
        return leaves[0].shape[-2] if leaves else None  # [.., B, Hkv, max_len, D]

    def _blocks(self, h, mask, rotary, train: bool):
        if self.config.scan_layers:
            h, _ = self.layers(h, mask, rotary, not train)
        else:
            for layer in self.layers:
                h, _ = layer(h, mask, rotary, not train)
        return h

    def _logits(self, h: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.config.dtype)
        h = self.norm(h)
        # bf16 operands, float32 accumulation and result.
        logits = jnp.einsum("btd,dv->btv", h.astype(dtype), self.output.astype(dtype),
                            preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits, LOGIT_AXES)

    # ---- entry points ----

    def __call__(self, cond, tokens: jax.Array, *, cond_mask: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        """Teacher forcing: logits [B, cls_token_num + T, V] float32 (module docstring).

        ``train``: label/caption dropout, token/resid/ffn dropout (needs a 'dropout' rng).
        With ``decode=True`` this is the prefill of condition + ``tokens`` into an empty cache
        (and, under ``init``, the call that sizes the cache to cls_token_num + T slots).
        """
        c = self.config
        tokens = jnp.asarray(tokens).astype(jnp.int32)
        if tokens.shape[1] > c.block_size:
            raise ValueError(f"{tokens.shape[1]} image tokens exceed block_size {c.block_size}")
        h = jnp.concatenate([self._cond_embed(cond, train, cond_mask), self.tok_embeddings(tokens)], axis=1)
        h = self.tok_dropout(h, deterministic=not train)
        h = nn.with_logical_constraint(h, TOKEN_AXES)
        length = h.shape[1]
        cos, sin = self._rope_table()
        q_pos = jnp.arange(length)[None]
        mask = self._mask(cond_mask, q_pos, self._cache_len() or length)
        return self._logits(self._blocks(h, mask, (cos[:length], sin[:length]), train))

    def prefill(self, cond, *, cond_mask: jax.Array | None = None) -> jax.Array:
        """Runs the condition tokens into an empty cache; → logits [B, V] for image token 0."""
        self._need_decode("prefill")
        c = self.config
        h = nn.with_logical_constraint(self._cond_embed(cond, False, cond_mask), TOKEN_AXES)
        cos, sin = self._rope_table()
        q_pos = jnp.arange(c.cls_token_num)[None]
        mask = self._mask(cond_mask, q_pos, self._cache_len() or c.cls_token_num)
        h = self._blocks(h, mask, (cos[:c.cls_token_num], sin[:c.cls_token_num]), False)
        return self._logits(h[:, -1:])[:, 0]

    def step(self, tokens: jax.Array, position, *, cond_mask: jax.Array | None = None) -> jax.Array:
        """Feeds image tokens [B] at sequence ``position`` (a scalar or [B]; = its cache slot,
        cls_token_num + i for image token i); → logits [B, V] for the token after it."""
        self._need_decode("step")
        tokens = jnp.asarray(tokens).astype(jnp.int32).reshape(-1, 1)
        pos = jnp.asarray(position, jnp.int32).reshape(-1, 1)  # [1 or B, 1]
        h = nn.with_logical_constraint(self.tok_embeddings(tokens), TOKEN_AXES)
        cos, sin = self._rope_table()
        mask = self._mask(cond_mask, pos, self._cache_len() or 1)
        h = self._blocks(h, mask, (cos[pos], sin[pos]), False)
        return self._logits(h)[:, 0]

    def _need_decode(self, what: str):
        if not self.decode:
            raise ValueError(f"{what} needs the model built with decode=True (model.clone(decode=True)) and a "
                             "cache from init_cache, applied with mutable=['cache']")


def dummy_cond(config: GPTConfig, batch: int) -> jax.Array:
    """A condition batch of the right type and shape (for init / shape evaluation)."""
    if config.caption_dim:
        return jnp.zeros((batch, config.cls_token_num, config.caption_dim), jnp.float32)
    return jnp.zeros((batch,), jnp.int32)


def init_cache(model: LlamaGenGPT, batch: int, max_len: int) -> Any:
    """The zeroed "cache" collection of ``model`` (built with ``decode=True``) for ``max_len``
    slots: the condition tokens plus every image token that will be fed."""
    if not model.decode:
        raise ValueError("init_cache needs the model built with decode=True")
    c = model.config
    if not c.cls_token_num <= max_len <= c.cls_token_num + c.block_size:
        raise ValueError(f"max_len {max_len} must hold the {c.cls_token_num} condition tokens and at most "
                         f"block_size={c.block_size} image tokens")
    tokens = jnp.zeros((batch, max_len - c.cls_token_num), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy_cond(c, batch), tokens))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def abstract_variables(model: LlamaGenGPT) -> Any:
    """The (logically boxed) variable shapes of ``model`` ('params', and 'constants' for t2i)."""
    c = model.config
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.clone(decode=False).init(jax.random.key(0), dummy_cond(c, 1), tokens))


def count_params(config: GPTConfig) -> int:
    """Trainable parameters of ``config`` (the reference's ``sum(p.numel() for p in
    model.parameters())``: the t2i ``uncond_embedding`` buffer is not one)."""
    params = nn.meta.unbox(abstract_variables(LlamaGenGPT(config))["params"])
    return sum(int(x.size) for x in jax.tree.leaves(params))


__all__ = ["GPTConfig", "LlamaGenGPT", "LabelEmbedder", "CaptionEmbedder", "VARIANTS", "variant", "find_multiple",
           "dummy_cond", "init_cache", "abstract_variables", "count_params"]
