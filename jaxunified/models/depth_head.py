"""kakaobrain's RQ-Transformer (``rqvae/models/rqtransformer``): a spatial body and a depth head.

Codes are ``[B, H, W, D]`` (an H×W grid of depth-``D`` residual codes). Two causal GPT-2 stacks
(pre-LN ``nn.transformer.EncoderBlock``: separate q/k/v/out projections with biases, GELU MLP 4×,
LayerNorm eps 1e-5, resid dropout on both branches):

* **body** over ``Lc + HW − 1`` tokens (``Lc`` = ``block_size_cond``): the condition tokens
  ``cond_emb(cond) + pos_emb_cond``, then for raster position ``i ≥ 1`` the depth-summed code
  embeddings of position ``i − 1`` plus ``pos_emb_hw[i − 1]`` (shifted right; the last position's
  codes are never fed). Output ``Lc − 1 + i`` is the spatial context of position ``i``.
* **depth head** (``DepthTransformer``), per position, over ``D`` tokens:
  ``[context, e_0, …, e_{D−2}] + pos_emb_d``, then LayerNorm + classifier. Output ``d`` gives the
  logits of ``codes[..., d]``.

Code embeddings, by the reference's flags:

* ``input_emb_vqvae`` / ``head_emb_vqvae`` (every released config): rows of the frozen RQ-VAE
  codebook through ``input_mlp`` (body) / ``head_mlp`` (head; with ``cumsum_depth_ctx`` the head
  sees the cumulative sums ``Σ_{j≤d} e(code_j)``, i.e. the partial RQ reconstructions). The
  codebook is a variable of the ``"constants"`` collection (``rqvae_codebook/embedding`` [V, E_in],
  the RQ-VAE's padding row dropped; [D, V, E_in] for a non-shared RQ-VAE), so the converted model
  is self-contained and optimisers never see it.
* otherwise ``tok_emb``: one table shared by all depths (``shared_tok_emb``) or a TupleEmbedding
  (one table of ``Σ vocab`` rows, depth ``d`` reading row ``code + offsets[d]``). ``tok_emb`` feeds
  whichever of body/head is not fed from the codebook, and the head then gets no cumsum (as in
  the reference).

The classifier is shared over depth (``shared_cls_emb``) or one per depth (BatchLinear kernel
[D, E, V], bias [D, V]): the per-depth-head form (DualToken's paper: one classification head per
depth in each of its pixel and semantic heads).
``DepthTransformer`` runs on any context, so an MLLM can put it on its LLM hidden states.

Quirks and choices:

* ``block_size_cond > 1`` (CC3M's 32 text tokens) adds ``cond_classifier`` and ``__call__``
  returns ``(logits, cond_logits)``, where ``cond_logits[:, j]`` predicts ``cond[:, j + 1]``.
* unequal per-depth vocabularies mask each depth's extra logits to −1e6 (the reference's
  ``LogitMask`` value; its masking branch indexes the wrong axis of [B, H, W, D, V], so it is
  broken there, and no released config uses it).
* ``use_padding_emb`` and ``scaled_head_emb_vqvae`` are reference config fields that its
  RQTransformer never reads; they are kept for config round trips and do nothing here either.
* CFG (not in the reference): ``null_cond=True`` adds one ``cond_emb`` row, index
  ``vocab_size_cond``, as the null class; ``cond_dropout`` replaces training labels by it. A
  released checkpoint has no such row: guiding it needs an explicit null class (``sample.rq``).
* from-scratch init: embeddings and position embeddings N(0, 0.02) as the reference, dense
  kernels ``nn``'s xavier; the codebook constant N(0, 1) (a real one comes from the RQ-VAE).

Decoding (``decode=True``, caches from ``init_cache``): ``prefill_cond`` runs condition tokens
``0..Lc−2``; ``decode_body(cond, prev_codes, t)`` feeds body token ``Lc − 1 + t`` (the last
condition token at t = 0, else the codes of position t − 1) through the body's KV cache and
returns the spatial context of position t; ``decode_head(ctx, codes_t, d)`` feeds depth token
``d`` through the head's cache (the caller resets ``cache["depth_head"]`` before d = 0, see
``reset_head_cache``) and returns the logits of depth d. Body then head steps reproduce the
teacher-forced logits (tested to 1e-5).

``RQVAEDecoder`` is the RQ-VAE's ``decode_code`` (codebook sum → 1×1 ``post_quant_conv`` → the
taming decoder of ``models.vqgan``), so sampled codes can be shown as images.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.models.vqgan import Decoder
from jaxunified.nn.attention import causal_mask
from jaxunified.nn.conv import conv
from jaxunified.nn.dense import dense
from jaxunified.nn.norm import layer_norm
from jaxunified.nn.transformer import EncoderBlock

_GELU = {"v1": "gelu", "v2": "quick_gelu"}
# LogitMask's fill for ids beyond a depth's own vocabulary.
MASK_VALUE = -1e6


@dataclasses.dataclass(frozen=True)
class RQTransformerConfig:
    """The reference's ``RQTransformerConfig`` with the body/head block configs flattened.

    ``vocab_size``: one int, or one per depth. ``block_size`` = (H, W, D). ``vocab_size_cond`` 0
    or 1 means unconditional (one SOS row, class id 0; the reference's ``max(·, 1)``).
    ``mlp_bias``/``attn_bias`` must be True and ``attn_pdrop`` 0 (every released config; the
    shared ``nn`` blocks have no switch for them). Beyond the reference: ``null_cond`` /
    ``cond_dropout`` (CFG, module docstring), ``rqvae_shared_codebook`` (the codebook constant's
    layout), ``dtype`` (block compute dtype; logits stay float32).
    """

    vocab_size: int | tuple[int, ...] = 16384
    block_size: tuple[int, int, int] = (8, 8, 4)
    vocab_size_cond: int = 1000
    block_size_cond: int = 1
    embed_dim: int = 1536
    input_embed_dim: int | None = 256
    use_padding_emb: bool = False
    input_emb_vqvae: bool = True
    head_emb_vqvae: bool = True
    scaled_head_emb_vqvae: bool = False
    cumsum_depth_ctx: bool = True
    shared_tok_emb: bool = True
    shared_cls_emb: bool = True
    embd_pdrop: float = 0.0
    body_layers: int = 12
    body_heads: int = 24
    head_layers: int = 4
    head_heads: int = 24
    mlp_bias: bool = True
    attn_bias: bool = True
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.1
    gelu: str = "v1"
    ln_eps: float = 1e-5
    null_cond: bool = False
    cond_dropout: float = 0.0
    rqvae_shared_codebook: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise once)
        set_("block_size", tuple(int(s) for s in self.block_size))
        if not isinstance(self.vocab_size, int):
            set_("vocab_size", tuple(int(v) for v in self.vocab_size))
        if len(self.block_size) != 3 or min(self.block_size) < 1:
            raise ValueError(f"block_size must be (H, W, D) of positive ints, got {self.block_size}")
        if len(self.vocabs) != self.depth:
            raise ValueError(f"{len(self.vocabs)} vocab sizes for depth {self.depth}")
        if (self.shared_tok_emb and self.uses_tok_emb) or self.shared_cls_emb or self.uses_codebook:
            if len(set(self.vocabs)) > 1:
                raise ValueError(f"per-depth vocab sizes {self.vocabs} need shared_tok_emb=False, "
                                 "shared_cls_emb=False and no RQ-VAE embeddings (one codebook has one size)")
        if self.uses_codebook and not self.input_embed_dim:
            raise ValueError("input_emb_vqvae/head_emb_vqvae need input_embed_dim (the RQ-VAE code dim)")
        for name, heads in (("body", self.body_heads), ("head", self.head_heads)):
            if self.embed_dim % heads:
                raise ValueError(f"embed_dim {self.embed_dim} is not divisible by {name}_heads={heads}")
        if self.gelu not in _GELU:
            raise ValueError(f"gelu must be 'v1' (exact) or 'v2' (x·sigmoid(1.702x)), got {self.gelu!r}")
        if not (self.mlp_bias and self.attn_bias) or self.attn_pdrop:
            raise ValueError("mlp_bias=False, attn_bias=False and attn_pdrop > 0 are not supported (no released "
                             "RQ-Transformer uses them)")
        if self.cond_dropout and not (self.null_cond and self.block_size_cond == 1):
            raise ValueError("cond_dropout needs null_cond=True (the row labels drop to) and block_size_cond=1")
        if self.block_size_cond > 1 and self.vocab_size_cond <= 1:
            raise ValueError("block_size_cond > 1 needs a condition vocabulary (vocab_size_cond > 1)")
        jnp.dtype(self.dtype)  # a bad name raises here, not mid-trace

    @property
    def depth(self) -> int:
        return self.block_size[2]

    @property
    def num_positions(self) -> int:
        return self.block_size[0] * self.block_size[1]

    @property
    def vocabs(self) -> tuple[int, ...]:
        if isinstance(self.vocab_size, int):
            return (self.vocab_size,) * self.depth
        return self.vocab_size

    @property
    def cond_len(self) -> int:
        return max(self.block_size_cond, 1)

    @property
    def cond_vocab(self) -> int:
        return max(self.vocab_size_cond, 1)

    @property
    def cond_rows(self) -> int:
        return self.cond_vocab + int(self.null_cond)

    @property
    def null_class(self) -> int | None:
        """The CFG null class id, or None when the table has no null row."""
        return self.cond_vocab if self.null_cond else None

    @property
    def uses_codebook(self) -> bool:
        return self.input_emb_vqvae or self.head_emb_vqvae

    @property
    def uses_tok_emb(self) -> bool:
        return not (self.input_emb_vqvae and self.head_emb_vqvae)

    @property
    def tok_offsets(self) -> np.ndarray:
        """TupleEmbedding's ``offsets`` buffer: depth d's rows start at Σ_{j<d} vocab_j."""
        return np.cumsum((0,) + self.vocabs[:-1]).astype(np.int64)

    @property
    def codebook_shape(self) -> tuple[int, ...]:
        book = (self.vocabs[0], int(self.input_embed_dim or 0))
        return book if self.rqvae_shared_codebook else (self.depth, *book)


def _tiny(**kw) -> RQTransformerConfig:
    """The rq_transformer_tiny golden's shape (4×4×4 codes, vocab 32, 10 classes, width 64)."""
    base = dict(vocab_size=32, block_size=(4, 4, 4), vocab_size_cond=10, embed_dim=64, input_embed_dim=16,
                body_layers=2, body_heads=4, head_layers=2, head_heads=4)
    return RQTransformerConfig(**{**base, **kw})


def _released(embed_dim, body, head, heads, **kw) -> RQTransformerConfig:
    return RQTransformerConfig(embed_dim=embed_dim, body_layers=body, head_layers=head, body_heads=heads,
                               head_heads=heads, **kw)


# The released stage-2 configs (``configs/*/stage2/*.yaml``): 8×8×4 codes, RQ-VAE embeddings of dim
# 256, shared tok/cls embeddings, cumsum depth context.
VARIANTS: dict[str, RQTransformerConfig] = {
    "ImageNet-480M": _released(1536, 12, 4, 24),
    "ImageNet-800M": _released(1536, 24, 4, 24),
    "ImageNet-1.4B": _released(1536, 42, 6, 24),
    "ImageNet-3.8B": _released(2560, 42, 6, 40),
    "CC3M-650M": _released(1280, 26, 4, 20, vocab_size_cond=16384, block_size_cond=32),
    "FFHQ-350M": _released(1024, 24, 4, 16, vocab_size=2048, vocab_size_cond=1),
    "tiny": _tiny(),
    # The other path (rq_transformer_tiny_perdepth): TupleEmbedding and one classifier per depth.
    "tiny-perdepth": _tiny(input_embed_dim=None, input_emb_vqvae=False, head_emb_vqvae=False, cumsum_depth_ctx=False,
                           shared_tok_emb=False, shared_cls_emb=False),
}


def variant(name: str, **overrides) -> RQTransformerConfig:
    """A variant by name (``VARIANTS``) with ``RQTransformerConfig`` field overrides."""
    if name not in VARIANTS:
        raise ValueError(f"unknown RQ-Transformer variant {name!r}; known: {', '.join(VARIANTS)}")
    return dataclasses.replace(VARIANTS[name], **overrides)


def _embed(rows: int, dim: int, name: str) -> nn.Embed:
    return nn.Embed(rows, dim, param_dtype=jnp.float32, name=name,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))


