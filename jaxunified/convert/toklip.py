"""Released TokLIP checkpoints (open_clip ``CustomTextCLIP`` with a timm trunk) → ``models.toklip.TokLIP``.

The released ``TokLIP_{S_256,L_384,XL_512}.pt`` files are open_clip training checkpoints:
``{"state_dict": {"module.<key>": tensor}, "optimizer": ..., "epoch": ...}``; the optimizer state is
ignored and the DDP ``module.`` prefix stripped. Key mapping (i = layer; W = width):

    visual.trunk.blocks.{i}.norm{1,2}.*              → vision/encoder/layers_{i}/ln{1,2}/{scale,bias}
    visual.trunk.blocks.{i}.attn.qkv.* [3W, W] (q|k|v) → …/attn/{query,key,value}  ([W, H, hd] / [H, hd])
    visual.trunk.blocks.{i}.attn.proj.*              → …/attn/out                   ([H, hd, W])
    visual.trunk.blocks.{i}.mlp.fc{1,2}.*            → …/mlp/fc{1,2}
    visual.trunk.norm.*                              → vision/post_ln
    visual.trunk.pos_embed [1, N, W]                 → vision/pos_embedding [N, W]
    visual.trunk.attn_pool.latent [1, 1, W]          → vision/head/probe
    visual.trunk.attn_pool.q / kv [2W, W] (k|v) / proj → vision/head/attn/{query | key, value | out}
    visual.trunk.attn_pool.norm / mlp.fc{1,2}        → vision/head/ln, vision/head/mlp/fc{1,2}
    visual.trunk.vq_table / vq_mapping               → adapter/vq_table, adapter/vq_mapping
    visual.trunk.vq.*  (the LlamaGen VQ model)       → tokenizer/*  (``convert.vq``'s mapping;
                        taming/IBQ names ``encoder.down.{i}.block.{j}`` are renamed to LlamaGen's first)
    text.token_embedding.weight / positional_embedding → text/token_embedding, text/pos_embedding
    text.transformer.resblocks.{i}.ln_{1,2}          → text/encoder/layers_{i}/ln{1,2}
    text.transformer.resblocks.{i}.attn.in_proj_* (q|k|v) / out_proj → …/attn/{query,key,value} / out
    text.transformer.resblocks.{i}.mlp.c_fc / c_proj → …/mlp/fc1, fc2
    text.ln_final / text.text_projection             → text/final_ln, text/head
    logit_scale []                                   → logit_scale

Ignored by design (reported, never silently): ``visual.trunk.patch_embed.*`` (built and saved by
the reference, never called: TokLIP's input is codes), ``visual.trunk.vq.quantize.codebook_used``
(a usage-logging buffer) and ``logit_bias`` (TokLIP trains a softmax loss without it). Any other
key that does not map, and any model tensor the checkpoint lacks, raises one
``CheckpointMismatchError`` listing them.

The same visual/text mapping reads open_clip SigLIP / SigLIP2 checkpoints (e.g. the teacher and
init weights TokLIP's ``covert.py`` writes) into ``models.siglip.SigLIP``: ``load_open_clip_siglip``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from jaxunified.convert import vq as vq_convert
from jaxunified.convert.common import (
    CheckpointMismatchError,
    apply_rules,
    attn_out_kernel,
    check_and_build,
    conv_kernel,
    linear_kernel,
    qkv_bias,
    qkv_kernel,
    read_state_dict,
    split_fused,
    strip_prefix,
)
from jaxunified.models import siglip as siglip_lib
from jaxunified.models import toklip as toklip_lib
from jaxunified.models.toklip import TokLIP, TokLIPConfig
from jaxunified.models.vqgan import VQGAN
from jaxunified.nn.transformer import stack_layers

log = logging.getLogger(__name__)

TRUNK = "visual.trunk."
VQ_PREFIX = TRUNK + "vq."
IGNORED_BY_DESIGN = (
    re.escape(TRUNK) + r"patch_embed\..*",
    re.escape(VQ_PREFIX) + r"quantize\.codebook_used",
    r"logit_bias",
)
# Fused projections: key suffix → (names of the parts, in row order).
_FUSED = {
    "attn.qkv": ("attn.q", "attn.k", "attn.v"),
    "attn_pool.kv": ("attn_pool.k", "attn_pool.v"),
    "attn.in_proj": ("attn.q", "attn.k", "attn.v"),
}


# ---------------------------------------------------------------------------------------------
# Key layout helpers


def _split_fused(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fused q|k|v and k|v projections → one pseudo-key per part (``…attn.q.weight``)."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(.*)\b(attn\.qkv|attn_pool\.kv)\.(weight|bias)", k) or re.fullmatch(
            r"(.*)\b(attn\.in_proj)_(weight|bias)", k)
        if m is None:
            out[k] = v
            continue
        head, fused, leaf = m.groups()
        for name, part in zip(_FUSED[fused], split_fused(np.asarray(v), len(_FUSED[fused]))):
            out[f"{head}{name}.{leaf}"] = part
    return out


def taming_to_llamagen(key: str, num_levels: int) -> str:
    """taming / IBQ VQ key names → LlamaGen's (``encoder.down.2.block.1`` → ``encoder.conv_blocks.2.res.1``;
    the decoder's ``up.{i}`` is stored deepest-first in LlamaGen, so it becomes ``conv_blocks.{L-1-i}``)."""
    key = re.sub(r"\bmid\.block_1\.", "mid.0.", key)
    key = re.sub(r"\bmid\.attn_1\.", "mid.1.", key)
    key = re.sub(r"\bmid\.block_2\.", "mid.2.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.conv_blocks.\1.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.conv_blocks.{num_levels - 1 - int(m.group(1))}.", key)
    return re.sub(r"\.conv_blocks\.(\d+)\.block\.", r".conv_blocks.\1.res.", key)


