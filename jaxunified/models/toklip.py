"""TokLIP: a causal SigLIP ViT over frozen VQ codes, CLIP-aligned by distillation and contrast.

    images ─(frozen VQGAN encoder + quantiser)→ codes [B, h, w]            (or precomputed codes)
    codes ─(l2-normalised codebook, frozen)→ [B, L, d] ─ vq_table → GELU(erf) → vq_mapping → [B, L, W]
          + SigLIP position embedding → SigLIP encoder with a causal raster-order mask
          → final LayerNorm ("features") → MAP head over all tokens ("pooled")

The ViT input is a pure function of the code ids, so codes can be computed once per dataset and
an LLM or AR model can feed ids directly. Because the mask is causal, the feature at position t
depends only on codes ≤ t: a prefix of a code sequence encodes to the same features as the
whole sequence does at those positions (``encode_tokens`` accepts prefixes).

Differences from the reference (TencentARC/TokLIP ``timm_local/models/vision_transformer.py``),
on purpose: the causal mask is a boolean applied to the logits before the softmax in every code
path, including rematerialised (``remat``) and scanned encoders — the reference drops it under
gradient checkpointing and adds it after the softmax in its non-fused path; the frozen tokenizer
runs inference only (no entropy loss, no usage buffers, float32 argmin); the conv patch embedding
the reference constructs but never calls is not part of the model.

One addition, off unless asked for (``causal_stem``; the shapes preset uses it): raster-causal
convolutions over the code grid between the MLP and the ViT, added back to the MLP's output. The
per-code MLP sees one code at a time and a small ViT trained for minutes learns little local
geometry from attention; a causal conv gives it that and keeps "features at t depend only on
codes ≤ t".

Parameters: ``tokenizer`` (VQGAN; frozen), ``adapter/{vq_table, vq_mapping}``, ``stem`` (only
with ``causal_stem``), ``vision``
(``VisionTower``; no ``patch_embed``), ``text`` (``TextTower``; frozen) and the scalar
``logit_scale`` (softmax CLIP temperature; TokLIP uses no logit bias); the last two only when
the config has a text tower.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxunified.models import siglip as siglip_lib
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.models.siglip import TextConfig, TextTower, VisionConfig, VisionTower, l2_normalize
from jaxunified.models.vqgan import VQGAN, VQGANConfig
from jaxunified.nn.activations import activation
from jaxunified.nn.conv import raster_causal_conv, torch_default_init
from jaxunified.quant.vq import VQConfig


@dataclasses.dataclass(frozen=True)
class TokLIPConfig:
    vision: VisionConfig
    vq: VQGANConfig
    text: TextConfig | None = None
    mlp_ratio: int = 4  # adapter hidden width = mlp_ratio · vision.width (the reference's 4·embed_dim)
    mlp_act: str = "gelu"  # exact-erf GELU (torch nn.GELU), not SigLIP's tanh form
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float | None = None  # only for the sigmoid-loss option; TokLIP's softmax loss has none
    # ((features, kernel), ...) raster-causal convs between the MLP and the ViT (module docstring);
    # () — the reference model — for every released variant.
    causal_stem: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        f = self.vq.downsample_factor
        if self.vision.patch_size != f:
            raise ValueError(
                f"TokLIP's ViT reads one token per VQ code: vision.patch_size ({self.vision.patch_size}) must equal "
                f"the VQ downsample factor ({f}) so the position grid is the code grid"
            )
        if self.vision.pool != "map":
            raise ValueError(f"TokLIP pools with the MAP head; got vision.pool={self.vision.pool!r}")
        if self.vq.vq.update == "ema" or self.vq.vq.restart:
            raise ValueError("TokLIP's tokenizer is frozen: use frozen_vq_config(vq) (plain codebook, no EMA/restart)")
        if self.text is not None and self.text.proj_dim != self.vision.width:
            raise ValueError(
                f"image and text embeddings must have one width: vision.width={self.vision.width}, "
                f"text.proj_dim={self.text.proj_dim}"
            )

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def grid(self) -> int:
        return self.vision.grid

    @property
    def num_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def width(self) -> int:
        return self.vision.width


def frozen_vq_config(vq: VQGANConfig) -> VQGANConfig:
    """The inference form of a tokenizer config: a plain codebook in ``params`` (an EMA codebook is
    moved there by the loaders), no restart, no entropy loss. Codes and codebook vectors are unchanged."""
    q = vq.vq
    update = "grad" if q.update == "ema" else q.update
    return dataclasses.replace(vq, vq=dataclasses.replace(q, update=update, restart=False, entropy_loss_ratio=0.0))


# IBQ tokenizer (TencentARC SEED-Voken ``imagenet_ibqgan_262144.yaml``): taming encoder/decoder
# ch 128, ch_mult (1,1,2,2,4), 4 res blocks (decoder 5), attention at the lowest level,
# z 256 → 256-d codes, 262,144 codes, no l2 norm, argmax of z·e.
IBQ_262144 = VQGANConfig(
    ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, z_channels=256,
    vq=VQConfig(codebook_size=262144, embed_dim=256, l2_norm=False, update="ibq", distance_chunk=16384),
)


def _tiny_vq(codebook_size: int = 16384) -> VQGANConfig:
    # Downsample 16 like VQ-16 so the golden's 64 px / patch-16 grid holds; narrow enough for tests.
    return VQGANConfig(ch=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=8, norm_groups=4,
                       vq=VQConfig(codebook_size=codebook_size, embed_dim=8, l2_norm=True))


def _so400m(image_size: int) -> tuple[VisionConfig, TextConfig]:
    c = siglip_lib.get_config("So400m/16", image_size=image_size, vision=dict(causal=True))
    return c.vision, c.text


def _variant(name: str) -> tuple[VisionConfig, VQGANConfig, TextConfig | None]:
    if name in ("S", "B"):  # README "TokLIP-S" (the paper's TokLIP-B): 256 px, 16×16 codes
        v, t = _so400m(256)
        return v, vqgan_lib.get_config("VQ-16"), t
    if name == "L":  # 384 px, 24×24 codes
        v, t = _so400m(384)
        return v, vqgan_lib.get_config("VQ-16"), t
    if name == "XL":  # 512 px, 32×32 IBQ codes
        v, t = _so400m(512)
        return v, IBQ_262144, t
    if name == "tiny":  # golden toklip_tiny: width 32, depth 2, 4 heads, mlp 64, 64 px, 4×4 codes
        c = siglip_lib.get_config("tiny", image_size=64, vision=dict(patch_size=16, causal=True))
        return c.vision, _tiny_vq(), c.text
    if name == "shapes":  # built-in pipeline: the shapes-S SigLIP tower over the shapes-S VQGAN's 16×16 codes
        vq = vqgan_lib.get_config("shapes-S")
        c = siglip_lib.get_config("shapes-S", vision=dict(patch_size=vq.downsample_factor, causal=True))
        return c.vision, vq, c.text
    raise ValueError(f"unknown TokLIP variant {name!r}; known: {', '.join(VARIANTS)}")


VARIANTS = ("S", "B", "L", "XL", "tiny", "shapes")
_VQ_FIELDS = frozenset(f.name for f in dataclasses.fields(VQConfig))


def get_config(name: str, *, vision: dict | None = None, vq: VQGANConfig | dict | None = None,
               text: dict | None = None, with_text: bool = True, **overrides) -> TokLIPConfig:
    """A variant by name, e.g. ``get_config("L", vision=dict(scan=True, remat=True, dtype=jnp.bfloat16))``.

    ``vq`` is a ``VQGANConfig`` or overrides for the variant's (``codebook_size=...``); any
    tokenizer is made frozen (``frozen_vq_config``). ``with_text=False`` drops the text tower.
    """
    v, q, t = _variant(name)
    v = dataclasses.replace(v, **(vision or {}))
    if isinstance(vq, VQGANConfig):
        q = vq
    elif vq:
        over = dict(vq)
        inner = {k: over.pop(k) for k in list(over) if k in _VQ_FIELDS}
        q = dataclasses.replace(q, vq=dataclasses.replace(q.vq, **inner), **over)
    q = frozen_vq_config(q)
    t = dataclasses.replace(t, **(text or {})) if (with_text and t is not None) else None
    return TokLIPConfig(vision=v, vq=q, text=t, **overrides)


class CodeAdapter(nn.Module):
    """The reference's ``vq_table`` → GELU → ``vq_mapping``: codebook vectors [.., d] → ViT width."""

    width: int
    hidden: int
    act: str = "gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # PyTorch's default Linear init (the reference creates these layers after init_weights).
        x = nn.Dense(self.hidden, dtype=self.dtype, name="vq_table",
                     kernel_init=nn.with_logical_partitioning(torch_default_init, ("code_dim", "mlp")),
                     bias_init=nn.with_logical_partitioning(_torch_bias(x.shape[-1]), ("mlp",)))(x.astype(self.dtype))
        x = activation(self.act)(x)
        return nn.Dense(self.width, dtype=self.dtype, name="vq_mapping",
                        kernel_init=nn.with_logical_partitioning(torch_default_init, ("mlp", "embed")),
                        bias_init=nn.with_logical_partitioning(_torch_bias(self.hidden), ("embed",)))(x)


