"""LlamaGen / STAR-VQ VQGAN: taming-style encoder and decoder around a ``VectorQuantizer``.

One module covers LlamaGen VQ-16/VQ-8 (l2-normalised 8-d codes, single-head attention) and
STAR-VQ (65536 × 512 codebook, no l2 norm, 8-head attention). Images are NHWC float32 in [-1, 1].
Module names mirror the PyTorch state-dict keys (``encoder.conv_blocks.0.res.1.conv1`` is
``encoder/conv_blocks_0/res_1/conv1``) so ``jaxunified.convert.vq`` is a plain mapping.

Usage::

    cfg = get_config("VQ-16")
    model = VQGAN(cfg)
    variables = model.init(key, images)                     # images [B, H, W, 3]
    out = model.apply(variables, images)                    # dict: recon, codes, quant, ...
    codes = model.apply(variables, images, method="encode")[1]
    recon = model.apply(variables, codes, method="decode_codes")
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxunified.nn.conv import AttnBlock, Downsample, GroupNorm, ResnetBlock, Upsample, conv, feature_map
from jaxunified.quant.vq import VQConfig, VectorQuantizer


# Rematerialisation policies for the res/attn blocks (the names models.lm uses). "dots" keeps every
# conv output (checkpoint_dots saves conv_general_dilated and dot_general results).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
}


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    decoder_num_res_blocks: int | None = None  # None: num_res_blocks + 1, as LlamaGen and STAR build it
    z_channels: int = 256
    attn_num_heads: int = 1
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32
    vq: VQConfig = VQConfig()
    dtype: Any = jnp.float32
    # What each res/attn block's backward keeps (REMAT_POLICIES): "none" (everything), "dots" (conv
    # and matmul outputs; norms and swish are recomputed), "full" (only block inputs). True = "full".
    remat: bool | str = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise once)
        set_("ch_mult", tuple(int(m) for m in self.ch_mult))
        set_("dtype", jnp.dtype(self.dtype))
        if isinstance(self.remat, bool):
            set_("remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"VQGANConfig.remat={self.remat!r}; choose one of {', '.join(REMAT_POLICIES)} "
                             "(or True = 'full', False = 'none')")
        if self.decoder_num_res_blocks is None:
            set_("decoder_num_res_blocks", self.num_res_blocks + 1)
        if not self.ch_mult or min(self.ch_mult) < 1 or self.ch < 1:
            raise ValueError(
                f"VQGANConfig needs ch >= 1 and a non-empty ch_mult of positive ints, got {self.ch}, {self.ch_mult}"
            )
        if self.num_res_blocks < 1 or self.decoder_num_res_blocks < 1:
            raise ValueError("VQGANConfig.num_res_blocks and decoder_num_res_blocks must be >= 1")
        if not isinstance(self.vq, VQConfig):
            raise TypeError(f"VQGANConfig.vq must be a VQConfig, got {type(self.vq).__name__}")
        top = self.ch * self.ch_mult[-1]
        if top % self.attn_num_heads:
            raise ValueError(f"attn_num_heads={self.attn_num_heads} does not divide the {top} attention channels")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def codebook_size(self) -> int:
        return self.vq.codebook_size

    @property
    def embed_dim(self) -> int:
        return self.vq.embed_dim


VARIANTS: dict[str, VQGANConfig] = {
    # LlamaGen VQ-16 (72M params): 256 px → 16×16 codes.
    "VQ-16": VQGANConfig(vq=VQConfig(codebook_size=16384, embed_dim=8, l2_norm=True)),
    "VQ-8": VQGANConfig(ch_mult=(1, 2, 2, 4), vq=VQConfig(codebook_size=16384, embed_dim=8, l2_norm=True)),
    # STAR-VQ: 384 px → 24×24 codes.
    "STAR-VQ": VQGANConfig(
        ch=256, ch_mult=(1, 2, 2, 4, 8), z_channels=512, attn_num_heads=8,
        vq=VQConfig(codebook_size=65536, embed_dim=512, l2_norm=False),
    ),
    # Small CPU-trainable models for the 32 px shapes dataset: 16×16 codes of 2×2 patches. Narrow
    # full-resolution layers because 2 CPU cores are compute-bound on 3×3 convs; EMA + dead-code
    # restart keeps the whole codebook alive (≈99% test usage vs ≈30% for the gradient codebook).
    "shapes-S": VQGANConfig(
        ch=16, ch_mult=(1, 2), num_res_blocks=1, decoder_num_res_blocks=1, z_channels=32, norm_groups=8,
        vq=VQConfig(codebook_size=512, embed_dim=8, l2_norm=True, update="ema", restart=True),
    ),
    # 8×8 codes of 4×4 patches: the grid the shapes text-to-image GPT models (64 tokens an image).
    # No dead-code restart: restarts re-seed codes mostly at background latents (79% of patches),
    # so plain background came out as 220 interchangeable codes (code entropy 5.2 nats) that the
    # GPT must guess; without restart ≈ 22% of the entries live, background takes ~30 codes
    # (entropy 2.8 nats) and the GPT's loss halves (2.35 → 1.13) at the same PSNR (33.7 → 32.7).
    "shapes-S8": VQGANConfig(
        ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, decoder_num_res_blocks=1, z_channels=32, norm_groups=8,
        vq=VQConfig(codebook_size=256, embed_dim=8, l2_norm=True, update="ema", restart=False),
    ),
    "shapes-M": VQGANConfig(
        ch=64, ch_mult=(1, 1, 2), num_res_blocks=2, z_channels=64,
        vq=VQConfig(codebook_size=1024, embed_dim=8, l2_norm=True, update="ema", restart=True),
    ),
}

_VQ_FIELDS = tuple(f.name for f in dataclasses.fields(VQConfig))
_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(VQGANConfig))


def get_config(name: str, **overrides) -> VQGANConfig:
    """The ``name`` variant with ``overrides``: any VQGANConfig field, or a VQConfig field
    (``codebook_size``, ``embed_dim``, ``l2_norm``, ``update``, ...) applied to the nested ``vq``."""
    if name not in VARIANTS:
        raise ValueError(f"unknown VQGAN variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    unknown = sorted(set(overrides) - set(_MODEL_FIELDS) - set(_VQ_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown VQGAN config field(s) {unknown}; valid fields: {', '.join(_MODEL_FIELDS)}; "
            f"quantiser fields: {', '.join(_VQ_FIELDS)}"
        )
    base = VARIANTS[name]
    vq = overrides.pop("vq", base.vq)
    vq_over = {k: overrides.pop(k) for k in list(overrides) if k in _VQ_FIELDS and k not in _MODEL_FIELDS}
    if vq_over:
        vq = dataclasses.replace(vq, **vq_over)
    return dataclasses.replace(base, vq=vq, **overrides)


def _blocks(cfg: VQGANConfig):
    """The (optionally rematerialised) block classes; remat keeps module names, so params don't move."""
    if cfg.remat != "none":
        policy = REMAT_POLICIES[cfg.remat]
        return nn.remat(ResnetBlock, policy=policy), nn.remat(AttnBlock, policy=policy)
    return ResnetBlock, AttnBlock


