"""SigLIP / SigLIP2 two-tower model (HF ``SiglipModel`` layout, big_vision numerics).

Vision tower: VALID patch conv → + learned position embedding (resizable) → pre-LN encoder →
post-LayerNorm → MAP head. Options used elsewhere: a causal raster-order mask (TokLIP), every
layer's hidden state (DualToken taps layers 4/6/26), and entry from given token embeddings
instead of pixels (TokLIP feeds VQ-code embeddings; DualToken resumes after layer 26); an optional
convolutional stem before the patch conv (``VisionConfig.stem``; off for every released variant).

Text tower: token + position embedding → encoder → final LayerNorm → the last position's
state (SigLIP pads to a fixed length and pools position L-1) → linear head.

Images are NHWC in [-1, 1] (SigLIP's mean = std = 0.5 normalisation).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.nn.attention import causal_mask, padding_mask
from jaxunified.nn.conv import feature_map
from jaxunified.nn.norm import l2_normalize, layer_norm
from jaxunified.nn.sharding import TOKEN_AXES, constrain
from jaxunified.nn.transformer import Encoder, MAPHead, resize_posemb, unstack_layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    patch_size: int = 16
    image_size: int = 224
    num_channels: int = 3
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    pool: str = "map"  # "map" | "gap" | "none"
    # Convolutional stem before patchifying ("Early convolutions help transformers see better",
    # Xiao et al. 2021): ((features, stride), ...) of 3x3 convs with GELU; the patch conv then
    # covers the remaining patch_size / prod(strides). () is the plain SigLIP patch conv.
    stem: tuple[tuple[int, int], ...] = ()
    causal: bool = False
    # With causal=True: attention in this many query blocks that skip the keys after their end
    # (nn/attention.py; same outputs, less work). Must divide the token count.
    causal_chunks: int = 1
    scan: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def stem_stride(self) -> int:
        return math.prod(int(s) for _, s in self.stem)

    def __post_init__(self):
        if self.causal_chunks < 1:
            raise ValueError(f"causal_chunks must be ≥ 1, got {self.causal_chunks}")
        if self.stem and self.patch_size % self.stem_stride:
            raise ValueError(f"the stem's strides (product {self.stem_stride}) must divide patch_size "
                             f"{self.patch_size}")

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32000
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    max_len: int = 64
    proj_dim: int = 768
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    pad_id: int = 1
    # Mask padding keys (tokens == pad_id) in every layer. SigLIP trains without it (the pooled
    # last position reads the pads too); from scratch on short captions padded to a fixed length
    # the pads dominate every caption's early embedding.
    mask_padding: bool = False
    scan: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig | None = TextConfig()
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float = -10.0


# Shape-defining fields of the released models (HF config.json / big_vision decode_variant).
_WIDTHS = {
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),
    # Tiny towers: golden parity (hf_siglip_tiny) and the built-in shapes pipeline.
    "tiny": dict(width=32, depth=2, mlp_dim=64, num_heads=4),
    "shapes-S": dict(width=96, depth=4, mlp_dim=384, num_heads=4),
}

# name → (tower, patch, default resolution, text vocab, text max_len, text pad id)
VARIANTS: dict[str, tuple[str, int, int, int, int, int]] = {
    "B/16": ("B", 16, 224, 32000, 64, 1),
    "L/16": ("L", 16, 256, 32000, 64, 1),
    "So400m/14": ("So400m", 14, 384, 32000, 64, 1),
    "So400m/16": ("So400m", 16, 384, 256000, 64, 0),  # SigLIP2 only (Gemma vocabulary)
    "siglip2-B/16": ("B", 16, 256, 256000, 64, 0),
    "siglip2-L/16": ("L", 16, 256, 256000, 64, 0),
    "siglip2-So400m/14": ("So400m", 14, 384, 256000, 64, 0),
    "tiny": ("tiny", 8, 32, 100, 16, 1),
    "shapes-S": ("shapes-S", 4, 32, 260, 64, 0),
}


def get_config(name: str, *, image_size: int | None = None, vision: dict | None = None, text: dict | None = None,
               with_text: bool = True, **overrides) -> SigLIPConfig:
    """A variant by name (``VARIANTS``), e.g. ``get_config("So400m/16", image_size=384)``.

    ``vision``/``text`` override tower fields (``vision=dict(scan=True, remat=True)``),
    ``with_text=False`` builds the vision tower alone.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown SigLIP variant {name!r}; known: {', '.join(VARIANTS)}")
    tower, patch, res, vocab, max_len, pad = VARIANTS[name]
    dims = _WIDTHS[tower]
    v = VisionConfig(**dims, patch_size=patch, image_size=image_size or res)
    v = dataclasses.replace(v, **(vision or {}))
    t = None
    if with_text:
        t = TextConfig(**dims, vocab_size=vocab, max_len=max_len, proj_dim=dims["width"], pad_id=pad)
        t = dataclasses.replace(t, **(text or {}))
    return dataclasses.replace(SigLIPConfig(vision=v, text=t), **overrides)


