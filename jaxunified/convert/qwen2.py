"""HF Qwen2 / Qwen2.5 / Qwen2.5-VL checkpoints → ``models.lm.DecoderLM``.

A folder with ``config.json`` and ``model.safetensors`` or a sharded
``model.safetensors.index.json``. Key mapping (i = layer; H heads, K kv heads, hd head dim):

    model.embed_tokens.weight                           → embed/embedding
    model.layers.{i}.input_layernorm.weight             → layers/input_norm/scale   (stacked on axis 0)
    model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias} → layers/attn/{query,key,value}  ([D, H|K, hd])
    model.layers.{i}.self_attn.o_proj.weight            → layers/attn/out/kernel    ([H, hd, D])
    model.layers.{i}.post_attention_layernorm.weight    → layers/post_attention_norm/scale
    model.layers.{i}.mlp.{gate,up,down}_proj.weight     → layers/mlp/{gate,up,down}/kernel
    model.norm.weight                                   → final_norm/scale
    lm_head.weight                                      → lm_head  (absent, or equal to the embedding, when tied)

HF's q/k rotation is ``rotate_half`` (pairs i, i + hd/2), which is the model's default pairing,
so q/k need no permutation. Qwen2.5-VL checkpoints come in two layouts: transformers < 4.52
(``model.layers``, ``visual.*`` beside) and ≥ 4.52 (``model.language_model.layers``,
``model.visual.*``); the text weights are taken from either and the vision tower is reported
(logged) and skipped. ``config.json`` may hold the text fields at the top or under
``text_config``, with ``rope_theta`` at the top or in ``rope_parameters``/``rope_scaling`` (where a
VL config's ``mrope_section`` is read too).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from jaxunified.convert.common import (
    CheckpointMismatchError,
    apply_rules,
    attn_out_kernel,
    check_and_build,
    flatten,
    linear_kernel,
    qkv_bias,
    qkv_kernel,
    read_state_dict,
    resolve_config,
    unflatten,
)
from jaxunified.models.lm import DecoderLM, LMConfig, abstract_params
from jaxunified.nn.transformer import stack_layers

log = logging.getLogger(__name__)

_VISION = (r"visual\..*", r"model\.visual\..*")


def config_from_hf(hf: Mapping[str, Any], **overrides) -> LMConfig:
    """An ``LMConfig`` from a Qwen2 / Qwen2.5(-VL) ``config.json`` dict."""
    text = dict(hf.get("text_config") or {})
    merged = {**hf, **text}  # newer VL configs nest the decoder's fields under text_config
    theta = merged.get("rope_theta")
    mrope = {}
    for key in ("rope_parameters", "rope_scaling"):
        params = merged.get(key) or {}
        if theta is None and "rope_theta" in params:
            theta = params["rope_theta"]
        if params.get("mrope_section") and not mrope:  # Qwen2.5-VL's multimodal RoPE split
            mrope = dict(mrope_section=tuple(params["mrope_section"]),
                         mrope_interleaved=bool(params.get("mrope_interleaved", False)))
    if theta is None:
        theta = 10000.0  # transformers' Qwen2Config default
    try:
        cfg = dict(
            vocab_size=merged["vocab_size"], hidden_size=merged["hidden_size"],
            num_layers=merged["num_hidden_layers"], num_heads=merged["num_attention_heads"],
            num_kv_heads=merged.get("num_key_value_heads", merged["num_attention_heads"]),
            mlp_dim=merged["intermediate_size"], rope_theta=float(theta),
            norm_eps=merged.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            **mrope,
        )
    except KeyError as e:
        raise CheckpointMismatchError(f"config.json lacks the Qwen2 field {e.args[0]!r}") from e
    if merged.get("use_sliding_window"):
        log.warning("config.json enables sliding-window attention; the port attends over the full context")
    cfg.update(overrides)
    return LMConfig(**cfg)


def _canonical(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers ≥ 4.52's VL names (``model.language_model.*``) → the plain Qwen2 names."""
    return {re.sub(r"^model\.language_model\.", "model.", k): v for k, v in sd.items()}