def _is_taming(vq_sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.")) for k in vq_sd)


# ---------------------------------------------------------------------------------------------
# Rules: visual trunk and open_clip text tower → SigLIP-layout flat keys ("params/vision/...")


_QKV = {"q": "query", "k": "key", "v": "value"}
_MLP = {"mlp.fc1": "fc1", "mlp.fc2": "fc2", "mlp.c_fc": "fc1", "mlp.c_proj": "fc2"}


def _leaf(leaf: str, norm: bool = False) -> str:
    return ("scale" if norm else "kernel") if leaf == "weight" else "bias"


def _linear(leaf: str, x: np.ndarray) -> np.ndarray:
    return linear_kernel(x) if leaf == "weight" else x


def _attn(base: str, part: str, leaf: str, x: np.ndarray, heads: int):
    """One attention projection: ``part`` is q/k/v or "out"."""
    if part == "out":
        return base + "out/" + _leaf(leaf), attn_out_kernel(x, heads) if leaf == "weight" else x
    return base + _QKV[part] + "/" + _leaf(leaf), qkv_kernel(x, heads) if leaf == "weight" else qkv_bias(x, heads)


def _block(tower: str, heads: int):
    """Handler for one encoder block's key in either tower (timm and open_clip names)."""

    def fn(m, x):
        i, rest, leaf = m.groups()
        base = f"params/{tower}/encoder/layers_{i}/"
        if rest in ("norm1", "norm2", "ln_1", "ln_2"):
            return base + f"ln{rest[-1]}/" + _leaf(leaf, norm=True), x
        if rest.startswith("attn."):
            part = rest.split(".")[1]
            return _attn(base + "attn/", "out" if part in ("proj", "out_proj") else part, leaf, x, heads)
        return base + f"mlp/{_MLP[rest]}/" + _leaf(leaf), _linear(leaf, x)

    return fn


def _pool(heads: int):
    def fn(m, x):
        rest, leaf = m.groups()
        base = "params/vision/head/"
        if rest in ("q", "k", "v", "proj"):
            return _attn(base + "attn/", "out" if rest == "proj" else rest, leaf, x, heads)
        if rest == "norm":
            return base + "ln/" + _leaf(leaf, norm=True), x
        return base + f"mlp/{rest.split('.')[-1]}/" + _leaf(leaf), _linear(leaf, x)

    return fn


def _rules(num_heads: int, text_heads: int, patch_embed: bool):
    t = re.escape(TRUNK)

    def at(path: str, norm: bool = False):
        return lambda m, x: (path + _leaf(m.group(1), norm), x if norm else _linear(m.group(1), x))

    rules = [
        (rf"{t}blocks\.(\d+)\.(norm[12]|attn\.[qkv]|attn\.proj|mlp\.fc[12])\.(weight|bias)",
         _block("vision", num_heads)),
        (r"text\.transformer\.resblocks\.(\d+)\.(ln_[12]|attn\.[qkv]|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)"
         r"\.(weight|bias)", _block("text", text_heads)),
        (rf"{t}norm\.(weight|bias)", at("params/vision/post_ln/", norm=True)),
        (rf"{t}pos_embed", lambda m, x: ("params/vision/pos_embedding", x.reshape(x.shape[-2], x.shape[-1]))),
        (rf"{t}attn_pool\.latent", lambda m, x: ("params/vision/head/probe", x)),
        (rf"{t}attn_pool\.([qkv]|proj|norm|mlp\.fc[12])\.(weight|bias)", _pool(num_heads)),
        (rf"{t}(vq_table|vq_mapping)\.(weight|bias)",
         lambda m, x: (f"params/adapter/{m.group(1)}/" + _leaf(m.group(2)), _linear(m.group(2), x))),
        (r"text\.token_embedding\.weight", lambda m, x: ("params/text/token_embedding", x)),
        (r"text\.positional_embedding", lambda m, x: ("params/text/pos_embedding", x)),
        (r"text\.ln_final\.(weight|bias)", at("params/text/final_ln/", norm=True)),
        (r"text\.text_projection\.(weight|bias)", at("params/text/head/")),
        (r"logit_scale", lambda m, x: ("params/logit_scale", np.asarray(x).reshape(()))),
    ]
    if patch_embed:  # a SigLIP target (the teacher) keeps the conv stem and the sigmoid bias
        rules.append((rf"{t}patch_embed\.proj\.(weight|bias)",
                      lambda m, x: ("params/vision/patch_embed/" + _leaf(m.group(1)),
                                    conv_kernel(x) if m.group(1) == "weight" else x)))
        rules.append((r"logit_bias", lambda m, x: ("params/logit_bias", np.asarray(x).reshape(()))))
    return rules


def _stack_scanned(params: dict, cfg_vision, cfg_text) -> dict:
    for name, tc in (("vision", cfg_vision), ("text", cfg_text)):
        if tc is not None and tc.scan and name in params:
            params[name]["encoder"] = stack_layers(params[name]["encoder"], tc.depth)
    return params


def _unscanned(cfg: TokLIPConfig) -> TokLIPConfig:
    return dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, scan=False),
        text=dataclasses.replace(cfg.text, scan=False) if cfg.text else None,
    )