def _embed_init():
    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) / np.sqrt(shape[-1])

    return init


class VisionTower(nn.Module):
    cfg: VisionConfig

    def setup(self):
        c = self.cfg
        self.stem = [
            nn.Conv(f, (3, 3), strides=(s, s), padding="SAME", dtype=c.dtype,
                     kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                              (None, None, "conv_in", "conv_out")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))
            for f, s in c.stem
        ]
        p = c.patch_size // c.stem_stride if c.stem else c.patch_size
        self.patch_embed = nn.Conv(
            c.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=c.dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        )
        self.pos_embedding = self.param(
            "pos_embedding", nn.with_logical_partitioning(_embed_init(), ("length", "embed")), (c.num_patches, c.width)
        )
        # Chunking only ever sees this tower's own causal mask: encode(causal=False) passes none.
        self.encoder = Encoder(c.depth, c.num_heads, c.mlp_dim, c.act, c.ln_eps, c.dtype, c.scan, c.remat,
                               c.causal_chunks if c.causal else 1)
        self.post_ln = layer_norm(c.ln_eps)
        if c.pool == "map":
            self.head = MAPHead(c.num_heads, c.mlp_dim, c.act, c.ln_eps, c.dtype)

    def _check_image(self, images: jax.Array) -> None:
        c = self.cfg
        if images.ndim != 4 or images.shape[-1] != c.num_channels:
            raise ValueError(f"SigLIP expects NHWC images with {c.num_channels} channels, got shape {images.shape}")
        if images.shape[1] < c.patch_size or images.shape[2] < c.patch_size:
            raise ValueError(f"image {images.shape[1:3]} is smaller than one {c.patch_size}px patch")

    def patchify(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        self._check_image(images)
        x = feature_map(images.astype(self.cfg.dtype))
        for conv in self.stem:
            x = feature_map(nn.gelu(conv(x), approximate=False))
        x = feature_map(self.patch_embed(x))
        b, gh, gw, d = x.shape
        return constrain(x.reshape(b, gh * gw, d), TOKEN_AXES), (gh, gw)

    def posemb(self, grid: tuple[int, int] | None = None) -> jax.Array:
        g = self.cfg.grid
        return resize_posemb(self.pos_embedding, (g, g), grid or (g, g))

    def embed(self, images: jax.Array) -> jax.Array:
        """Pixels → patch embeddings + position embeddings, [B, N, D]."""
        x, grid = self.patchify(images)
        return constrain(x + self.posemb(grid).astype(x.dtype)[None], TOKEN_AXES)

    def attention_mask(self, length: int, causal: bool | None = None) -> jax.Array | None:
        causal = self.cfg.causal if causal is None else causal
        return causal_mask(length) if causal else None

    def encode(self, x: jax.Array, start: int = 0, stop: int | None = None, causal: bool | None = None):
        """Runs encoder layers [start, stop) on token states [B, N, D]; returns (x, per-layer outputs)."""
        return self.encoder(x, self.attention_mask(x.shape[1], causal), start, stop)

    def finish(self, x: jax.Array) -> dict[str, jax.Array]:
        """Post-LayerNorm and pooling of the last hidden state."""
        last = self.post_ln(x)
        pool = self.cfg.pool
        if pool == "map":
            pooled = self.head(last.astype(self.cfg.dtype))
        elif pool == "gap":
            pooled = last.mean(axis=1)
        elif pool == "none":
            pooled = None
        else:
            raise ValueError(f"unknown pool {pool!r}; use map, gap or none")
        return {"last_hidden": last, "pooled": pooled}

    def __call__(
        self,
        images: jax.Array | None = None,
        *,
        token_embeds: jax.Array | None = None,
        add_posemb: bool = True,
        causal: bool | None = None,
        return_hidden: bool = False,
    ) -> dict[str, Any]:
        """Pixels, or token embeddings [B, N, D] that replace the patch embedding (TokLIP).

        Returns ``last_hidden`` (after post-LN), ``pooled`` and, with ``return_hidden``,
        ``hidden_states`` = (embeddings, layer 1 output, …, layer depth output) as HF orders them.
        """
        if (images is None) == (token_embeds is None):
            raise ValueError("pass exactly one of images or token_embeds")
        if images is not None:
            x = self.embed(images)
        else:
            x = token_embeds.astype(self.cfg.dtype)
            if add_posemb:
                n = x.shape[1]
                g = int(round(math.sqrt(n)))
                if g * g != n:
                    raise ValueError(f"{n} token embeddings do not form a square grid for the position embedding")
                x = x + self.posemb((g, g)).astype(x.dtype)[None]
            x = constrain(x, TOKEN_AXES)
        x0 = x
        x, hidden = self.encode(x, causal=causal)
        out = self.finish(x)
        if return_hidden:
            out["hidden_states"] = (x0, *hidden)
        return out


class TextTower(nn.Module):
    cfg: TextConfig

    def setup(self):
        c = self.cfg
        self.token_embedding = self.param(
            "token_embedding", nn.with_logical_partitioning(_embed_init(), ("vocab", "embed")), (c.vocab_size, c.width)
        )
        self.pos_embedding = self.param(
            "pos_embedding", nn.with_logical_partitioning(_embed_init(), ("length", "embed")), (c.max_len, c.width)
        )
        self.encoder = Encoder(c.depth, c.num_heads, c.mlp_dim, c.act, c.ln_eps, c.dtype, c.scan, c.remat)
        self.final_ln = layer_norm(c.ln_eps)
        self.head = nn.Dense(
            c.proj_dim,
            dtype=c.dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        )

    def __call__(self, tokens: jax.Array, valid: jax.Array | None = None, return_hidden: bool = False) -> dict[str, Any]:
        """tokens [B, L] (L ≤ max_len, padded to a fixed length: position L-1 is pooled).

        ``valid`` ([B, L] bool) masks padding keys (default: ``tokens != pad_id`` when
        ``cfg.mask_padding``, else none); SigLIP was trained without it, so leave both off for
        released weights.
        """
        c = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"text tokens must be [batch, length], got shape {tokens.shape}")
        if tokens.shape[1] > c.max_len:
            raise ValueError(f"text length {tokens.shape[1]} exceeds the tower's max_len {c.max_len}")
        x = jnp.take(self.token_embedding, tokens, axis=0).astype(c.dtype)
        x = constrain(x + self.pos_embedding[: tokens.shape[1]].astype(c.dtype)[None], TOKEN_AXES)
        x0 = x
        if valid is None and c.mask_padding:
            valid = tokens != c.pad_id
        mask = padding_mask(valid) if valid is not None else None
        x, hidden = self.encoder(x, mask)
        last = self.final_ln(x)
        pooled = self.head(last[:, -1].astype(c.dtype))
        out = {"last_hidden": last, "pooled": pooled}
        if return_hidden:
            out["hidden_states"] = (x0, *hidden)
        return out