class Level(nn.Module):
    """One resolution: res blocks (each followed by attention at the lowest resolution), then a resample."""

    cfg: VQGANConfig
    out_channels: int
    num_res_blocks: int
    with_attn: bool
    resample: str | None  # "down" | "up" | None

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.cfg
        res_cls, attn_cls = _blocks(cfg)
        for j in range(self.num_res_blocks):
            h = res_cls(self.out_channels, cfg.norm_groups, cfg.dtype, name=f"res_{j}")(h)
            if self.with_attn:
                h = attn_cls(cfg.attn_num_heads, cfg.norm_groups, cfg.dtype, name=f"attn_{j}")(h)
        if self.resample == "down":
            h = Downsample(cfg.dtype, name="downsample")(h)
        elif self.resample == "up":
            h = Upsample(cfg.dtype, name="upsample")(h)
        return h


def _middle(cfg: VQGANConfig, h: jax.Array) -> jax.Array:
    """res → attn → res at the lowest resolution (``mid.0/1/2``); call inside a compact method."""
    res_cls, attn_cls = _blocks(cfg)
    c = h.shape[-1]
    h = res_cls(c, cfg.norm_groups, cfg.dtype, name="mid_0")(h)
    h = attn_cls(cfg.attn_num_heads, cfg.norm_groups, cfg.dtype, name="mid_1")(h)
    return res_cls(c, cfg.norm_groups, cfg.dtype, name="mid_2")(h)


class Encoder(nn.Module):
    cfg: VQGANConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        last = len(cfg.ch_mult) - 1
        h = conv(cfg.ch, dtype=cfg.dtype, name="conv_in")(feature_map(x.astype(cfg.dtype)))
        for i, mult in enumerate(cfg.ch_mult):
            h = Level(
                cfg, cfg.ch * mult, cfg.num_res_blocks, with_attn=i == last,
                resample=None if i == last else "down", name=f"conv_blocks_{i}",
            )(h)
        h = _middle(cfg, h)
        h = feature_map(nn.swish(GroupNorm(cfg.norm_groups, dtype=cfg.dtype, name="norm_out")(h)))
        return conv(cfg.z_channels, dtype=cfg.dtype, name="conv_out")(h)


class Decoder(nn.Module):
    """Returns ``(image, features)``; ``features`` feed the final ``conv_out`` (for GAN weighting)."""

    cfg: VQGANConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        last = len(cfg.ch_mult) - 1
        h = conv(cfg.ch * cfg.ch_mult[-1], dtype=cfg.dtype, name="conv_in")(z)
        h = _middle(cfg, h)
        # Index 0 is the deepest level, as in the reference's reversed ModuleList.
        for k, i in enumerate(reversed(range(len(cfg.ch_mult)))):
            h = Level(
                cfg, cfg.ch * cfg.ch_mult[i], cfg.decoder_num_res_blocks, with_attn=i == last,
                resample=None if i == 0 else "up", name=f"conv_blocks_{k}",
            )(h)
        feats = feature_map(nn.swish(GroupNorm(cfg.norm_groups, dtype=cfg.dtype, name="norm_out")(h)))
        img = conv(cfg.out_channels, dtype=cfg.dtype, name="conv_out")(feats)
        return img.astype(jnp.float32), feats


