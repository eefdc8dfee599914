"""DualToken tokenizer (arXiv 2503.14324; the official ``RQVAESiglipModel``), NHWC, Flax Linen.

One SigLIP vision tower feeds two residual-quantised branches:

* pixel: layer ``layer_recon`` (6) → ``prequant_pix``, plus ``weight_shortcut`` (0.6) ×
  ``prequant_shortcut``(layer ``layer_shortcut`` (4)) → RQ ``quantizer_pix`` → ``postquant_pix``
  → bilinear resize of the token grid (27 → 24 at 384 px) → ``post_quant_conv`` (a resnet block
  with a 1×1 first conv) → taming VQGAN decoder → image;
* semantic: layer ``layer_sem`` (26) → ``prequant_sem`` → RQ ``quantizer_sem`` → ``postquant_sem``,
  whose output *replaces* the layer-26 hidden state and runs through the remaining layers,
  post-LayerNorm and the MAP head (the pooled output is the CLIP-aligned image embedding).

The projections down to the code dim (``AttnProjection``) attend bidirectionally and average
their heads; the ones back up attend causally in raster order (so an AR model's prefix of codes
decodes to the same features). Codebooks live in the ``"codebook"`` collection
(``jaxunified.quant.rq``); a training forward needs ``mutable=["codebook"]`` and, with restart,
``rngs={"quant": key}``. Sub-ranges of the tower are run, so the vision encoder is unscanned.

Usage::

    cfg = get_config("So400m/14-384")
    model = DualToken(cfg)
    variables = init_variables(model, key)
    out = model.apply(variables, images)                     # images [B, 384, 384, 3] in [-1, 1]
    out["code_pix"], out["code_sem"]                         # [B, 27, 27, 8] int32 each
    recon = model.apply(variables, out["code_pix"], method="decode_codes")
    llm_in = model.apply(variables, out["code_pix"], out["code_sem"], method="code_embeddings")
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.models import siglip as siglip_lib
from jaxunified.models.siglip import SigLIP, SigLIPConfig, l2_normalize
from jaxunified.models.vqgan import Decoder, VQGANConfig
from jaxunified.nn.attention import attend, causal_mask
from jaxunified.nn.conv import GroupNorm, conv
from jaxunified.nn.dense import dense
from jaxunified.quant.rq import RQConfig, ResidualQuantizer

Dtype = Any


@dataclasses.dataclass(frozen=True)
class DualTokenConfig:
    """Layers are 1-indexed as in the reference (layer 26 = the output of the 26th block).

    ``decoder`` is a ``VQGANConfig`` read as taming's ddconfig: ``ch``, ``ch_mult``,
    ``num_res_blocks`` (the decoder builds ``num_res_blocks + 1`` per level), ``z_channels`` =
    ``decoder_in_channels``; attention sits at the deepest level only (``attn_resolutions`` =
    [latent size] in every released config). ``decoder_latent_shape`` None keeps the token grid.
    """

    siglip: SigLIPConfig = siglip_lib.get_config("siglip2-So400m/14", image_size=384)
    layer_recon: int = 6
    layer_sem: int = 26
    layer_shortcut: int | None = 4
    weight_shortcut: float = 0.6
    pix_rq: RQConfig = RQConfig(ema_schedule="per_depth")  # reference "rq"
    sem_rq: RQConfig = RQConfig(ema_schedule="per_step")  # reference "rq_ema"
    proj_mlp_ratio: float = 2.0
    proj_ln_eps: float = 1e-5  # torch nn.LayerNorm default (the GeGLU MLP's own norm uses 1e-6)
    decoder: VQGANConfig = VQGANConfig(ch=128, ch_mult=(1, 1, 4, 4, 8), num_res_blocks=2, z_channels=1024)
    decoder_latent_shape: tuple[int, int] | None = (24, 24)

    def __post_init__(self):
        v = self.siglip.vision
        if v.scan:
            raise ValueError(
                "DualToken taps and replaces hidden states mid-tower: build the SigLIP vision tower with "
                "scan=False (remat=True still saves memory)"
            )
        if v.pool != "map":
            raise ValueError(f"DualToken's pooled output is the MAP head; got vision pool={v.pool!r}")
        taps = {"layer_recon": self.layer_recon, "layer_sem": self.layer_sem}
        if self.layer_shortcut is not None:
            taps["layer_shortcut"] = self.layer_shortcut
        for name, layer in taps.items():
            if not 1 <= layer <= v.depth:
                raise ValueError(f"DualTokenConfig.{name}={layer} is outside the tower's layers 1..{v.depth}")
            if layer > self.layer_sem:
                raise ValueError(f"DualTokenConfig.{name}={layer} is above layer_sem={self.layer_sem}")
        for name, rq in (("pix_rq", self.pix_rq), ("sem_rq", self.sem_rq)):
            if not isinstance(rq, RQConfig):
                raise TypeError(f"DualTokenConfig.{name} must be an RQConfig, got {type(rq).__name__}")
            if v.width % rq.embed_dim or v.width < rq.embed_dim:
                raise ValueError(
                    f"DualTokenConfig.{name}.embed_dim={rq.embed_dim} must divide the tower width {v.width} "
                    "(the projections use width // embed_dim heads of embed_dim channels)"
                )
        if self.decoder_latent_shape is not None:
            object.__setattr__(self, "decoder_latent_shape", tuple(int(s) for s in self.decoder_latent_shape))

    @property
    def grid(self) -> int:
        return self.siglip.vision.grid

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.decoder_latent_shape or (self.grid, self.grid)

    @property
    def image_size(self) -> int:
        return self.siglip.vision.image_size

    @property
    def recon_size(self) -> tuple[int, int]:
        f = self.decoder.downsample_factor
        return self.latent_shape[0] * f, self.latent_shape[1] * f


def _rq(embed_dim: int, depth: int, schedule: str, codebook_size: int = 16384) -> RQConfig:
    return RQConfig(codebook_size=codebook_size, embed_dim=embed_dim, depth=depth, ema_schedule=schedule)


def _released(siglip_name: str, image_size: int, depth: int, latent: int | None) -> DualTokenConfig:
    return DualTokenConfig(
        siglip=siglip_lib.get_config(siglip_name, image_size=image_size),
        pix_rq=_rq(32, depth, "per_depth"),
        sem_rq=_rq(32, depth, "per_step"),
        decoder_latent_shape=None if latent is None else (latent, latent),
    )


VARIANTS: dict[str, DualTokenConfig] = {
    # model_config_siglip_384_rvq8: SigLIP2 So400m/14 at 384 px, 27×27×8 codes, decoder at 24×24.
    "So400m/14-384": _released("siglip2-So400m/14", 384, 8, 24),
    # model_config_siglip_256_rvq4: SigLIP2 So400m/16 at 256 px, 16×16×4 codes.
    "So400m/16-256": _released("So400m/16", 256, 4, None),
}


def get_config(name: str, **overrides) -> DualTokenConfig:
    """A variant by name (``VARIANTS``) with ``DualTokenConfig`` field overrides."""
    if name not in VARIANTS:
        raise ValueError(f"unknown DualToken variant {name!r}; known: {', '.join(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(DualTokenConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown DualTokenConfig field(s) {unknown}; valid: {', '.join(sorted(fields))}")
    return dataclasses.replace(VARIANTS[name], **overrides)


# ---------------------------------------------------------------------------------------------
# Projections between the tower width and the code dim


def adaptive_avg_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_in, n_out] matrix of PyTorch's ``adaptive_avg_pool1d`` windows (floor/ceil bounds)."""
    m = np.zeros((n_in, n_out), np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[lo:hi, i] = 1.0 / (hi - lo)
    return m


def _axis(dim: int, wide: int) -> str | None:
    """Logical name of a feature axis: the tower width shards as 'embed', the code dim stays whole."""
    return "embed" if dim == wide else "code_dim"


class ResizingAttention(nn.Module):
    """Self-attention whose output width differs from its input (the reference ``AttentionBlock``).

    Heads have ``max(in, out) // num_heads`` channels; qkv has no key bias. Going down
    (in > out) the heads' outputs are averaged (then adaptive-average-pooled to ``out_dim`` if a
    head is wider); going up they are concatenated. Then a linear ``proj`` (out → out).
    """

    out_dim: int
    num_heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, in_dim = x.shape
        width = wide = max(in_dim, self.out_dim)
        if width % self.num_heads:
            raise ValueError(f"attention width {width} does not split into {self.num_heads} heads")
        hd = width // self.num_heads
        # A DenseGeneral: xavier sees the flat [in, 3·H·hd] kernel, as the reference's one Linear.
        qkv = dense((3, self.num_heads, hd), (_axis(in_dim, wide), None, "heads", "kv"), use_bias=False,
                    dtype=self.dtype, name="qkv")(x)
        bias_axes = ("heads", "kv")
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros, bias_axes)
        q_bias = self.param("q_bias", bias_init, (self.num_heads, hd))
        v_bias = self.param("v_bias", bias_init, (self.num_heads, hd))
        q = qkv[:, :, 0] + q_bias.astype(qkv.dtype)
        k = qkv[:, :, 1]
        v = qkv[:, :, 2] + v_bias.astype(qkv.dtype)
        out = attend(q, k, v, causal_mask(n) if self.causal else None)
        if in_dim > self.out_dim:
            out = jnp.mean(out.astype(jnp.float32), axis=2)
            if hd != self.out_dim:
                out = out @ adaptive_avg_pool_matrix(hd, self.out_dim)
            out = out.astype(self.dtype)
        else:
            out = out.reshape(b, n, width)
        concat_axis = "heads" if in_dim < self.out_dim else "code_dim"
        return dense(self.out_dim, (concat_axis, _axis(self.out_dim, wide)), dtype=self.dtype, name="proj")(out)