def ignored_keys(sd: Mapping[str, Any]) -> list[str]:
    """The checkpoint keys ``convert_state_dict`` drops by design (see the module docstring)."""
    pats = [re.compile(p) for p in IGNORED_BY_DESIGN]
    return sorted(k for k in strip_prefix(sd, "module.") if any(p.fullmatch(k) for p in pats))


# ---------------------------------------------------------------------------------------------
# TokLIP


def _tokenizer_params(sd: Mapping[str, np.ndarray], cfg: TokLIPConfig, vq_state_dict, what: str) -> tuple[dict, str]:
    """The tokenizer's params from the checkpoint's ``visual.trunk.vq.*`` (or a separate VQ state
    dict). Returns (params, "full" | "codebook")."""
    vq_sd = {k[len(VQ_PREFIX):]: v for k, v in sd.items() if k.startswith(VQ_PREFIX)}
    has_net = any(k.startswith(("encoder.", "decoder.")) for k in vq_sd)
    if not has_net and vq_state_dict is not None:
        vq_sd = dict(vq_state_dict)
        has_net = True
    if has_net:
        if _is_taming(vq_sd):
            vq_sd = {taming_to_llamagen(k, len(cfg.vq.ch_mult)): v for k, v in vq_sd.items()}
        variables = vq_convert.convert_state_dict(vq_sd, cfg.vq, what=f"{what} (VQ tokenizer)")
        return variables["params"], "full"
    key = "quantize.embedding.weight"
    if key not in vq_sd:
        raise CheckpointMismatchError(
            f"{what} has no VQ codebook ({VQ_PREFIX}{key}); pass vq_path= (the LlamaGen/IBQ tokenizer checkpoint)"
        )
    extra = sorted(VQ_PREFIX + k for k in vq_sd if k not in (key, "quantize.codebook_used"))
    if extra:
        raise CheckpointMismatchError(f"{what}: unexpected VQ keys without an encoder/decoder: {extra[:20]}")
    emb = np.asarray(vq_sd[key])
    want = (cfg.vq.codebook_size, cfg.vq.embed_dim)
    if emb.shape != want:
        raise CheckpointMismatchError(
            f"{what}: VQ codebook {VQ_PREFIX}{key} has shape {emb.shape}, the config expects {want}; "
            "pass vq=dict(codebook_size=..., embed_dim=...)"
        )
    return {"quantize": {"embedding": emb.astype(np.float32)}}, "codebook"


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: TokLIPConfig, *, vq_state_dict=None,
                       what: str = "TokLIP checkpoint") -> dict:
    """A TokLIP state dict (open_clip/timm names, optionally ``module.``-prefixed) → ``{"params": ...}``.

    The tokenizer comes from ``visual.trunk.vq.*`` when the checkpoint holds the VQ network (the
    released files do), else from ``vq_state_dict`` (a LlamaGen/IBQ VQ state dict), else only its
    codebook is loaded: the model then runs from codes (``codes=``) but cannot tokenize images.
    """
    sd = strip_prefix(sd, "module.")
    tok, tok_kind = _tokenizer_params(sd, cfg, vq_state_dict, what)
    rest = _split_fused({k: v for k, v in sd.items() if not k.startswith(VQ_PREFIX)})
    converted, unmapped = apply_rules(rest, _rules(cfg.vision.num_heads, cfg.text.num_heads if cfg.text else 0,
                                                   patch_embed=False), ignore=IGNORED_BY_DESIGN)
    if cfg.text is None:
        unmapped = [k for k in unmapped if not k.startswith("text.")]
        converted = {k: v for k, v in converted.items() if not k.startswith("params/text/")}
    expected = abstract(_unscanned(cfg))["params"]
    expected = {k: v for k, v in expected.items() if k != "tokenizer"}
    built = check_and_build({k[len("params/"):]: v for k, v in converted.items()}, expected, unmapped, what=what)
    params = _stack_scanned(built, cfg.vision, cfg.text)
    params["tokenizer"] = tok
    ignored = ignored_keys(sd)
    if ignored:
        log.info("%s: ignored by design: %s", what, ", ".join(ignored))
    if tok_kind == "codebook":
        log.warning("%s holds only the VQ codebook: the model runs from codes; pass vq_path= to tokenize images", what)
    return {"params": params}