def _pos_emb(module: nn.Module, name: str, length: int, dim: int) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                        (length, dim), jnp.float32)


class GPTStack(nn.Module):
    """Causal pre-LN blocks (the reference's ``AttentionStack``, MLP 4× wide); params ``blocks_{i}``."""

    embed_dim: int
    num_layers: int
    num_heads: int
    act: str = "gelu"
    ln_eps: float = 1e-5
    dropout: float = 0.0
    dtype: Any = jnp.float32
    decode: bool = False

    def setup(self):
        kw = dict(act=self.act, ln_eps=self.ln_eps, dtype=self.dtype, decode=self.decode, dropout_rate=self.dropout)
        self.blocks = [EncoderBlock(self.num_heads, 4 * self.embed_dim, **kw) for _ in range(self.num_layers)]

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        # With decode the attention's cache supplies causality over the cached prefix.
        mask = None if self.decode else causal_mask(x.shape[1])
        for blk in self.blocks:
            x, _ = blk(x, mask, deterministic)
        return x


class BatchLinear(nn.Module):
    """One Linear per depth (the reference's ``BatchLinear``): kernel [D, E, V], bias [D, V].

    ``depth`` None: token t of [N, D, E] goes through linear t; else every token through ``depth``'s."""

    num: int
    features: int

    @nn.compact
    def __call__(self, h: jax.Array, depth: int | None = None) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                   (None, "embed", "vocab")),
                            (self.num, h.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None, "vocab")),
                          (self.num, self.features), jnp.float32)
        if depth is None:
            return jnp.einsum("nte,tev->ntv", h, kernel) + bias
        return h @ kernel[depth] + bias[depth]


