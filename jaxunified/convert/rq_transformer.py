"""kakaobrain RQ-Transformer checkpoints (stage 2) and their RQ-VAE (stage 1) → ``models.depth_head``.

Key mapping (S = body | head; the head's tree sits under ``depth_head``; i = block; H heads):

    cond_emb.weight                          → params/cond_emb/embedding
    tok_emb.weight                           → params/tok_emb/embedding   ([V, E] shared, [Σ V, E] tuple)
    tok_emb.offsets                          → checked against the config's cumsum of vocab sizes, dropped
    {input,head}_mlp.{weight,bias}           → params/{input,head}_mlp/{kernel [in, out], bias}
    pos_emb_{cond,hw} [1, L, E]              → params/pos_emb_{cond,hw} [L, E]
    pos_emb_d [1, D, E]                      → params/depth_head/pos_emb_d [D, E]
    S_transformer.blocks.{i}.ln{1,2}.*       → …/S_transformer/blocks_{i}/ln{1,2}/{scale,bias}
    S_transformer.blocks.{i}.attn.{query,key,value}.* → …/attn/{query,key,value}/{kernel [E, H, hd], bias [H, hd]}
    S_transformer.blocks.{i}.attn.proj.*     → …/attn/out/{kernel [H, hd, E], bias}
    S_transformer.blocks.{i}.mlp.{0,2}.*     → …/mlp/{fc1,fc2}
    classifier.layer_norm.*                  → params/depth_head/classifier/layer_norm/{scale,bias}
    classifier.linear.weight                 → params/depth_head/classifier/linear/kernel
                                               ([V, E] → [E, V]; BatchLinear's [D, E, V] as is)
    cond_classifier.*                        → params/cond_classifier/…   (block_size_cond > 1)

With ``input_emb_vqvae``/``head_emb_vqvae`` the model also needs the RQ-VAE codebook, from the
RQ-VAE checkpoint (``rqvae_path``): ``quantizer.codebooks.{d}.weight`` [V + 1, E_in] repeats
under every depth for a shared codebook, so index 0 is taken (the others must equal it) and the
last row, the padding embedding no code reaches, is dropped → ``constants/rqvae_codebook/embedding``.
Only the codebook is read from that file; its encoder/decoder belong to ``load_rqvae_decoder``.

The config: an ``RQTransformerConfig``, a variant name ("ImageNet-1.4B"), the reference's arch
dict (a stage-2 ``config.yaml``'s top level with ``arch:`` and ``dataset.vocab_size``, or ``arch``
itself) as a dict or a JSON/YAML path, or by default a ``config.json``/``config.yaml`` in the
checkpoint's folder or the ``<weights>.json`` beside it. Overrides are ``RQTransformerConfig`` fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
    resolve_config,
    strip_prefix,
)
from jaxunified.convert.dualtoken import taming_decoder_rule
from jaxunified.models.depth_head import (
    VARIANTS,
    RQTransformer,
    RQTransformerConfig,
    RQVAEDecoder,
    abstract_variables,
)
from jaxunified.models.vqgan import VQGANConfig

# RQTransformerConfig's defaults in the reference (``configs.py``), for keys a config leaves out.
_REF_DEFAULTS = dict(vocab_size_cond=0, block_size_cond=0, input_embed_dim=None, use_padding_emb=False,
                     input_emb_vqvae=False, head_emb_vqvae=False, scaled_head_emb_vqvae=False,
                     cumsum_depth_ctx=False, shared_tok_emb=False, embd_pdrop=0.0, shared_cls_emb=False)
_BLOCK_DEFAULTS = dict(mlp_bias=True, attn_bias=True, attn_pdrop=0.0, resid_pdrop=0.1, gelu="v1")
# Keys of the arch dict that do not shape the network (the trainer's EMA switch, a model type tag).
_META_KEYS = ("type", "ema", "ar_hierarchy")


def _read_config_file(p: pathlib.Path) -> Mapping[str, Any]:
    if p.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(p.read_text())
    return json.loads(p.read_text())


def config_from_reference(ref: Mapping[str, Any], **overrides) -> RQTransformerConfig:
    """``RQTransformerConfig`` from the reference's stage-2 config (whole, or its ``arch``)."""
    arch = dict(ref.get("arch", ref))
    if "vocab_size" not in arch and "vocab_size" in ref.get("dataset", {}):
        arch["vocab_size"] = ref["dataset"]["vocab_size"]
    known = {"vocab_size", "block_size", "embed_dim", "body", "head", *_REF_DEFAULTS, *_META_KEYS}
    unknown = sorted(set(arch) - known)
    if unknown:
        raise ValueError(f"unknown RQ-Transformer arch keys {unknown}; known: {sorted(known)}")
    missing = [k for k in ("vocab_size", "block_size", "embed_dim", "body", "head") if k not in arch]
    if missing:
        raise ValueError(f"the RQ-Transformer arch config lacks {missing}")
    kw: dict[str, Any] = {k: arch.get(k, v) for k, v in _REF_DEFAULTS.items()}
    kw.update(vocab_size=arch["vocab_size"], block_size=tuple(arch["block_size"]), embed_dim=int(arch["embed_dim"]))
    blocks = {}
    for part in ("body", "head"):
        stack = arch[part]
        block = {**_BLOCK_DEFAULTS, **dict(stack.get("block") or {})}
        if block.get("embed_dim", kw["embed_dim"]) != kw["embed_dim"]:
            raise ValueError(f"{part}.block.embed_dim={block['embed_dim']} differs from embed_dim={kw['embed_dim']}")
        kw[f"{part}_layers"] = int(stack["n_layer"])
        kw[f"{part}_heads"] = int(block["n_head"])
        blocks[part] = {k: block[k] for k in _BLOCK_DEFAULTS}
    if blocks["body"] != blocks["head"]:
        raise ValueError(f"body and head blocks differ in {blocks}; one setting for both is supported")
    kw.update(blocks["body"])
    if isinstance(kw["vocab_size"], (list, tuple)):
        kw["vocab_size"] = tuple(int(v) for v in kw["vocab_size"])
    kw.update(overrides)
    return RQTransformerConfig(**kw)