def abstract(cfg: TokLIPConfig) -> dict:
    return toklip_lib.abstract_variables(cfg, full=True)


def config_from_reference(ref: Mapping[str, Any], base: TokLIPConfig) -> TokLIPConfig:
    """Applies reference constructor arguments (the timm ``VisionTransformer`` kwargs, as in the
    golden's JSON: image_size, patch_size, width, depth, num_heads, mlp_ratio, act, codebook_size,
    codebook_embed_dim, codebook_l2_norm) on top of ``base``."""
    v = base.vision
    width = int(ref.get("width", ref.get("embed_dim", v.width)))
    mlp = int(width * float(ref["mlp_ratio"])) if "mlp_ratio" in ref else v.mlp_dim
    act = {"gelu_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}[ref.get("act", v.act)]
    if ref.get("pool", "map") != "map" or not ref.get("causal", True):
        raise ValueError("only the released TokLIP form (MAP pooling, causal mask) is supported")
    vision = dataclasses.replace(
        v, width=width, depth=int(ref.get("depth", v.depth)), num_heads=int(ref.get("num_heads", v.num_heads)),
        mlp_dim=mlp, patch_size=int(ref.get("patch_size", v.patch_size)),
        image_size=int(ref.get("image_size", ref.get("img_size", v.image_size))), act=act, causal=True)
    q = base.vq.vq
    q = dataclasses.replace(q, codebook_size=int(ref.get("codebook_size", q.codebook_size)),
                            embed_dim=int(ref.get("codebook_embed_dim", q.embed_dim)),
                            l2_norm=bool(ref.get("codebook_l2_norm", q.l2_norm)))
    return dataclasses.replace(base, vision=vision, vq=dataclasses.replace(base.vq, vq=q))


def load_toklip(path, variant: str = "S", *, config: Mapping | str | None = None, vq_path=None,
                **overrides) -> tuple[TokLIP, dict]:
    """Loads a released TokLIP ``.pt`` (or a ``.safetensors`` copy of its state dict).

    ``variant``: "S" (256 px), "L" (384), "XL" (512, IBQ tokenizer) or "tiny"; ``overrides`` go
    to ``models.toklip.get_config`` (``vision=dict(scan=True, remat=True, dtype=jnp.bfloat16)``,
    ``vq=dict(...)``, ``text=dict(...)``, ``with_text=False``). ``config``: reference constructor
    arguments (a dict or a JSON path, see ``config_from_reference``). ``vq_path``: a separate
    tokenizer checkpoint (LlamaGen ``vq_ds16_t2i.pt``) when the file lacks the VQ network.
    A checkpoint without a text tower loads the image side only.
    """
    p = pathlib.Path(path)
    sd = strip_prefix(read_state_dict(p), "module.")
    if not any(k.startswith("text.") for k in sd) and overrides.get("with_text", True):
        log.warning("%s has no text tower; loading the image side only", p)
        overrides["with_text"] = False
    cfg = toklip_lib.get_config(variant, **overrides)
    if config is not None:
        if isinstance(config, (str, pathlib.Path)):
            config = json.loads(pathlib.Path(config).read_text())
        cfg = config_from_reference(config, cfg)
    vq_sd = read_state_dict(vq_path) if vq_path is not None else None
    variables = convert_state_dict(sd, cfg, vq_state_dict=vq_sd, what=f"TokLIP checkpoint {p}")
    return TokLIP(cfg), variables


_VQ_PARTS = ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")


def load_ibq(path) -> tuple[VQGAN, dict]:
    """TokLIP-XL's IBQ tokenizer (262144 codes) from its Lightning checkpoint, whose loss and EMA
    entries are not part of the model; the taming layout is renamed to LlamaGen's."""
    cfg = toklip_lib.IBQ_262144
    sd = {taming_to_llamagen(k, len(cfg.ch_mult)): v for k, v in read_state_dict(path).items()
          if k.split(".")[0] in _VQ_PARTS}
    return VQGAN(cfg), vq_convert.convert_state_dict(sd, cfg, what=f"IBQ checkpoint {path}")


# ---------------------------------------------------------------------------------------------
# open_clip SigLIP (teacher / init weights written by TokLIP's covert.py)


def convert_open_clip_siglip(sd: Mapping[str, np.ndarray], cfg: siglip_lib.SigLIPConfig,
                             what: str = "open_clip SigLIP checkpoint") -> dict:
    """An open_clip SigLIP/SigLIP2 state dict (``visual.trunk.*`` timm + ``text.*``) → SigLIP variables."""
    sd = _split_fused(strip_prefix(sd, "module."))
    converted, unmapped = apply_rules(sd, _rules(cfg.vision.num_heads, cfg.text.num_heads if cfg.text else 0,
                                                 patch_embed=True))
    flat_cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, scan=False),
                                   text=dataclasses.replace(cfg.text, scan=False) if cfg.text else None)
    expected = nn.meta.unbox(siglip_lib.abstract_variables(flat_cfg)["params"])
    if cfg.text is None:
        converted = {k: v for k, v in converted.items() if not k.startswith("params/text/")}
        unmapped = [k for k in unmapped if not k.startswith("text.")]
    built = check_and_build({k[len("params/"):]: v for k, v in converted.items()}, expected, unmapped, what=what)
    return {"params": _stack_scanned(built, cfg.vision, cfg.text if cfg.text else None)}


def load_open_clip_siglip(path, name: str = "So400m/16", image_size: int | None = None,
                          **overrides) -> tuple[siglip_lib.SigLIP, dict]:
    """Loads an open_clip SigLIP checkpoint, e.g. ``siglip2-so400m-vit-l16-256.pt`` from TokLIP's ``covert.py``
    (the TokLIP teacher). ``name``/``image_size``/``overrides`` as ``models.siglip.get_config``."""
    cfg = siglip_lib.get_config(name, image_size=image_size, **overrides)
    sd = read_state_dict(path)
    return siglip_lib.SigLIP(cfg), convert_open_clip_siglip(sd, cfg, what=f"open_clip SigLIP checkpoint {path}")


__all__ = [
    "IGNORED_BY_DESIGN",
    "config_from_reference",
    "convert_open_clip_siglip",
    "convert_state_dict",
    "ignored_keys",
    "load_ibq",
    "load_open_clip_siglip",
    "load_toklip",
    "taming_to_llamagen",
]