class GeGluMlp(nn.Module):
    """LayerNorm(eps 1e-6) → gelu_tanh(w0 x) · w1 x → w2 (the reference's residual branch)."""

    hidden_dim: int
    wide: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        ax = _axis(dim, self.wide)
        hid = "mlp" if dim == self.wide else None
        y = siglip_lib.layer_norm(1e-6, "norm")(x).astype(self.dtype)
        h = jax.nn.gelu(dense(self.hidden_dim, (ax, hid), dtype=self.dtype, name="w0")(y), approximate=True)
        h = h * dense(self.hidden_dim, (ax, hid), dtype=self.dtype, name="w1")(y)
        return dense(dim, (hid, ax), dtype=self.dtype, name="w2")(h)


class AttnProjection(nn.Module):
    """``proj(norm3(x)) + attn(norm1(x))``, then ``+ mlp(norm2(·))``: maps in_dim → out_dim."""

    out_dim: int
    num_heads: int
    causal: bool = False
    mlp_ratio: float = 2.0
    ln_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_dim = x.shape[-1]
        if in_dim % self.out_dim and self.out_dim % in_dim:
            raise ValueError(f"AttnProjection needs one of in_dim={in_dim}, out_dim={self.out_dim} to divide the other")
        wide = max(in_dim, self.out_dim)
        ln = lambda name: siglip_lib.layer_norm(self.ln_eps, name)  # noqa: E731
        ax_in, ax_out = _axis(in_dim, wide), _axis(self.out_dim, wide)
        y = dense(self.out_dim, (ax_in, ax_out), dtype=self.dtype, name="proj")(ln("norm3")(x).astype(self.dtype))
        y = y + ResizingAttention(self.out_dim, self.num_heads, self.causal, self.dtype, name="attn")(
            ln("norm1")(x).astype(self.dtype)
        )
        mlp = GeGluMlp(int(self.out_dim * self.mlp_ratio), wide, self.dtype, name="mlp")
        return y + mlp(ln("norm2")(y))