class SigLIP(nn.Module):
    """Two towers plus the learnable temperature ``logit_scale`` (t) and ``logit_bias`` (b).

    ``logits_per_image = exp(t) · img @ txtᵀ + b`` on l2-normalised embeddings (HF's definition).
    """

    cfg: SigLIPConfig

    def setup(self):
        self.vision = VisionTower(self.cfg.vision)
        if self.cfg.text is not None:
            self.text = TextTower(self.cfg.text)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.cfg.init_logit_scale), ())
        self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.cfg.init_logit_bias), ())

    def encode_image(self, images: jax.Array, normalize: bool = True) -> jax.Array:
        z = self.vision(images)["pooled"]
        return l2_normalize(z) if normalize else z

    def encode_text(self, tokens: jax.Array, normalize: bool = True) -> jax.Array:
        if self.cfg.text is None:
            raise ValueError("this SigLIP config has no text tower (with_text=False)")
        z = self.text(tokens)["pooled"]
        return l2_normalize(z) if normalize else z

    def pair_logits(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """[B]: ``exp(t)·cos(image i, text i) + b`` for each pair — ``logits_per_image``'s diagonal
        without the B×B matrix. Images of another size than the tower's are resized to it first
        (bilinear, antialiased when shrinking; HF's processor resizes with PIL bicubic)."""
        size = self.cfg.vision.image_size
        if images.shape[1:3] != (size, size):
            images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear")
        img, txt = self.encode_image(images), self.encode_text(tokens)
        return jnp.exp(self.logit_scale) * (img * txt).sum(-1) + self.logit_bias

    def __call__(self, images: jax.Array, tokens: jax.Array, return_hidden: bool = False) -> dict[str, Any]:
        v = self.vision(images, return_hidden=return_hidden)
        t = self.text(tokens, return_hidden=return_hidden)
        img, txt = l2_normalize(v["pooled"]), l2_normalize(t["pooled"])
        logits = jnp.exp(self.logit_scale) * img @ txt.T + self.logit_bias
        return {
            "vision": v,
            "text": t,
            "image_embeds": img,
            "text_embeds": txt,
            "logits_per_image": logits,
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
        }


def check_select_layer(layer: int, depth: int, model: str = "the tower") -> None:
    """``layer`` indexes a list of ``depth`` + 1 hidden states (the embeddings first) or is 0, the output."""
    if not -(depth + 1) <= layer <= 0:
        raise ValueError(f"select_layer={layer}: use 0 (the output) or -1 … -{depth + 1} ({model}'s "
                         f"{depth} layers and its embeddings)")


def selected_states(tower: nn.Module, variables, inputs, layer: int = 0, append_pooled: bool = False) -> jax.Array:
    """A tower's token states as LLaVA's ``mm_vision_select_layer`` picks them: ``layer`` 0 the
    output after the post-LayerNorm (``last_hidden``), a negative k the k-th last of
    ``hidden_states`` (embeddings, layer 1 output, …), without the LayerNorm.

    ``append_pooled`` adds one more token, the output at the pooled (last) position — the state
    the contrastive head reads, as SDXL adds CLIP's pooled embedding to its token states."""
    check_select_layer(layer, tower.cfg.depth)
    out = tower.apply(variables, inputs, return_hidden=layer != 0)
    states = out["last_hidden"] if layer == 0 else out["hidden_states"][layer]
    if append_pooled:
        states = jnp.concatenate([states, out["last_hidden"][:, -1:].astype(states.dtype)], axis=1)
    return states


def unscanned_params(params: dict, cfg: SigLIPConfig) -> dict:
    """A scanned tower's stacked ``layers`` as ``layers_{i}``, for code that runs sub-ranges of layers."""
    out = dict(params)
    for name, tc in (("vision", cfg.vision), ("text", cfg.text)):
        if tc is not None and name in out and "layers" in out[name]["encoder"]:
            out[name] = dict(out[name], encoder=unstack_layers(out[name]["encoder"], tc.depth))
    return out


def abstract_variables(cfg: SigLIPConfig) -> dict:
    """Shapes of every variable, from ``jax.eval_shape`` (no memory): count real model sizes with it."""
    model = SigLIP(cfg)
    r = cfg.vision.image_size
    images = jax.ShapeDtypeStruct((1, r, r, cfg.vision.num_channels), jnp.float32)
    if cfg.text is None:
        return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, method=SigLIP.encode_image), images)
    tokens = jax.ShapeDtypeStruct((1, cfg.text.max_len), jnp.int32)
    return jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t), images, tokens)


def num_params(cfg: SigLIPConfig) -> int:
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_variables(cfg)["params"]))
    return int(sum(np.prod(x.shape) for x in leaves))
