"""LlamaGen GPT checkpoints (``c2i_*.pt``, ``t2i_*.pt``, or ``.safetensors``) → ``models.llamagen_gpt``.

Released ``.pt`` files hold the state dict under ``model`` (DDP; ``module``/raw for DeepSpeed/FSDP,
all unwrapped by ``read_state_dict``); ``torch.compile``'s ``_orig_mod.`` prefix is stripped.
Key mapping (i = layer; H heads, K kv heads, hd = dim / H):

    tok_embeddings.weight                   → params/tok_embeddings/embedding
    cls_embedding.embedding_table.weight    → params/cls_embedding/embedding_table/embedding   (c2i)
    cls_embedding.cap_proj.fc{1,2}.weight   → params/cls_embedding/fc{1,2}/kernel              (t2i)
    cls_embedding.uncond_embedding          → constants/cls_embedding/uncond_embedding         (t2i buffer)
    layers.{i}.attention.wqkv.weight        → params/layers_{i}/attn/{query,key,value}/kernel
                                              (rows [H·hd | K·hd | K·hd] split, each → [D, heads, hd])
    layers.{i}.attention.wo.weight          → params/layers_{i}/attn/out/kernel    [H, hd, D]
    layers.{i}.feed_forward.w1/w3/w2.weight → params/layers_{i}/mlp/gate/up/down/kernel
    layers.{i}.attention_norm.weight        → params/layers_{i}/input_norm/scale
    layers.{i}.ffn_norm.weight              → params/layers_{i}/post_attention_norm/scale
    norm.weight                             → params/norm/scale
    output.weight                           → params/output   [D, V]

With ``scan_layers`` the ``layers_{i}`` trees are stacked into one ``layers`` tree. LlamaGen
rotates interleaved pairs (2i, 2i + 1) of the per-head q/k dims, which is the model's
``rope_interleaved=True``: the q/k rows need no permutation (the golden parity test checks it).
Only weightless buffers are dropped (``freqs_cis``, ``causal_mask``, KV caches); any other key
the mapping does not know is reported in the one ``CheckpointMismatchError``.

The config: a ``GPTConfig``, a dict or JSON file in LlamaGen's ``ModelArgs`` names (``model_type``
"t2i" means ``caption_dim`` 2048 unless given; ``gpt_model`` names a base variant), a variant name
("GPT-XL"), or by default the ``config.json`` / ``<weights>.json`` beside the weights. When the
config does not give ``class_dropout_prob``, the class table's row count decides it: ``num_classes``
rows means the model was built without label dropout (no null row, no CFG).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from jaxunified.convert.common import (
    CheckpointMismatchError,
    apply_rules,
    attn_out_kernel,
    check_and_build,
    linear_kernel,
    qkv_kernel,
    read_state_dict,
    resolve_config,
    strip_prefix,
)
from jaxunified.models.llamagen_gpt import VARIANTS, GPTConfig, LlamaGenGPT, abstract_variables, variant
from jaxunified.nn.transformer import stack_layers

log = logging.getLogger(__name__)

# ModelArgs fields with no effect on the weights or the eval forward; read and dropped.
_REFERENCE_ONLY = {"note", "initializer_range", "attn_dropout_p", "max_batch_size", "max_seq_len", "model_type",
                   "gpt_model", "drop_path_rate"}
# Buffers that hold no learned values (recomputed by the model / created by the sampler).
_WEIGHTLESS = (r"freqs_cis", r"causal_mask", r"layers\.\d+\.attention\.kv_cache\.[kv]_cache")


def config_from_dict(d: Mapping[str, Any], **overrides) -> GPTConfig:
    """A ``GPTConfig`` from LlamaGen ``ModelArgs``-style fields (+ overrides)."""
    d = {**d, **overrides}
    base = VARIANTS[d["gpt_model"]] if d.get("gpt_model") in VARIANTS else GPTConfig()
    if d.get("drop_path_rate"):
        log.warning("drop_path_rate %s: stochastic depth is not implemented (eval outputs are unaffected)",
                    d["drop_path_rate"])
    if d.get("attn_dropout_p"):
        log.warning("attn_dropout_p %s: attention-weight dropout is not implemented", d["attn_dropout_p"])
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(d) - fields - _REFERENCE_ONLY)
    if unknown:
        raise ValueError(f"unknown LlamaGen GPT config keys {unknown}; known: {sorted(fields)}")
    cfg = {k: v for k, v in d.items() if k in fields}
    model_type = d.get("model_type")
    if model_type not in (None, "c2i", "t2i"):
        raise ValueError(f"model_type must be 'c2i' or 't2i', got {model_type!r}")
    if model_type == "c2i":
        cfg["caption_dim"] = 0
    elif model_type == "t2i" and not cfg.get("caption_dim"):
        cfg["caption_dim"] = 2048  # ModelArgs' default (FLAN-T5-XL)
    return dataclasses.replace(base, **cfg)


def _resolve(config, path, overrides, sd) -> GPTConfig:
    if isinstance(config, GPTConfig):
        return dataclasses.replace(config, **overrides)
    if isinstance(config, str) and config in VARIANTS and not os.path.exists(config):
        return variant(config, **overrides)
    d = dict(resolve_config(config, path, "a dict or JSON of LlamaGen ModelArgs, or a variant name such as "
                            f"{next(iter(VARIANTS))!r}", beside_weights=True))
    cfg = config_from_dict(d, **overrides)
    table = sd.get("cls_embedding.embedding_table.weight")
    if ("class_dropout_prob" not in d and "class_dropout_prob" not in overrides and table is not None
            and cfg.caption_dim == 0 and table.shape[0] == cfg.num_classes and cfg.class_dropout_prob > 0):
        log.info("class table has %d rows = num_classes: built without label dropout, no null class",
                 table.shape[0])
        cfg = dataclasses.replace(cfg, class_dropout_prob=0.0)
    return cfg


def _split_wqkv(sd: Mapping[str, np.ndarray], cfg: GPTConfig) -> dict[str, np.ndarray]:
    """Each fused ``wqkv`` [(H + 2K)·hd, D] → ``wq``/``wk``/``wv`` row blocks (a split, no reordering)."""
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {}
    for k, x in sd.items():
        m = re.fullmatch(r"(layers\.\d+\.attention\.)wqkv\.weight", k)
        if m is None:
            out[k] = x
            continue
        if x.shape[0] != q_rows + 2 * kv_rows:
            raise CheckpointMismatchError(
                f"{k}: {x.shape[0]} rows, but n_head={cfg.n_head}, n_kv_head={cfg.kv_heads}, head_dim="
                f"{cfg.head_dim} need {q_rows + 2 * kv_rows}. Fix: pass the config that matches the checkpoint")
        for name, part in zip(("wq", "wk", "wv"), np.split(np.asarray(x), [q_rows, q_rows + kv_rows], axis=0)):
            out[f"{m[1]}{name}.weight"] = part
    return out


def _rules(cfg: GPTConfig):
    heads = {"q": ("query", cfg.n_head), "k": ("key", cfg.kv_heads), "v": ("value", cfg.kv_heads)}
    mlp = {"w1": "gate", "w3": "up", "w2": "down"}
    norms = {"attention_norm": "input_norm", "ffn_norm": "post_attention_norm"}
    L = r"layers\.(?P<i>\d+)\."

    def proj(m, x):
        name, n = heads[m["p"]]
        return f"params/layers_{m['i']}/attn/{name}/kernel", qkv_kernel(x, n)

    return [
        (r"tok_embeddings\.weight", lambda m, x: ("params/tok_embeddings/embedding", x)),
        (r"cls_embedding\.embedding_table\.weight",
         lambda m, x: ("params/cls_embedding/embedding_table/embedding", x)),
        (r"cls_embedding\.cap_proj\.(?P<f>fc[12])\.weight",
         lambda m, x: (f"params/cls_embedding/{m['f']}/kernel", linear_kernel(x))),
        (r"cls_embedding\.uncond_embedding", lambda m, x: ("constants/cls_embedding/uncond_embedding", x)),
        (L + r"attention\.w(?P<p>[qkv])\.weight", proj),
        (L + r"attention\.wo\.weight",
         lambda m, x: (f"params/layers_{m['i']}/attn/out/kernel", attn_out_kernel(x, cfg.n_head))),
        (L + r"feed_forward\.(?P<w>w[123])\.weight",
         lambda m, x: (f"params/layers_{m['i']}/mlp/{mlp[m['w']]}/kernel", linear_kernel(x))),
        (L + r"(?P<n>attention_norm|ffn_norm)\.weight",
         lambda m, x: (f"params/layers_{m['i']}/{norms[m['n']]}/scale", x)),
        (r"norm\.weight", lambda m, x: ("params/norm/scale", x)),
        (r"output\.weight", lambda m, x: ("params/output", linear_kernel(x))),
    ]


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: GPTConfig, what: str = "LlamaGen GPT checkpoint") -> dict:
    """A LlamaGen state dict → ``{"params": ..., ("constants": ...)}`` for ``LlamaGenGPT(cfg)``."""
    sd = _split_wqkv(strip_prefix(sd, "_orig_mod."), cfg)
    flat, unmapped = apply_rules(sd, _rules(cfg), ignore=_WEIGHTLESS)
    # Checked against the unrolled layout so a bad key is named by its layer, then stacked.
    expected = nn.meta.unbox(abstract_variables(LlamaGenGPT(dataclasses.replace(cfg, scan_layers=False))))
    variables = check_and_build(flat, expected, unmapped, what)
    if cfg.scan_layers:
        variables["params"] = stack_layers(variables["params"], cfg.n_layer)
    return variables


def load_llamagen_gpt(path, config: GPTConfig | Mapping | str | None = None, **overrides) -> tuple[LlamaGenGPT, dict]:
    """``convert.load("llamagen_gpt", path)``: the model and its variables (float32).

    ``config``: see the module docstring; ``overrides``: ``GPTConfig`` fields (e.g.
    ``dtype="bfloat16"``, ``scan_layers=True``, ``cls_token_num=120``).
    """
    sd = read_state_dict(path, prefer="model")
    cfg = _resolve(config, path, overrides, sd)
    variables = convert_state_dict(sd, cfg, what=f"LlamaGen GPT checkpoint {path}")
    return LlamaGenGPT(cfg), variables


__all__ = ["config_from_dict", "convert_state_dict", "load_llamagen_gpt"]