def _resolve(config, path, overrides) -> RQTransformerConfig:
    if isinstance(config, RQTransformerConfig):
        return dataclasses.replace(config, **overrides)
    if isinstance(config, str) and config in VARIANTS:
        return dataclasses.replace(VARIANTS[config], **overrides)
    if isinstance(config, (str, os.PathLike)):
        return config_from_reference(_read_config_file(pathlib.Path(config)), **overrides)
    if config is None:
        p = pathlib.Path(path)
        yaml_cfg = (p if p.is_dir() else p.parent) / "config.yaml"
        if yaml_cfg.is_file() and not ((p if p.is_dir() else p.parent) / "config.json").is_file():
            return config_from_reference(_read_config_file(yaml_cfg), **overrides)
    what = "an RQTransformerConfig, a variant name such as 'ImageNet-1.4B', or the reference's arch dict / JSON / YAML"
    return config_from_reference(resolve_config(config, path, what, beside_weights=True), **overrides)


# ---- transformer state dict -----------------------------------------------------------------------

def _norm(path: str, kind: str) -> str:
    return f"{path}/{'scale' if kind == 'weight' else 'bias'}"


def _rules(cfg: RQTransformerConfig):
    stacks = {"body": ("params/body_transformer", cfg.body_heads),
              "head": ("params/depth_head/head_transformer", cfg.head_heads)}

    def pos(m, x):
        if x.ndim != 3 or x.shape[0] != 1:
            raise CheckpointMismatchError(f"{m.group(0)} has shape {x.shape}, expected [1, L, E]")
        name = m.group(1)
        return ("params/depth_head/pos_emb_d" if name == "d" else f"params/pos_emb_{name}"), x[0]

    def embed(m, x):
        return f"params/{m.group(1)}/embedding", x

    def offsets(m, x):
        if cfg.shared_tok_emb or not np.array_equal(np.asarray(x, np.int64), cfg.tok_offsets):
            raise CheckpointMismatchError(f"tok_emb.offsets {np.asarray(x).tolist()} do not match the config's "
                                          f"per-depth vocab sizes {cfg.vocabs} (expected "
                                          f"{cfg.tok_offsets.tolist()}, shared_tok_emb=False)")
        return None

    def mlp_in(m, x):
        leaf = "kernel" if m.group(2) == "weight" else "bias"
        return f"params/{m.group(1)}/{leaf}", linear_kernel(x) if leaf == "kernel" else x

    def block_norm(m, x):
        root, _ = stacks[m.group(1)]
        return _norm(f"{root}/blocks_{m.group(2)}/{m.group(3)}", m.group(4)), x

    def attn(m, x):
        root, heads = stacks[m.group(1)]
        proj, kind = m.group(3), m.group(4)
        base = f"{root}/blocks_{m.group(2)}/attn"
        if proj == "proj":
            return (f"{base}/out/kernel", attn_out_kernel(x, heads)) if kind == "weight" else (f"{base}/out/bias", x)
        if kind == "weight":
            return f"{base}/{proj}/kernel", qkv_kernel(x, heads)
        return f"{base}/{proj}/bias", qkv_bias(x, heads)

    def mlp(m, x):
        root, _ = stacks[m.group(1)]
        fc = {"0": "fc1", "2": "fc2"}[m.group(3)]
        base = f"{root}/blocks_{m.group(2)}/mlp/{fc}"
        return (f"{base}/kernel", linear_kernel(x)) if m.group(4) == "weight" else (f"{base}/bias", x)

    def classifier(m, x):
        root = "params/depth_head/classifier" if m.group(1) == "classifier" else "params/cond_classifier"
        part, kind = m.group(2), m.group(3)
        if part == "layer_norm":
            return _norm(f"{root}/layer_norm", kind), x
        if kind == "bias":
            return f"{root}/linear/bias", x
        # nn.Linear's [out, in]; BatchLinear already stores [D, in, out].
        return f"{root}/linear/kernel", linear_kernel(x) if x.ndim == 2 else x

    return [
        (r"pos_emb_(cond|hw|d)", pos),
        (r"(cond_emb|tok_emb)\.weight", embed),
        (r"tok_emb\.offsets", offsets),
        (r"(input_mlp|head_mlp)\.(weight|bias)", mlp_in),
        (r"(body|head)_transformer\.blocks\.(\d+)\.(ln1|ln2)\.(weight|bias)", block_norm),
        (r"(body|head)_transformer\.blocks\.(\d+)\.attn\.(query|key|value|proj)\.(weight|bias)", attn),
        (r"(body|head)_transformer\.blocks\.(\d+)\.mlp\.(0|2)\.(weight|bias)", mlp),
        (r"(classifier|cond_classifier)\.(layer_norm|linear)\.(weight|bias)", classifier),
    ]


