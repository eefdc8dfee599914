"""LlamaGen VQ / STAR-VQ checkpoints (PyTorch state dicts) ⇄ ``jaxunified.models.vqgan.VQGAN`` variables.

Key mapping (i = level, j = block; the same for STAR-VQ):

    encoder.conv_blocks.{i}.res.{j}.conv1.weight [O, I, 3, 3]  → params/encoder/conv_blocks_{i}/res_{j}/conv1/kernel [3, 3, I, O]
    *.norm*.weight / .bias                                      → .../scale, .../bias
    *.attn.{j}.{q,k,v,proj_out}.weight [C, C, 1, 1] (and mid.1) → .../attn_{j}/q/kernel [C, C] (Dense)
    quantize.embedding.weight [K, d]                            → params/quantize/embedding
                                                                  (EMA: codebook/quantize/{embedding, embed_sum, cluster_size=1})
    quantize.codebook_used                                      → ignored (a usage-logging buffer)

The config is a variant (``VQ-16``, ``STAR-VQ``, ...) plus overrides, which may use the reference
``ModelArgs``/constructor names (``codebook_embed_dim``, ``codebook_l2_norm``, ``encoder_ch_mult``,
``commit_loss_beta``, ...) or ``VQGANConfig``/``VQConfig`` field names.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from jaxunified.convert.common import (
    CheckpointMismatchError,
    apply_rules,
    check_and_build,
    conv1x1_as_dense,
    conv_kernel,
    flatten,
    read_state_dict,
)
from jaxunified.models.vqgan import VQGAN, VQGANConfig, abstract_variables, get_config

# Reference argument name → ours. ``None``: accepted and ignored (no effect on the weights' math).
_ALIASES: dict[str, str | None] = {
    "codebook_embed_dim": "embed_dim",
    "codebook_l2_norm": "l2_norm",
    "commit_loss_beta": "beta",
    "codebook_show_usage": None,
}
_IGNORED_BUFFERS = (r"quantize\.codebook_used",)
_ATTN_PROJ = r"(?:attn\.\d+|mid\.1)\.(?:q|k|v|proj_out)"
_NORM = r"(?:norm1|norm2|norm|norm_out)"


def config_from_overrides(variant: str, **overrides) -> VQGANConfig:
    """Resolves reference-style constructor arguments into a ``VQGANConfig`` on top of ``variant``."""
    kw: dict[str, Any] = {}
    for k, v in overrides.items():
        if k in ("encoder_ch_mult", "decoder_ch_mult"):
            v = tuple(v)
            if "ch_mult" in kw and kw["ch_mult"] != v:
                raise ValueError(
                    f"encoder_ch_mult and decoder_ch_mult differ ({kw['ch_mult']} vs {v}); "
                    "this VQGAN uses one ch_mult for both"
                )
            kw["ch_mult"] = v
        elif k == "dropout_p":
            if v:
                raise ValueError(f"dropout_p={v} is not supported (the released VQ models use 0.0); pass 0.0")
        elif k in _ALIASES:
            if _ALIASES[k] is not None:
                kw[_ALIASES[k]] = v
        else:
            kw[k] = v
    if "ch_mult" in kw:
        kw["ch_mult"] = tuple(kw["ch_mult"])
    return get_config(variant, **kw)


def _flax_path(torch_prefix: str) -> str:
    """``encoder.conv_blocks.0.res.1.conv1`` → ``encoder/conv_blocks_0/res_1/conv1``."""
    return re.sub(r"\.(\d+)", r"_\1", torch_prefix).replace(".", "/")


def _rules():
    param = lambda m: "params/" + _flax_path(m.group(1))  # noqa: E731

    def conv_w(m, w):
        return param(m) + "/kernel", conv_kernel(w) if w.ndim == 4 else w

    def dense_w(m, w):
        return param(m) + "/kernel", conv1x1_as_dense(w) if w.ndim == 4 else w

    return [
        (r"quantize\.embedding\.weight", lambda m, w: ("params/quantize/embedding", w)),
        (rf"(.+\.{_NORM})\.weight", lambda m, w: (param(m) + "/scale", w)),
        (rf"(.+\.{_ATTN_PROJ})\.weight", dense_w),
        (r"(.+)\.weight", conv_w),
        (r"(.+)\.bias", lambda m, b: (param(m) + "/bias", b)),
    ]


def _to_ema_layout(converted: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A trained codebook as EMA state: counts of 1 make the Laplace-smoothed codebook equal it."""
    out = dict(converted)
    emb = out.pop("params/quantize/embedding", None)
    if emb is not None:
        out["codebook/quantize/embedding"] = emb
        out["codebook/quantize/embed_sum"] = emb
        out["codebook/quantize/cluster_size"] = np.ones(emb.shape[:1], np.float32)
    return out


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: VQGANConfig, what: str = "VQ checkpoint") -> dict:
    """PyTorch VQModel state dict → VQGAN variables (nested numpy), checked against ``cfg``'s shapes."""
    if cfg.vq.simvq:
        raise ValueError(
            "a LlamaGen/STAR VQ checkpoint holds a plain codebook; load it with simvq=False "
            "(SimVQ's frozen basis and map cannot be recovered from it)"
        )
    converted, unmapped = apply_rules(sd, _rules(), ignore=_IGNORED_BUFFERS)
    if cfg.vq.update == "ema":
        converted = _to_ema_layout(converted)
    return check_and_build(converted, abstract_variables(cfg), unmapped, what=what)