class PostQuantResnetBlock(nn.Module):
    """GroupNorm → swish → 1×1 conv → GroupNorm → swish → 3×3 conv, plus a 1×1 shortcut when
    the channel count changes (1152 → 1024 in the released models)."""

    out_channels: int
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.swish(GroupNorm(self.num_groups, dtype=self.dtype, name="norm1")(x))
        h = conv(self.out_channels, 1, dtype=self.dtype, name="conv1")(h)
        h = nn.swish(GroupNorm(self.num_groups, dtype=self.dtype, name="norm2")(h))
        h = conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, dtype=self.dtype, name="nin_shortcut")(x)
        return x + h


def resize_grid(x: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """[B, h, w, C] → [B, *shape, C]: PyTorch ``F.interpolate(mode='bilinear')`` (half-pixel
    centres, no antialiasing when shrinking, unlike ``jax.image.resize``'s default)."""
    if tuple(x.shape[1:3]) == tuple(shape):
        return x
    out = jax.image.resize(
        x.astype(jnp.float32), (x.shape[0], *shape, x.shape[-1]), method="bilinear", antialias=False
    )
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------


class DualToken(nn.Module):
    """Params: ``siglip`` (a ``SigLIP``: vision [+ text] towers, logit scale/bias),
    ``prequant_{pix,shortcut,sem}``, ``postquant_{pix,sem}``, ``post_quant_conv``, ``decoder``;
    codebooks: ``codebook/quantizer_{pix,sem}``.
    """

    cfg: DualTokenConfig

    def setup(self):
        cfg = self.cfg
        width, dtype = cfg.siglip.vision.width, cfg.siglip.vision.dtype
        self.siglip = SigLIP(cfg.siglip)

        def proj(out_dim, code_dim, causal):
            return AttnProjection(out_dim, width // code_dim, causal, cfg.proj_mlp_ratio, cfg.proj_ln_eps, dtype)

        self.prequant_pix = proj(cfg.pix_rq.embed_dim, cfg.pix_rq.embed_dim, False)
        if cfg.layer_shortcut is not None:
            self.prequant_shortcut = proj(cfg.pix_rq.embed_dim, cfg.pix_rq.embed_dim, False)
        self.prequant_sem = proj(cfg.sem_rq.embed_dim, cfg.sem_rq.embed_dim, False)
        self.quantizer_pix = ResidualQuantizer(cfg.pix_rq)
        self.quantizer_sem = ResidualQuantizer(cfg.sem_rq)
        self.postquant_pix = proj(width, cfg.pix_rq.embed_dim, True)
        self.postquant_sem = proj(width, cfg.sem_rq.embed_dim, True)
        self.post_quant_conv = PostQuantResnetBlock(cfg.decoder.z_channels, cfg.decoder.norm_groups, cfg.decoder.dtype)
        self.decoder = Decoder(cfg.decoder)

    # -- encoder ----------------------------------------------------------------------------

    def _grid(self, n: int) -> int:
        g = int(round(math.sqrt(n)))
        if g * g != n:
            raise ValueError(f"DualToken needs a square token grid, got {n} tokens")
        return g

    def encode_image(self, images: jax.Array, train: bool = False, pix_train: bool | None = None) -> dict[str, Any]:
        """Images [B, H, W, C] in [-1, 1] → codes, quantised features and the semantic outputs.

        ``train`` lets the quantisers update their codebooks (with ``mutable=["codebook"]``);
        ``pix_train`` overrides it for the pixel quantiser (the reference's stage 2 keeps the
        pixel codebook in eval mode while the semantic one trains).

        Returns ``code_pix``/``code_sem`` [B, g, g, D] int32; ``zq_pix`` [B, g·g, d] (pixel
        latent after RQ, straight-through); ``zq_sem`` [B, g·g, width] (semantic features after
        ``postquant_sem``); ``hidden_states`` (embeddings, layer 1, …, layer depth; layers above
        ``layer_sem`` run on ``zq_sem``); ``last_hidden`` (post-LN), ``pooled`` (MAP head),
        ``image_embeds`` (l2-normalised pooled); ``commit_pix``/``commit_sem`` and per-depth
        ``usage_*``/``perplexity_*`` of the codes picked.
        """
        cfg = self.cfg
        vision = self.siglip.vision
        x0 = vision.embed(images)
        b, n, _ = x0.shape
        g = self._grid(n)
        x, hs = vision.encode(x0, 0, cfg.layer_sem)

        pix = self.prequant_pix(hs[cfg.layer_recon - 1])
        if cfg.layer_shortcut is not None:
            pix = pix + cfg.weight_shortcut * self.prequant_shortcut(hs[cfg.layer_shortcut - 1])
        pix_train = train if pix_train is None else pix_train
        zq_pix, code_pix, aux_pix = self.quantizer_pix(pix.reshape(b, g, g, -1), pix_train)

        sem = self.prequant_sem(x)
        zq_sem_code, code_sem, aux_sem = self.quantizer_sem(sem.reshape(b, g, g, -1), train)
        zq_sem = self.postquant_sem(zq_sem_code.reshape(b, n, -1).astype(cfg.siglip.vision.dtype))
        x, rest = vision.encode(zq_sem, cfg.layer_sem, None)
        out = vision.finish(x)
        return {
            "code_pix": code_pix,
            "code_sem": code_sem,
            "pre_quant_pix": pix,
            "pre_quant_sem": sem,
            "zq_pix": zq_pix.reshape(b, n, -1),
            "zq_sem": zq_sem,
            "hidden_states": (x0, *hs, *rest),
            "last_hidden": out["last_hidden"],
            "pooled": out["pooled"],
            "image_embeds": l2_normalize(out["pooled"]),
            "commit_pix": aux_pix["commit_loss"],
            "commit_sem": aux_sem["commit_loss"],
            "usage_pix": aux_pix["usage"],
            "usage_sem": aux_sem["usage"],
            "perplexity_pix": aux_pix["perplexity"],
            "perplexity_sem": aux_sem["perplexity"],
        }

    # -- pixel decoder ----------------------------------------------------------------------

    def decode_with_features(self, zq_pix: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Pixel latents [B, g·g, d] (or [B, g, g, d]) → (image [B, H, W, 3] float32, the
        features entering the decoder's ``conv_out``: the adaptive GAN weight's input)."""
        cfg = self.cfg
        b = zq_pix.shape[0]
        z = zq_pix.reshape(b, -1, zq_pix.shape[-1]).astype(cfg.siglip.vision.dtype)
        g = self._grid(z.shape[1])
        h = self.postquant_pix(z).reshape(b, g, g, -1)
        h = resize_grid(h, cfg.latent_shape).astype(cfg.decoder.dtype)
        return self.decoder(self.post_quant_conv(h))

    def decode(self, zq_pix: jax.Array) -> jax.Array:
        return self.decode_with_features(zq_pix)[0]

    def decode_codes(self, code_pix: jax.Array) -> jax.Array:
        """Pixel codes [B, g, g, D] → images [B, H, W, 3] (float32)."""
        return self.decode(self.quantizer_pix.embed_codes(code_pix))

    # -- embeddings for other models ---------------------------------------------------------

    def code_embeddings(self, code_pix: jax.Array, code_sem: jax.Array) -> jax.Array:
        """The LLM's visual input: per token, the pixel code-sum embedding and the semantic one
        concatenated along the feature axis, [..., d_pix + d_sem] (the sequence length stays
        that of one branch). Codes are [..., D] from ``encode_image``."""
        if code_pix.shape[:-1] != code_sem.shape[:-1]:
            raise ValueError(
                f"pixel and semantic codes must share the token grid, got {code_pix.shape} and {code_sem.shape}"
            )
        return jnp.concatenate(
            [self.quantizer_pix.embed_codes(code_pix), self.quantizer_sem.embed_codes(code_sem)], axis=-1
        )

    def semantic_from_codes(self, code_sem: jax.Array) -> dict[str, jax.Array]:
        """Semantic codes [B, g, g, D] → the tower's outputs above ``layer_sem`` (``zq_sem``,
        ``last_hidden``, ``pooled``, ``image_embeds``): understanding from codes alone."""
        cfg = self.cfg
        b = code_sem.shape[0]
        z = self.quantizer_sem.embed_codes(code_sem).reshape(b, -1, cfg.sem_rq.embed_dim)
        zq_sem = self.postquant_sem(z.astype(cfg.siglip.vision.dtype))
        x, _ = self.siglip.vision.encode(zq_sem, cfg.layer_sem, None)
        out = self.siglip.vision.finish(x)
        return {"zq_sem": zq_sem, **out, "image_embeds": l2_normalize(out["pooled"])}

    def encode_text(self, tokens: jax.Array, normalize: bool = True) -> jax.Array:
        return self.siglip.encode_text(tokens, normalize)

    def __call__(self, images: jax.Array, tokens: jax.Array | None = None, train: bool = False,
                 pix_train: bool | None = None) -> dict[str, Any]:
        """``encode_image`` plus ``recon`` [B, H, W, 3], ``dec_features``, and with ``tokens``
        ``text_embeds`` and ``logits_per_image`` (SigLIP's exp(t)·img·txtᵀ + b)."""
        out = self.encode_image(images, train, pix_train)
        out["recon"], out["dec_features"] = self.decode_with_features(out["zq_pix"])
        if tokens is not None:
            txt = self.encode_text(tokens)
            out["text_embeds"] = txt
            out["logits_per_image"] = (
                jnp.exp(self.siglip.logit_scale) * out["image_embeds"] @ txt.T + self.siglip.logit_bias
            )
        return out


def dummy_inputs(cfg: DualTokenConfig, batch: int = 1, abstract: bool = False):
    """(images, tokens | None) of the config's sizes; ShapeDtypeStructs with ``abstract``."""
    r, c = cfg.image_size, cfg.siglip.vision.num_channels
    make = (lambda s, d: jax.ShapeDtypeStruct(s, d)) if abstract else (lambda s, d: jnp.zeros(s, d))
    images = make((batch, r, r, c), jnp.float32)
    tokens = make((batch, cfg.siglip.text.max_len), jnp.int32) if cfg.siglip.text is not None else None
    return images, tokens


def init_variables(model: DualToken, rng: jax.Array, batch: int = 1) -> dict:
    """All variables (params with both towers, the codebooks), boxed with logical axis names."""
    images, tokens = dummy_inputs(model.cfg, batch)
    params_rng, quant_rng = jax.random.split(rng)
    return model.init({"params": params_rng, "quant": quant_rng}, images, tokens)


def abstract_variables(cfg: DualTokenConfig) -> dict:
    """``jax.eval_shape`` of ``init_variables``, unboxed: shapes only, no memory."""
    return nn.meta.unbox(jax.eval_shape(lambda k: init_variables(DualToken(cfg), k), jax.random.key(0)))


def num_params(cfg: DualTokenConfig, collections: tuple[str, ...] = ("params",), prefix: str | None = None) -> int:
    """Parameter count from shapes; ``prefix`` counts one top-level subtree (e.g. ``"siglip"``)."""
    shapes = abstract_variables(cfg)
    total = 0
    for c in collections:
        tree = shapes.get(c, {})
        if prefix is not None:
            tree = tree.get(prefix, {})
        total += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    return total


STAGES = (0, 1, 2)
# Parts the reference's stage 2 freezes: the pixel branch after the shared layers.
PIXEL_BRANCH = ("prequant_pix", "prequant_shortcut", "postquant_pix", "post_quant_conv", "decoder")


def frozen_in_stage(keys: Sequence[str], cfg: DualTokenConfig, stage: int, *, train_text: bool = False,
                    train_logits: bool = False) -> bool:
    """Whether the reference's training ``stage`` keeps the parameter at ``keys`` (its path in
    ``DualToken``'s params) fixed: 0 = embeddings and layers 1..layer_sem; 1 = only the text tower
    and logit scale/bias (unless ``train_text`` / ``train_logits``); 2 = embeddings, layers
    1..layer_shortcut and the pixel branch."""
    if keys[0] != "siglip":
        return stage == 2 and keys[0] in PIXEL_BRANCH
    part = keys[1]
    if part == "text":
        return not train_text
    if part in ("logit_scale", "logit_bias"):
        return not train_logits
    if part == "vision" and stage in (0, 2):
        upto = cfg.layer_sem if stage == 0 else (cfg.layer_shortcut or 0)
        if keys[2] in ("patch_embed", "pos_embedding") or keys[2].startswith("stem_"):
            return True
        if keys[2] == "encoder" and keys[3].startswith("layers_"):
            return int(keys[3].split("_")[1]) < upto
    return False

__all__ = [
    "AttnProjection",
    "DualToken",
    "DualTokenConfig",
    "PostQuantResnetBlock",
    "ResizingAttention",
    "VARIANTS",
    "abstract_variables",
    "adaptive_avg_pool_matrix",
    "dummy_inputs",
    "frozen_in_stage",
    "get_config",
    "init_variables",
    "num_params",
    "resize_grid",
]