def codebook_from_rqvae(sd: Mapping[str, np.ndarray], vocab: int, shared: bool = True,
                        what: str = "RQ-VAE checkpoint") -> np.ndarray:
    """The RQ-VAE's codebook without its padding row: [V, E] (shared) or [D, V, E]."""
    sd = strip_prefix(sd, "module.")
    books = {}
    for k, v in sd.items():
        m = re.fullmatch(r"quantizer\.codebooks\.(\d+)\.weight", k)
        if m:
            books[int(m.group(1))] = np.asarray(v, np.float32)
    if not books:
        raise CheckpointMismatchError(f"{what}: no 'quantizer.codebooks.{{d}}.weight' keys; this does not look like "
                                      "a kakaobrain RQ-VAE state dict")
    books = [books[d] for d in sorted(books)]
    for b in books:
        if b.ndim != 2 or b.shape[0] not in (vocab, vocab + 1):
            raise CheckpointMismatchError(f"{what}: codebook of shape {b.shape} for a vocabulary of {vocab} codes "
                                          f"(expected [{vocab} + 1 padding row, E])")
    books = [b[:vocab] for b in books]
    if shared:
        if any(not np.array_equal(b, books[0]) for b in books[1:]):
            raise CheckpointMismatchError(f"{what}: the per-depth codebooks differ, but the config says the RQ-VAE "
                                          "codebook is shared; pass rqvae_shared_codebook=False")
        return books[0]
    return np.stack(books)


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: RQTransformerConfig, codebook: np.ndarray | None = None,
                       what: str = "RQ-Transformer checkpoint") -> dict:
    """An ``RQTransformer`` state dict (+ the RQ-VAE codebook when the config embeds with it) →
    variables checked against ``cfg``'s shapes: every variable filled, every key mapped."""
    sd = strip_prefix(strip_prefix(sd, "module."), "_orig_mod.")
    converted, unmapped = apply_rules(sd, _rules(cfg))
    if cfg.uses_codebook:
        if codebook is None:
            raise ValueError("this RQ-Transformer embeds codes with its RQ-VAE's codebook (input_emb_vqvae/"
                             "head_emb_vqvae): pass rqvae_path= the RQ-VAE checkpoint")
        converted["constants/rqvae_codebook/embedding"] = codebook
    return check_and_build(converted, abstract_variables(cfg), unmapped, what=what)