class Classifier(nn.Module):
    """LayerNorm + Linear, one Linear for all depths or one per depth; [N, T, E] → [N, T, V]."""

    vocabs: tuple[int, ...]
    shared: bool = True
    ln_eps: float = 1e-5

    @nn.compact
    def __call__(self, h: jax.Array, depth: int | None = None) -> jax.Array:
        """``depth`` None: token t of ``h`` is depth t; else every token is at that depth."""
        vmax = max(self.vocabs)
        h = layer_norm(self.ln_eps, "layer_norm")(h)
        if self.shared:
            logits = dense(vmax, ("embed", "vocab"), dtype=jnp.float32, name="linear")(h)
        else:
            logits = BatchLinear(len(self.vocabs), vmax, name="linear")(h, depth)
        if len(set(self.vocabs)) > 1:
            d = jnp.arange(h.shape[1]) if depth is None else jnp.full((h.shape[1],), depth)
            limit = jnp.asarray(self.vocabs)[d]
            logits = jnp.where(jnp.arange(vmax) < limit[:, None], logits, MASK_VALUE)
        return logits


class DepthTransformer(nn.Module):
    """The depth head: ``[context, e_0 … e_{D−2}] + pos_emb_d`` → causal stack → classifier.

    ``__call__(ctx [N, E], depth_emb [N, ≥D−1, E])`` → logits [N, D, V] (teacher forcing; only
    ``depth_emb[:, :D−1]`` is read). ``step(x [N, E], d)`` (decode) feeds depth token ``d``
    (the context at d = 0, else ``depth_emb[:, d − 1]``) through the cache → logits [N, V].
    """

    embed_dim: int
    vocabs: tuple[int, ...]
    num_layers: int
    num_heads: int
    shared_cls: bool = True
    act: str = "gelu"
    ln_eps: float = 1e-5
    dropout: float = 0.0
    dtype: Any = jnp.float32
    decode: bool = False

    def setup(self):
        self.pos_emb_d = _pos_emb(self, "pos_emb_d", len(self.vocabs), self.embed_dim)
        self.head_transformer = GPTStack(self.embed_dim, self.num_layers, self.num_heads, self.act, self.ln_eps,
                                         self.dropout, self.dtype, self.decode)
        self.classifier = Classifier(self.vocabs, self.shared_cls, self.ln_eps)

    def __call__(self, ctx: jax.Array, depth_emb: jax.Array, train: bool = False) -> jax.Array:
        depth = len(self.vocabs)
        x = jnp.concatenate([ctx[:, None], depth_emb[:, :depth - 1]], axis=1) + self.pos_emb_d
        return self.classifier(self.head_transformer(x, deterministic=not train))

    def step(self, x: jax.Array, d: int) -> jax.Array:
        h = self.head_transformer((x + self.pos_emb_d[d])[:, None])
        return self.classifier(h, depth=d)[:, 0]

    def size_cache(self, batch: int) -> jax.Array:
        """Runs D zero tokens (init only: sizes the head's cache for ``batch`` rows)."""
        return self.head_transformer(jnp.zeros((batch, len(self.vocabs), self.embed_dim), jnp.float32))