def _load(path, variant: str, prefer: str | None, overrides) -> tuple[VQGAN, dict]:
    cfg = config_from_overrides(variant, **overrides)
    sd = read_state_dict(path, prefer=prefer)
    variables = convert_state_dict(sd, cfg, what=f"VQ checkpoint {path} (variant {variant!r})")
    return VQGAN(cfg), variables


def load_llamagen_vq(path, variant: str = "VQ-16", prefer: str | None = None, **overrides):
    """Loads a LlamaGen VQ checkpoint (``.pt`` with model/ema/state_dict, raw ``.pt``, or
    ``.safetensors``). Returns ``(VQGAN module, variables)``; ``prefer`` picks the ``.pt`` wrapper key."""
    return _load(path, variant, prefer, overrides)


def load_star_vq(path, variant: str = "STAR-VQ", prefer: str | None = None, **overrides):
    """Loads STAR's ``VQ-Model.pt`` (a raw state dict) or a ``.safetensors`` copy of it."""
    return _load(path, variant, prefer, overrides)


def _torch_key(flax_key: str) -> str:
    return re.sub(r"_(\d+)(?=/|$)", r".\1", flax_key).replace("/", ".")


def to_torch_state_dict(cfg: VQGANConfig, variables: Mapping) -> dict[str, np.ndarray]:
    """The inverse mapping: VQGAN variables → a PyTorch ``VQModel`` state dict (numpy arrays), with
    a zero ``quantize.codebook_used`` buffer so the reference's strict ``load_state_dict`` accepts it."""
    params = flatten(variables["params"])
    out: dict[str, np.ndarray] = {}
    for k, v in params.items():
        v = np.asarray(v)
        if k.startswith("quantize/"):
            continue
        prefix, leaf = k.rsplit("/", 1)
        tk = _torch_key(prefix)
        if leaf == "kernel":
            w = np.transpose(v, (3, 2, 0, 1)) if v.ndim == 4 else np.transpose(v)[:, :, None, None]
            out[tk + ".weight"] = np.ascontiguousarray(w)
        elif leaf == "scale":
            out[tk + ".weight"] = v
        else:
            out[tk + "." + leaf] = v
    out["quantize.embedding.weight"] = np.asarray(_codebook_rows(cfg, variables))
    k = cfg.vq.codebook_size
    out["quantize.codebook_used"] = np.zeros((65536 if k < 65536 else k + 1,), np.float32)
    return out


def _codebook_rows(cfg: VQGANConfig, variables: Mapping):
    if cfg.vq.update == "ema":
        return variables["codebook"]["quantize"]["embedding"]
    if cfg.vq.simvq:
        # Fold the map into the codebook: the reference has no mapping layer.
        return VQGAN(cfg).apply(variables, method=lambda m: m.quantize._raw_codebook())
    return variables["params"]["quantize"]["embedding"]


__all__ = [
    "CheckpointMismatchError",
    "config_from_overrides",
    "convert_state_dict",
    "load_llamagen_vq",
    "load_star_vq",
    "to_torch_state_dict",
]