def load_rq_transformer(path, config: RQTransformerConfig | Mapping | str | None = None,
                        rqvae_path=None, **overrides) -> tuple[RQTransformer, dict]:
    """Loads an official RQ-Transformer checkpoint (``.safetensors``, ``.pt`` or a folder).

    ``rqvae_path``: the RQ-VAE checkpoint whose codebook the model embeds codes with (needed by
    every released config). ``overrides``: ``RQTransformerConfig`` fields (``dtype``, ...).
    """
    cfg = _resolve(config, path, overrides)
    sd = read_state_dict(path, prefer="state_dict")
    codebook = None
    if cfg.uses_codebook and rqvae_path is not None:
        codebook = codebook_from_rqvae(read_state_dict(rqvae_path, prefer="state_dict"), cfg.vocabs[0],
                                       cfg.rqvae_shared_codebook, what=f"RQ-VAE checkpoint {rqvae_path}")
    variables = convert_state_dict(sd, cfg, codebook, what=f"RQ-Transformer checkpoint {path}")
    return RQTransformer(cfg), variables


# ---- RQ-VAE decoder ---------------------------------------------------------------------------------

def rqvae_decoder_config(ref: Mapping[str, Any]) -> tuple[VQGANConfig, int, int, bool]:
    """(decoder config, n_embed, code depth, shared) from the RQ-VAE's arch (``hparams`` + ``ddconfig``)."""
    arch = ref.get("arch", ref)
    hp = arch.get("hparams", arch)
    dd = arch["ddconfig"]
    ch_mult = tuple(int(m) for m in dd["ch_mult"])
    deepest = int(dd["resolution"]) // 2 ** (len(ch_mult) - 1)
    if [int(r) for r in dd.get("attn_resolutions", [])] != [deepest]:
        raise ValueError(f"ddconfig.attn_resolutions={dd.get('attn_resolutions')}: only attention at the deepest "
                         f"level ([{deepest}]) is supported, as in the released RQ-VAEs")
    if list(hp["latent_shape"])[:2] != list(hp["code_shape"])[:2]:
        raise ValueError("an RQ-VAE whose code grid is coarser than its latent grid is not supported")
    cfg = VQGANConfig(ch=int(dd["ch"]), ch_mult=ch_mult, num_res_blocks=int(dd["num_res_blocks"]),
                      z_channels=int(dd["z_channels"]), in_channels=int(dd.get("in_channels", 3)),
                      out_channels=int(dd.get("out_ch", 3)))
    return cfg, int(hp["n_embed"]), int(hp["code_shape"][-1]), bool(hp.get("shared_codebook", True))


def load_rqvae_decoder(path, config: Mapping | str) -> tuple[RQVAEDecoder, dict]:
    """The decoding half of a kakaobrain RQ-VAE (``decode_code``): codes [B, h, w, D] → images.

    ``config``: the RQ-VAE arch (a stage-1 ``config.yaml``'s top level or ``arch``, with ``hparams``
    and ``ddconfig``), as a dict or a JSON/YAML path. The encoder, ``quant_conv`` and the EMA
    statistics are not part of the decoder and are the only keys left unread.
    """
    ref = _read_config_file(pathlib.Path(config)) if isinstance(config, (str, os.PathLike)) else config
    cfg, n_embed, depth, shared = rqvae_decoder_config(ref)
    sd = strip_prefix(read_state_dict(path, prefer="state_dict"), "module.")
    book = codebook_from_rqvae(sd, n_embed, shared, what=f"RQ-VAE checkpoint {path}")
    levels = len(cfg.ch_mult)

    dec = taming_decoder_rule(levels)

    def pqc(m, w):
        if m.group(1) == "weight":
            return "params/post_quant_conv/kernel", conv_kernel(w)
        return "params/post_quant_conv/bias", w

    rules = [(r"decoder\.(.+)\.(weight|bias)", dec), (r"post_quant_conv\.(weight|bias)", pqc)]
    not_decoder = r"(encoder\..*|quant_conv\..*|quantizer\..*)"
    mapped, unmapped = apply_rules(sd, rules, ignore=[not_decoder])
    mapped["constants/codebook"] = book
    model = RQVAEDecoder(cfg, book.shape)
    codes = jnp.zeros((1, 1, 1, depth), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), codes)))
    return model, check_and_build(mapped, shapes, unmapped, what=f"RQ-VAE decoder {path}")


__all__ = ["config_from_reference", "convert_state_dict", "codebook_from_rqvae", "load_rq_transformer",
           "rqvae_decoder_config", "load_rqvae_decoder"]