class CausalStem(nn.Module):
    """Adapter output [B, h, w, W] → + Dense(GELU(raster-causal conv)…): local context, still causal."""

    layers: tuple[tuple[int, int], ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for i, (features, kernel) in enumerate(self.layers):
            conv = raster_causal_conv(features, kernel, h.shape[-1], dtype=self.dtype, name=f"conv_{i}")
            h = nn.gelu(conv(h), approximate=False)
        return x + nn.Dense(x.shape[-1], dtype=self.dtype, name="proj",
                            kernel_init=nn.with_logical_partitioning(torch_default_init, ("mlp", "embed")),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(h)


def _torch_bias(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class TokLIP(nn.Module):
    """See the module docstring. Images are NHWC in [-1, 1]; codes are int [B, h, w] or raster [B, L]."""

    cfg: TokLIPConfig

    def setup(self):
        c = self.cfg
        self.tokenizer = VQGAN(c.vq)
        self.adapter = CodeAdapter(c.width, c.mlp_ratio * c.width, c.mlp_act, c.vision.dtype)
        if c.causal_stem:
            self.stem = CausalStem(c.causal_stem, c.vision.dtype)
        self.vision = VisionTower(c.vision)
        if c.text is not None:  # the image-only form (with_text=False) has no temperature either
            self.text = TextTower(c.text)
            self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.init_logit_scale), ())
            if c.init_logit_bias is not None:
                self.logit_bias = self.param("logit_bias", nn.initializers.constant(c.init_logit_bias), ())

    # ---- low level: the frozen tokenizer ----
    def tokenize(self, images: jax.Array) -> jax.Array:
        """Images [B, H, W, C] → codes int32 [B, H/f, W/f] (frozen VQ, inference mode, float32 argmin)."""
        _, codes, _ = self.tokenizer.encode(images.astype(jnp.float32), train=False)
        return jax.lax.stop_gradient(codes)

    def codebook_vectors(self, codes: jax.Array) -> jax.Array:
        """Codes [...] → the (l2-normalised) codebook vectors [..., d] the reference's quantiser emits."""
        return jax.lax.stop_gradient(self.tokenizer.lookup(codes))

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """Codes [B, h, w] → images (the frozen VQ decoder; for generation)."""
        return self.tokenizer.decode_codes(codes)

    # ---- the token encoder ----
    def _codes(self, images, codes) -> tuple[jax.Array, tuple[int, int] | None]:
        """Raster codes [B, L] and their 2-D grid (None for a flat, possibly partial, sequence)."""
        if (images is None) == (codes is None):
            raise ValueError("pass exactly one of images or codes")
        if images is not None:
            codes = self.tokenize(images)
        codes = jnp.asarray(codes)
        if not jnp.issubdtype(codes.dtype, jnp.integer):
            raise ValueError(f"codes must be integer ids, got dtype {codes.dtype}")
        if codes.ndim == 3:
            return codes.reshape(codes.shape[0], -1), (codes.shape[1], codes.shape[2])
        if codes.ndim == 2:
            return codes, None
        raise ValueError(f"codes must be [batch, h, w] or raster [batch, length], got shape {codes.shape}")

    def _posemb(self, length: int, grid: tuple[int, int] | None) -> jax.Array:
        if grid is not None:
            return self.vision.posemb(grid)
        g = self.cfg.grid
        if length > g * g:
            raise ValueError(f"{length} codes exceed the {g}×{g} position grid; pass codes as [batch, h, w] to resize")
        return self.vision.posemb()[:length]  # a raster prefix: causal, so its features are prefix-exact

    def _adapt(self, quant: jax.Array, grid: tuple[int, int] | None) -> jax.Array:
        """Codebook vectors [B, L, d] → ViT input [B, L, W]: MLP (→ causal stem) → + position embedding."""
        x = self.adapter(quant)
        length = x.shape[1]
        pos = self._posemb(length, grid).astype(x.dtype)[None]
        if self.cfg.causal_stem:
            b, w = x.shape[0], x.shape[-1]
            gh, gw = grid or (self.cfg.grid, self.cfg.grid)
            # A raster prefix is laid out on the full grid; being causal, the stem's outputs at the
            # prefix ignore the zero padding after it.
            padded = jnp.pad(x, ((0, 0), (0, gh * gw - length), (0, 0))) if grid is None else x
            x = self.stem(padded.reshape(b, gh, gw, w)).reshape(b, gh * gw, w)[:, :length]
        return x + pos

    def embed_codes(self, codes: jax.Array, grid: tuple[int, int] | None = None) -> jax.Array:
        """Raster codes [B, L] → ViT input [B, L, W]: codebook vectors → MLP (→ stem) → + positions."""
        return self._adapt(self.codebook_vectors(codes), grid)

    def encode_quant(self, quant: jax.Array, grid: tuple[int, int] | None = None) -> dict[str, jax.Array]:
        """From codebook vectors [B, L, d] directly (the reference's ``quant``); same outputs as ``encode``."""
        return self._run(self._adapt(quant, grid))

    def _run(self, x: jax.Array) -> dict[str, jax.Array]:
        x, _ = self.vision.encode(x, causal=self.cfg.vision.causal)
        return self.vision.finish(x)  # {"last_hidden": features after the final LN, "pooled": MAP output}

    def encode(self, images: jax.Array | None = None, *, codes: jax.Array | None = None) -> dict[str, jax.Array]:
        """→ ``codes`` [B, L], ``features`` [B, L, W] (after the final LayerNorm), ``pooled`` [B, W] (MAP)."""
        codes, grid = self._codes(images, codes)
        out = self._run(self.embed_codes(codes, grid))
        return {"codes": codes, "features": out["last_hidden"], "pooled": out["pooled"]}

    def encode_tokens(self, images: jax.Array | None = None, *, codes: jax.Array | None = None):
        """For LLMs and AR models: ``(codes [B, L], features [B, L, W])``; see ``concat_tokens``."""
        out = self.encode(images, codes=codes)
        return out["codes"], out["features"]

    def encode_image(self, images: jax.Array | None = None, *, codes: jax.Array | None = None,
                     normalize: bool = True) -> jax.Array:
        z = self.encode(images, codes=codes)["pooled"]
        return l2_normalize(z) if normalize else z

    def encode_text(self, tokens: jax.Array, normalize: bool = True) -> jax.Array:
        if self.cfg.text is None:
            raise ValueError("this TokLIP config has no text tower (with_text=False)")
        z = self.text(tokens)["pooled"]
        return l2_normalize(z) if normalize else z

    def __call__(self, images: jax.Array | None = None, *, codes: jax.Array | None = None,
                 tokens: jax.Array | None = None) -> dict[str, jax.Array]:
        """Image side from images or codes; with ``tokens`` also text embeddings and
        ``logits_per_image = exp(logit_scale) · img @ txtᵀ`` (+ ``logit_bias`` when the config has one)."""
        out = self.encode(images, codes=codes)
        out["image_embeds"] = l2_normalize(out["pooled"])
        if tokens is not None:
            txt = self.encode_text(tokens)
            out["text_embeds"] = txt
            logits = jnp.exp(self.logit_scale) * out["image_embeds"] @ txt.T
            out["logits_per_image"] = logits + self.logit_bias if self.cfg.init_logit_bias is not None else logits
        return out

    def init_all(self, images: jax.Array, tokens: jax.Array | None = None):
        """Touches every submodule, the VQ decoder too: the full released parameter set."""
        return self(images, tokens=tokens), self.decode_codes(self.tokenize(images))


def concat_tokens(low: jax.Array, features: jax.Array) -> jax.Array:
    """TokLIP's input to an LLM / AR model: low-level code embeddings ⊕ high-level causal features.

    ``low`` [B, L, d_low] is any per-code embedding (the codebook vectors from ``codebook_vectors``,
    or the AR model's own code-embedding table looked up at the codes); ``features`` [B, L, W]
    from ``encode_tokens``. Returns [B, L, d_low + W]. Both are causal in the codes, so the
    concatenation at position t depends only on codes ≤ t (teacher forcing stays valid).
    """
    if low.shape[:2] != features.shape[:2]:
        raise ValueError(f"low-level {low.shape} and causal features {features.shape} must share [batch, length]")
    return jnp.concatenate([low.astype(features.dtype), features], axis=-1)


def lookup_embeddings(table: jax.Array | Callable[[jax.Array], jax.Array], codes: jax.Array) -> jax.Array:
    """Codes [B, L] → rows of an embedding ``table`` [K, D] (or a callable), for ``concat_tokens``."""
    return table(codes) if callable(table) else jnp.take(table, codes, axis=0)


# ---- shapes without memory ----

def abstract_variables(cfg: TokLIPConfig, *, full: bool = True) -> dict:
    """``jax.eval_shape`` of the variables (unboxed). ``full`` includes the VQ decoder (the released
    set); otherwise only what ``__call__`` from images uses (tokenizer encoder + codebook)."""
    model = TokLIP(cfg)
    r = cfg.image_size
    images = jax.ShapeDtypeStruct((1, r, r, cfg.vision.num_channels), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, cfg.text.max_len), jnp.int32) if cfg.text is not None else None
    method = TokLIP.init_all if full else TokLIP.__call__
    shapes = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, tokens=t, method=method), images, tokens)
    return nn.meta.unbox(shapes)


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def num_params(cfg: TokLIPConfig, *, full: bool = True) -> dict[str, int]:
    """Parameter counts per part (``tokenizer``, ``adapter``, ``vision``, ``text``, ``logit_scale``) and ``total``."""
    params = abstract_variables(cfg, full=full)["params"]
    out = {k: count(v) for k, v in params.items()}
    out["total"] = sum(out.values())
    return out


__all__ = [
    "CausalStem",
    "CodeAdapter",
    "IBQ_262144",
    "TokLIP",
    "TokLIPConfig",
    "VARIANTS",
    "abstract_variables",
    "concat_tokens",
    "count",
    "frozen_vq_config",
    "get_config",
    "lookup_embeddings",
    "num_params",
]