def _rules(cfg: LMConfig):
    heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads, "v": cfg.num_kv_heads}
    names = {"q": "query", "k": "key", "v": "value"}

    def layer(m) -> str:
        return f"layers_{m['i']}"

    def proj(m, x):
        base = f"{layer(m)}/attn/{names[m['p']]}"
        if m["leaf"] == "weight":
            return f"{base}/kernel", qkv_kernel(x, heads[m["p"]])
        return f"{base}/bias", qkv_bias(x, heads[m["p"]])

    L = r"model\.layers\.(?P<i>\d+)\."
    return [
        (r"model\.embed_tokens\.weight", lambda m, x: ("embed/embedding", x)),
        (r"model\.norm\.weight", lambda m, x: ("final_norm/scale", x)),
        (r"lm_head\.weight", lambda m, x: None if cfg.tie_embeddings else ("lm_head", x)),
        (L + r"self_attn\.(?P<p>[qkv])_proj\.(?P<leaf>weight|bias)", proj),
        (L + r"self_attn\.o_proj\.weight",
         lambda m, x: (f"{layer(m)}/attn/out/kernel", attn_out_kernel(x, cfg.num_heads))),
        (L + r"(?P<n>input_layernorm|post_attention_layernorm)\.weight",
         lambda m, x: (f"{layer(m)}/{m['n'].replace('_layernorm', '_norm')}/scale", x)),
        (L + r"mlp\.(?P<p>gate|up|down)_proj\.weight",
         lambda m, x: (f"{layer(m)}/mlp/{m['p']}/kernel", linear_kernel(x))),
    ]


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: LMConfig, what: str = "Qwen2 checkpoint", *,
                       token_embedding: bool = True) -> dict:
    """A HF state dict → ``{"params": ...}`` for ``DecoderLM(cfg, token_embedding=...)``."""
    sd = _canonical(sd)
    vision = sorted(k for k in sd if any(re.fullmatch(p, k) for p in _VISION))
    if vision:
        log.info("%s: skipping %d vision-tower tensors (visual.*); the text decoder is loaded", what, len(vision))
    if cfg.tie_embeddings and "lm_head.weight" in sd and "model.embed_tokens.weight" in sd:
        if not np.array_equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
            raise CheckpointMismatchError(f"{what}: tie_word_embeddings is set but lm_head.weight differs from "
                                          "model.embed_tokens.weight; load with tie_embeddings=False")
    flat, unmapped = apply_rules(sd, _rules(cfg), ignore=_VISION)
    params = unflatten(flat)
    if cfg.scan_layers and all(f"layers_{i}" in params for i in range(cfg.num_layers)):
        params = stack_layers(params, cfg.num_layers)
    model = DecoderLM(cfg, token_embedding=token_embedding)
    expected = nn.meta.unbox(abstract_params(model))
    return {"params": check_and_build(flatten(params), expected, unmapped, what)}


def load_hf_qwen2(path, config: Mapping | str | None = None, **overrides) -> tuple[DecoderLM, dict]:
    """``convert.load("hf_qwen2", folder)``: the model and its variables (float32 parameters).

    ``config``: a config.json dict or path (default: the folder's ``config.json``);
    ``overrides``: ``LMConfig`` fields (e.g. ``dtype="bfloat16"``, ``scan_layers=False``).
    """
    hf = resolve_config(config, path, "a Qwen2 config.json", beside_weights=True)
    cfg = config_from_hf(hf, **overrides)
    variables = convert_state_dict(read_state_dict(path), cfg, what=f"Qwen2 checkpoint {path}")
    return DecoderLM(cfg), variables


__all__ = ["config_from_hf", "convert_state_dict", "load_hf_qwen2"]