class FrozenCodebook(nn.Module):
    """The RQ-VAE codebook as a ``"constants"`` variable; codes [..., D] → rows [..., D, E_in]."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, codes: jax.Array) -> jax.Array:
        if not self.has_variable("constants", "embedding") and not self.is_mutable_collection("constants"):
            raise ValueError("this RQ-Transformer embeds codes with the RQ-VAE codebook: pass the whole variables "
                             "dict (with 'constants') from init or convert.load, not only 'params'")
        book = self.variable("constants", "embedding",
                             lambda: jax.random.normal(self.make_rng("params"), self.shape, jnp.float32)).value
        if book.ndim == 2:
            return book[codes]
        # One book per depth: depth d reads book[d].
        return jnp.stack([book[d][codes[..., d]] for d in range(codes.shape[-1])], axis=-2)


class RQTransformer(nn.Module):
    """kakaobrain's ``RQTransformer`` (module docstring). ``cond``: [B] or [B, block_size_cond]
    int ids (None: zeros, the reference's SOS)."""

    config: RQTransformerConfig
    decode: bool = False

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        act = _GELU[c.gelu]
        self.cond_emb = _embed(c.cond_rows, c.embed_dim, "cond_emb")
        if c.uses_tok_emb:
            self.tok_emb = _embed(c.vocabs[0] if c.shared_tok_emb else sum(c.vocabs), c.embed_dim, "tok_emb")
        if c.uses_codebook:
            self.rqvae_codebook = FrozenCodebook(c.codebook_shape)
        if c.input_emb_vqvae:
            self.input_mlp = dense(c.embed_dim, (None, "embed"), name="input_mlp")
        if c.head_emb_vqvae:
            self.head_mlp = dense(c.embed_dim, (None, "embed"), name="head_mlp")
        self.pos_emb_cond = _pos_emb(self, "pos_emb_cond", c.cond_len, c.embed_dim)
        self.pos_emb_hw = _pos_emb(self, "pos_emb_hw", c.num_positions, c.embed_dim)
        self.embed_drop = nn.Dropout(c.embd_pdrop)
        self.body_transformer = GPTStack(c.embed_dim, c.body_layers, c.body_heads, act, c.ln_eps, c.resid_pdrop, dtype,
                                         self.decode)
        self.depth_head = DepthTransformer(c.embed_dim, c.vocabs, c.head_layers, c.head_heads, c.shared_cls_emb, act,
                                           c.ln_eps, c.resid_pdrop, dtype, self.decode)
        if c.cond_len > 1:
            self.cond_classifier = Classifier((c.cond_vocab,), True, c.ln_eps)

    # ---- embeddings ----

    def _tok_emb(self, codes: jax.Array) -> jax.Array:
        c = self.config
        if not c.shared_tok_emb:
            codes = codes + jnp.asarray(c.tok_offsets, jnp.int32)
        return self.tok_emb(codes)

    def body_embed(self, codes: jax.Array) -> jax.Array:
        """Codes [..., D] → per-depth body embeddings [..., D, E] (summed by the caller)."""
        if self.config.input_emb_vqvae:
            return self.input_mlp(self.rqvae_codebook(codes))
        return self._tok_emb(codes)

    def head_embed(self, codes: jax.Array) -> jax.Array:
        """Codes [..., D] → the head's depth embeddings [..., D, E]; entry d is fed at depth d + 1."""
        c = self.config
        if c.head_emb_vqvae:
            emb = self.rqvae_codebook(codes)
            if c.cumsum_depth_ctx:
                emb = jnp.cumsum(emb, axis=-2)
            return self.head_mlp(emb)
        return self._tok_emb(codes)

    def code_embeddings(self, codes: jax.Array) -> jax.Array:
        """Codes [..., D] → RQ-VAE codebook rows [..., D, E_in] (the reference's
        ``model_aux.get_code_emb_with_depth``; no cumsum)."""
        return self.rqvae_codebook(jnp.asarray(codes).astype(jnp.int32))

    def cond_embed(self, cond: jax.Array | None, batch: int, train: bool = False) -> jax.Array:
        """[B, Lc, E]: condition rows plus ``pos_emb_cond``; label dropout to the null row in training."""
        c = self.config
        if cond is None:
            cond = jnp.zeros((batch, c.cond_len), jnp.int32)
        cond = jnp.asarray(cond).astype(jnp.int32).reshape(batch, c.cond_len)
        if train and c.cond_dropout > 0:
            drop = jax.random.uniform(self.make_rng("dropout"), cond.shape) < c.cond_dropout
            cond = jnp.where(drop, c.null_class, cond)
        return self.cond_emb(cond) + self.pos_emb_cond

    # ---- teacher forcing ----

    def __call__(self, codes: jax.Array, cond: jax.Array | None = None, train: bool = False):
        """Logits [B, H, W, D, V] float32, ``logits[:, h, w, d]`` predicting ``codes[:, h, w, d]``;
        with block_size_cond > 1 also cond_logits [B, Lc − 1, vocab_size_cond]. ``train``:
        dropouts (the 'dropout' rng)."""
        c = self.config
        self._no_decode("__call__")
        codes = jnp.asarray(codes).astype(jnp.int32)
        b, h, w, d = codes.shape
        if (h, w, d) != c.block_size:
            raise ValueError(f"codes must be [B, {', '.join(map(str, c.block_size))}] (block_size), got {codes.shape}")
        xs = codes.reshape(b, h * w, d)
        conds = self.cond_embed(cond, b, train)
        xs_emb = self.body_embed(xs).sum(axis=-2) + self.pos_emb_hw
        latents = jnp.concatenate([conds, xs_emb[:, :-1]], axis=1)
        latents = self.embed_drop(latents, deterministic=not train)
        latents = self.body_transformer(latents, deterministic=not train)
        spatial = latents[:, c.cond_len - 1:].reshape(b * h * w, c.embed_dim)
        depth_emb = self.head_embed(xs).reshape(b * h * w, d, c.embed_dim)
        logits = self.depth_head(spatial, depth_emb, train).reshape(b, h, w, d, -1)
        if c.cond_len > 1:
            return logits, self.cond_classifier(latents[:, :c.cond_len - 1])
        return logits

    # ---- decoding ----

    def prefill_cond(self, cond: jax.Array | None, batch: int) -> None:
        """Runs condition tokens 0..Lc−2 into the body cache (nothing when Lc = 1)."""
        self._need_decode("prefill_cond")
        c = self.config
        if c.cond_len > 1:
            self.body_transformer(self.cond_embed(cond, batch)[:, :-1])

    def decode_body(self, cond: jax.Array | None, prev_codes: jax.Array, t) -> jax.Array:
        """Spatial context [R, E] of position ``t`` (scalar, may be traced): feeds the last
        condition token (t = 0) or the codes [R, D] of position t − 1 through the body cache."""
        self._need_decode("decode_body")
        prev_codes = jnp.asarray(prev_codes).astype(jnp.int32)
        batch = prev_codes.shape[0]
        t = jnp.asarray(t, jnp.int32)
        first = self.cond_embed(cond, batch)[:, -1]
        code_tok = self.body_embed(prev_codes).sum(axis=-2) + self.pos_emb_hw[jnp.maximum(t - 1, 0)]
        x = jnp.where(t == 0, first, code_tok)
        return self.body_transformer(x[:, None])[:, 0]

    def decode_head(self, ctx: jax.Array, codes_t: jax.Array, d: int) -> jax.Array:
        """Logits [R, V] of depth ``d`` (a Python int) at a position with context ``ctx`` [R, E],
        whose codes [R, D] are known below d; feeds depth token d through the head cache."""
        self._need_decode("decode_head")
        x = ctx if d == 0 else self.head_embed(jnp.asarray(codes_t).astype(jnp.int32))[:, d - 1]
        return self.depth_head.step(x, d)

    def size_cache(self, batch: int) -> None:
        """Init only: runs body and head over their full lengths to size the decode caches."""
        c = self.config
        self.body_transformer(jnp.zeros((batch, c.cond_len + c.num_positions - 1, c.embed_dim), jnp.float32))
        self.depth_head.size_cache(batch)

    def _need_decode(self, what: str):
        if not self.decode:
            raise ValueError(f"{what} needs the model built with decode=True (model.clone(decode=True)) and a cache "
                             "from init_cache, applied with mutable=['cache']")

    def _no_decode(self, what: str):
        if self.decode:
            raise ValueError(f"{what} is the teacher-forced forward; use the model built with decode=False")


class RQVAEDecoder(nn.Module):
    """kakaobrain RQ-VAE ``decode_code``: Σ_d codebook[code_d] → 1×1 ``post_quant_conv`` → the taming
    decoder (``models.vqgan.Decoder``, attention at the deepest level). Codes [B, h, w, D] →
    images [B, H, W, 3] NHWC in about [−1, 1]. The codebook is the ``"constants"`` variable
    ``codebook`` ([V, E] shared, or [D, V, E]); ``cfg.z_channels`` is the RQ-VAE's z_channels."""

    cfg: Any  # models.vqgan.VQGANConfig
    codebook_shape: tuple[int, ...]

    @nn.compact
    def __call__(self, codes: jax.Array) -> jax.Array:
        codes = jnp.asarray(codes).astype(jnp.int32)
        book = self.variable("constants", "codebook", jnp.zeros, self.codebook_shape, jnp.float32).value
        if book.ndim == 2:
            z = book[codes].sum(axis=-2)
        else:
            z = sum(book[d][codes[..., d]] for d in range(codes.shape[-1]))
        z = conv(self.cfg.z_channels, 1, dtype=self.cfg.dtype, name="post_quant_conv")(z.astype(self.cfg.dtype))
        return Decoder(self.cfg, name="decoder")(z)[0]


def init_cache(model: RQTransformer, batch: int) -> Any:
    """The zeroed "cache" collection of ``model`` (decode=True) for ``batch`` rows: the body's
    Lc + HW − 1 slots and the head's D slots."""
    if not model.decode:
        raise ValueError("init_cache needs the model built with decode=True")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, method="size_cache"))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def reset_head_cache(cache: Any) -> Any:
    """``cache`` with the depth head's part zeroed (index 0): done before each position's depth 0."""
    return {**cache, "depth_head": jax.tree.map(jnp.zeros_like, cache["depth_head"])}


