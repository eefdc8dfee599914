"""HF ``SiglipModel`` checkpoints (SigLIP and fixed-resolution SigLIP2) → ``models.siglip.SigLIP``.

Key mapping ({t} = vision_model | text_model, i = layer):

    {t}.encoder.layers.{i}.layer_norm{1,2}.*           → {tower}/encoder/layers_{i}/ln{1,2}/{scale,bias}
    {t}.encoder.layers.{i}.self_attn.{q,k,v}_proj.*    → …/attn/{query,key,value}/{kernel [D,H,hd], bias [H,hd]}
    {t}.encoder.layers.{i}.self_attn.out_proj.*        → …/attn/out/{kernel [H,hd,D], bias}
    {t}.encoder.layers.{i}.mlp.fc{1,2}.*               → …/mlp/fc{1,2}
    vision_model.embeddings.patch_embedding.*          → vision/patch_embed (OIHW → HWIO)
    {t}.embeddings.position_embedding.weight           → {tower}/pos_embedding
    vision_model.post_layernorm.*                      → vision/post_ln
    vision_model.head.{probe, layernorm, mlp.*}        → vision/head/{probe, ln, mlp}
    vision_model.head.attention.in_proj_* (fused q|k|v) and out_proj.* → vision/head/attn/{query,key,value,out}
    text_model.embeddings.token_embedding.weight       → text/token_embedding
    text_model.final_layer_norm.*, text_model.head.*   → text/final_ln, text/head
    logit_scale, logit_bias [1]                        → logit_scale, logit_bias []

``convert_state_dict`` takes a ``prefix`` so models that embed a SiglipModel (DualToken's
``siglip_model.``) reuse this mapping. Scanned configs get the layers stacked after mapping.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from jaxunified.convert.common import (
    apply_rules,
    attn_out_kernel,
    check_and_build,
    conv_kernel,
    linear_kernel,
    qkv_bias,
    qkv_kernel,
    read_state_dict,
    resolve_config,
    split_fused,
)
from jaxunified.models.siglip import SigLIP, SigLIPConfig, TextConfig, VisionConfig, abstract_variables
from jaxunified.nn.transformer import stack_layers

_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
_IGNORED = (r".*position_ids",)


def _act(name: str) -> str:
    if name not in _ACTS:
        raise ValueError(f"unsupported hidden_act {name!r} in the SigLIP config")
    return _ACTS[name]


def hf_act(ours: str) -> str:
    """The HF ``hidden_act`` for our activation name: the first of ``_ACTS`` (the native kernel)."""
    return next(hf for hf, name in _ACTS.items() if name == ours)


def config_from_hf(hf: Mapping[str, Any], **vision_text_overrides) -> SigLIPConfig:
    """A ``SigLIPConfig`` from an HF ``config.json`` dict (``SiglipConfig`` or a vision-only one)."""
    vc = hf.get("vision_config", hf if hf.get("model_type") == "siglip_vision_model" else None)
    tc = hf.get("text_config")
    if vc is None:
        raise ValueError("config.json has no vision_config; is this a SigLIP checkpoint?")
    if vc.get("model_type") == "siglip2_vision_model" or "num_patches" in vc:
        raise ValueError("NaFlex SigLIP2 (Siglip2Model) is not supported; use the fixed-resolution SiglipModel checkpoints")
    vision = VisionConfig(
        width=vc.get("hidden_size", 768),
        depth=vc.get("num_hidden_layers", 12),
        mlp_dim=vc.get("intermediate_size", 3072),
        num_heads=vc.get("num_attention_heads", 12),
        patch_size=vc.get("patch_size", 16),
        image_size=vc.get("image_size", 224),
        num_channels=vc.get("num_channels", 3),
        act=_act(vc.get("hidden_act", "gelu_pytorch_tanh")),
        ln_eps=vc.get("layer_norm_eps", 1e-6),
        pool="map" if vc.get("vision_use_head", True) else "none",
    )
    text = None
    if tc is not None:
        width = tc.get("hidden_size", 768)
        text = TextConfig(
            vocab_size=tc.get("vocab_size", 32000),
            width=width,
            depth=tc.get("num_hidden_layers", 12),
            mlp_dim=tc.get("intermediate_size", 3072),
            num_heads=tc.get("num_attention_heads", 12),
            max_len=tc.get("max_position_embeddings", 64),
            proj_dim=tc.get("projection_size") or width,
            act=_act(tc.get("hidden_act", "gelu_pytorch_tanh")),
            ln_eps=tc.get("layer_norm_eps", 1e-6),
            pad_id=tc.get("pad_token_id", 1) if tc.get("pad_token_id") is not None else 1,
        )
    v_over = vision_text_overrides.pop("vision", None) or {}
    t_over = vision_text_overrides.pop("text", None) or {}
    vision = dataclasses.replace(vision, **v_over)
    if text is not None:
        text = dataclasses.replace(text, **t_over)
    return dataclasses.replace(SigLIPConfig(vision=vision, text=text), **vision_text_overrides)


def _split_fused_head(sd: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    out = dict(sd)
    for kind in ("weight", "bias"):
        key = f"{prefix}vision_model.head.attention.in_proj_{kind}"
        if key in out:
            for name, part in zip("qkv", split_fused(out.pop(key), 3)):
                out[f"{prefix}vision_model.head.attention.{name}_proj.{kind}"] = part
    return out


def _rules(cfg: SigLIPConfig, prefix: str):
    p = re.escape(prefix)
    tower = {"vision_model": "vision", "text_model": "text"}
    heads = {"vision": cfg.vision.num_heads, "text": cfg.text.num_heads if cfg.text else 0}

    def base(t: str, rest: str) -> str:
        rest = re.sub(r"^encoder\.layers\.(\d+)", r"encoder/layers_\1", rest)
        rest = rest.replace("head.attention", "head/attn").replace("head.layernorm", "head/ln")
        for a, b in (("layer_norm1", "ln1"), ("layer_norm2", "ln2"), ("self_attn", "attn"), ("out_proj", "out"),
                     ("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("post_layernorm", "post_ln"),
                     ("final_layer_norm", "final_ln")):
            rest = re.sub(rf"(^|\.){a}(\.|$)", rf"\g<1>{b}\g<2>", rest)
        return f"params/{tower[t]}/" + rest.replace(".", "/")

    def qkv(m, w):
        t, rest, leaf = m.group(1), m.group(2), m.group(3)
        h = heads[tower[t]]
        return base(t, rest) + ("/kernel" if leaf == "weight" else "/bias"), (
            qkv_kernel(w, h) if leaf == "weight" else qkv_bias(w, h))

    def out(m, w):
        t, rest, leaf = m.group(1), m.group(2), m.group(3)
        h = heads[tower[t]]
        return base(t, rest) + ("/kernel" if leaf == "weight" else "/bias"), (
            attn_out_kernel(w, h) if leaf == "weight" else w)

    def norm(m, w):
        return base(m.group(1), m.group(2)) + ("/scale" if m.group(3) == "weight" else "/bias"), w

    def linear(m, w):
        return base(m.group(1), m.group(2)) + ("/kernel" if m.group(3) == "weight" else "/bias"), (
            linear_kernel(w) if m.group(3) == "weight" else w)

    towers = r"(vision_model|text_model)"
    return [
        (rf"{p}{towers}\.((?:encoder\.layers\.\d+\.self_attn|head\.attention)\.[qkv]_proj)\.(weight|bias)", qkv),
        (rf"{p}{towers}\.((?:encoder\.layers\.\d+\.self_attn|head\.attention)\.out_proj)\.(weight|bias)", out),
        (rf"{p}{towers}\.(.*(?:layer_norm\d?|layernorm|post_layernorm|final_layer_norm))\.(weight|bias)", norm),
        (rf"{p}{towers}\.(.*\.fc[12])\.(weight|bias)", linear),
        (rf"{p}text_model\.head\.(weight|bias)",
         lambda m, w: ("params/text/head/" + ("kernel" if m.group(1) == "weight" else "bias"),
                       linear_kernel(w) if m.group(1) == "weight" else w)),
        (rf"{p}vision_model\.embeddings\.patch_embedding\.(weight|bias)",
         lambda m, w: ("params/vision/patch_embed/" + ("kernel" if m.group(1) == "weight" else "bias"),
                       conv_kernel(w) if m.group(1) == "weight" else w)),
        (rf"{p}{towers}\.embeddings\.position_embedding\.weight",
         lambda m, w: (f"params/{tower[m.group(1)]}/pos_embedding", w)),
        (rf"{p}text_model\.embeddings\.token_embedding\.weight", lambda m, w: ("params/text/token_embedding", w)),
        (rf"{p}vision_model\.head\.probe", lambda m, w: ("params/vision/head/probe", w)),
        (rf"{p}logit_(scale|bias)", lambda m, w: (f"params/logit_{m.group(1)}", np.asarray(w).reshape(()))),
    ]


def convert_state_dict(
    sd: Mapping[str, np.ndarray], cfg: SigLIPConfig, prefix: str = "", what: str = "SigLIP checkpoint",
    strict_unmapped: bool = True,
) -> dict:
    """HF SiglipModel state dict (keys under ``prefix``) → SigLIP variables, checked against ``cfg``.

    With ``strict_unmapped=False`` keys outside the SigLIP layout are ignored (for callers that
    map the rest of a bigger checkpoint themselves).
    """
    sd = {k: v for k, v in sd.items() if k.startswith(prefix)}
    if cfg.text is None:  # a vision-only config ignores the checkpoint's text tower
        sd = {k: v for k, v in sd.items() if not k.startswith(f"{prefix}text_model.")}
    sd = _split_fused_head(sd, prefix)
    converted, unmapped = apply_rules(sd, _rules(cfg, prefix), ignore=_IGNORED)
    flat_cfg = dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, scan=False),
        text=dataclasses.replace(cfg.text, scan=False) if cfg.text else None,
    )
    if not strict_unmapped:
        unmapped = []
    expected = {"params": nn.meta.unbox(abstract_variables(flat_cfg)["params"])}
    variables = check_and_build(converted, expected, unmapped, what=what)
    params = variables["params"]
    for name, tc in (("vision", cfg.vision), ("text", cfg.text)):
        if tc is not None and tc.scan:
            params[name]["encoder"] = stack_layers(params[name]["encoder"], tc.depth)
    return {"params": params}


def load_hf_siglip(path, config: Mapping | str | None = None, **overrides) -> tuple[SigLIP, dict]:
    """Loads an HF SigLIP/SigLIP2 ``SiglipModel`` from a folder (``config.json`` + ``model.safetensors``
    or a sharded index) or a single weights file.

    ``config``: an HF config dict or a path to config.json; default the folder's ``config.json``.
    ``overrides``: ``vision=dict(scan=True, remat=True, dtype=...)``, ``text=...``, or SigLIPConfig fields.
    """
    p = pathlib.Path(path)
    hf = resolve_config(config, p, "an HF SiglipConfig dict or the path of its config.json")
    cfg = config_from_hf(hf, **overrides)
    sd = read_state_dict(p)
    variables = convert_state_dict(sd, cfg, what=f"SigLIP checkpoint {p}")
    return SigLIP(cfg), variables


__all__ = ["config_from_hf", "convert_state_dict", "hf_act", "load_hf_siglip"]