class VQGAN(nn.Module):
    """Encoder → quant_conv → VectorQuantizer → post_quant_conv → Decoder.

    ``__call__(x, train=False)`` returns a dict with ``recon``, ``codes``, ``quant``, ``pre_quant``,
    ``vq_loss``, ``commit_loss``, ``entropy_loss``, ``usage``, ``perplexity``, ``dec_features``
    (``recon == vqgan_conv_out(params, dec_features)``). A training forward of an EMA quantiser
    needs ``mutable=["codebook"]`` (and ``rngs={"quant": key}`` with restart).
    """

    cfg: VQGANConfig

    def setup(self):
        cfg = self.cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = conv(cfg.vq.embed_dim, 1, dtype=cfg.dtype)
        self.quantize = VectorQuantizer(cfg.vq)
        self.post_quant_conv = conv(cfg.z_channels, 1, dtype=cfg.dtype)
        self.decoder = Decoder(cfg)

    def _check_image(self, x: jax.Array) -> None:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"VQGAN expects NHWC images [B, H, W, {cfg.in_channels}] in [-1, 1], got shape {x.shape}; "
                "transpose NCHW arrays with x.transpose(0, 2, 3, 1)"
            )
        f = cfg.downsample_factor
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"VQGAN image size {x.shape[1]}×{x.shape[2]} is not divisible by the downsample factor {f} "
                f"(ch_mult {cfg.ch_mult}); resize or crop the images"
            )

    def encode(self, x: jax.Array, train: bool = False):
        """Images [B, H, W, C] → ``(quant [B, h, w, d], codes [B, h, w], aux)``; ``aux`` adds ``pre_quant``."""
        self._check_image(x)
        pre_quant = feature_map(self.quant_conv(self.encoder(x)).astype(jnp.float32))
        quant, codes, aux = self.quantize(pre_quant, train)
        quant = feature_map(quant)
        return quant, codes, {**aux, "pre_quant": pre_quant}

    def _decode(self, quant: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.decoder(self.post_quant_conv(quant.astype(self.cfg.dtype)))

    def decode(self, quant: jax.Array) -> jax.Array:
        """Quantised latents [B, h, w, d] → images [B, H, W, C] (float32)."""
        return self._decode(quant)[0]

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """Codes [B, h, w] → images [B, H, W, C] (float32)."""
        return self.decode(self.quantize.lookup(codes))

    def lookup(self, codes: jax.Array) -> jax.Array:
        """Codes [...] → codebook vectors [..., d] (l2-normalised when the codebook is)."""
        return self.quantize.lookup(codes)

    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        quant, codes, aux = self.encode(x, train)
        recon, feats = self._decode(quant)
        return {"recon": recon, "codes": codes, "quant": quant, **aux, "dec_features": feats}


def vqgan_conv_out(params, dec_features: jax.Array) -> jax.Array:
    """Recomputes ``recon`` from ``dec_features`` with ``params['decoder']['conv_out']``.

    ``params`` is the ``"params"`` collection (or the whole variables dict). Only the last
    layer's weights enter, so the gradient of a loss on the result w.r.t. that kernel is cheap:
    this is how taming/LlamaGen's adaptive GAN weight reads ``decoder.conv_out.weight``.
    """
    if "params" in params:
        params = params["params"]
    p = params["decoder"]["conv_out"]
    out_ch = nn.meta.unbox(p["kernel"]).shape[-1]
    layer = conv(out_ch, dtype=dec_features.dtype)
    return layer.apply({"params": p}, dec_features).astype(jnp.float32)


def abstract_variables(cfg: VQGANConfig) -> dict:
    """``jax.eval_shape`` of ``VQGAN(cfg).init``, unboxed: the tree of ShapeDtypeStructs (no allocation)."""
    f = cfg.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, cfg.in_channels), jnp.float32)
    shapes = jax.eval_shape(VQGAN(cfg).init, jax.random.key(0), x)
    return nn.meta.unbox(shapes)


def num_params(cfg: VQGANConfig, collections: tuple[str, ...] = ("params",)) -> int:
    """Parameter count from shapes only. Add ``"codebook"`` to count an EMA/SimVQ codebook too."""
    shapes = abstract_variables(cfg)
    return int(sum(x.size for c in collections for x in jax.tree.leaves(shapes.get(c, {}))))


__all__ = [
    "Decoder",
    "Encoder",
    "REMAT_POLICIES",
    "VARIANTS",
    "VQGAN",
    "VQGANConfig",
    "abstract_variables",
    "get_config",
    "num_params",
    "vqgan_conv_out",
]