def dummy_inputs(config: RQTransformerConfig, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """(codes, cond) of the right shapes for init / shape evaluation."""
    return (jnp.zeros((batch, *config.block_size), jnp.int32), jnp.zeros((batch, config.cond_len), jnp.int32))


def abstract_variables(config: RQTransformerConfig) -> Any:
    """The unboxed variable shapes ('params', and 'constants' when the RQ-VAE codebook is used)."""
    model = RQTransformer(config)
    return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config))))


def count_params(config: RQTransformerConfig) -> int:
    """Trainable parameters (the RQ-VAE codebook constant is not one, as in the reference)."""
    return sum(int(x.size) for x in jax.tree.leaves(abstract_variables(config)["params"]))


def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if jnp.issubdtype(targets.dtype, jnp.integer):
        return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -jnp.sum(targets.astype(jnp.float32) * logp, axis=-1)


def loss_fn(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy over every (b, h, w, d): hard codes [..., D] (the reference's
    ``compute_loss``) or soft targets [..., D, V] (``soft_target_cross_entropy``)."""
    return jnp.mean(_nll(logits, targets))


def per_depth_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """[D] cross-entropy of each depth (the reference's ``compute_codebook_loss``, for logging)."""
    nll = _nll(logits, targets)
    return nll.reshape(-1, nll.shape[-1]).mean(axis=0)


__all__ = [
    "RQTransformerConfig", "RQTransformer", "DepthTransformer", "GPTStack", "Classifier", "BatchLinear",
    "FrozenCodebook", "RQVAEDecoder", "VARIANTS", "variant", "init_cache", "reset_head_cache", "dummy_inputs",
    "abstract_variables", "count_params", "loss_fn", "per_depth_loss", "MASK_VALUE",
]
