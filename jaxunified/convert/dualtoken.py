"""Official DualToken (``RQVAESiglipModel``) checkpoints → ``models.dualtoken.DualToken`` variables.

Key mapping (X = prequant_{pix,shortcut,sem} | postquant_{pix,sem}; Y = pix | sem; L = levels):

    siglip_model.*                          → params/siglip/… (``convert.siglip.convert_state_dict``)
    X.norm{1,2,3}.*, X.mlp.norm.*           → params/X/norm{1,2,3}, params/X/mlp/norm ({scale, bias})
    X.proj.*, X.attn.proj.*, X.mlp.w{0,1,2}.* → params/X/…/{kernel [in, out], bias}
    X.attn.qkv.weight [3·W, in]             → params/X/attn/qkv/kernel [in, 3, heads, W/heads]
    X.attn.{q,v}_bias [W]                   → params/X/attn/{q,v}_bias [heads, W/heads]
    X.attn.zero_k_bias                      → dropped (a buffer of zeros)
    quantizer_Y.codebooks.{d}.weight [K+1, d] → codebook/quantizer_Y/embedding [K, d] (the padding row
                                              is never searched); cluster_size_ema → cluster_size,
                                              embed_ema → embed_sum. A shared codebook repeats
                                              under every d: index 0 is taken (the others must equal it).
    post_quant_conv.*                       → params/post_quant_conv/…
    decoder.mid.{block_1, attn_1, block_2}  → params/decoder/mid_{0,1,2}
    decoder.up.{i}.block.{j} / attn.{j} / upsample.conv
                                            → params/decoder/conv_blocks_{L-1-i}/res_{j} / attn_{j} / upsample/conv
                                              (taming numbers levels shallow → deep; ours deep → shallow)

The config comes from the reference constructor arguments (``layer_recon``, ``vq_pix``, ``ddconfig``,
…; the released ``config.json`` nests them under ``rqvaesiglip``) plus the embedded SigLIP's HF
config (``siglip`` key, the ``siglip=`` argument, or the known ``pretrained_model`` names).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
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
    linear_kernel,
    read_state_dict,
    resolve_config,
)
from jaxunified.convert.siglip import config_from_hf, convert_state_dict as convert_siglip
from jaxunified.models import siglip as siglip_lib
from jaxunified.models.dualtoken import DualToken, DualTokenConfig, abstract_variables
from jaxunified.models.vqgan import VQGANConfig
from jaxunified.quant.rq import RQConfig

# ``pretrained_model`` basenames of the released configs → (our SigLIP variant, resolution).
KNOWN_TOWERS = {
    "siglip2-so400m-patch14-384": ("siglip2-So400m/14", 384),
    "siglip-so400m-patch14-384": ("So400m/14", 384),
    "siglip2-so400m-patch16-256": ("So400m/16", 256),
    "siglip2-so400m-patch16-384": ("So400m/16", 384),
    "siglip-large-patch16-256": ("L/16", 256),
    "siglip-large-patch16-384": ("L/16", 384),
}
_PROJ = r"(prequant_pix|prequant_shortcut|prequant_sem|postquant_pix|postquant_sem)"
_SCHEDULES = {"rq": "per_depth", "rq_ema": "per_step"}


def _rq_config(vq: Mapping[str, Any], what: str) -> RQConfig:
    kind = vq.get("bottleneck_type", "rq")
    if kind not in _SCHEDULES:
        raise ValueError(f"{what}.bottleneck_type={kind!r} is not supported; use one of {sorted(_SCHEDULES)}")
    code, latent = list(vq["code_shape"]), list(vq.get("latent_shape", vq["code_shape"]))
    if code[:-1] != latent[:-1]:
        raise ValueError(
            f"{what}: code_shape {code} is coarser than latent_shape {latent}; rq-vae's divisor reshape "
            "is not part of DualToken and is not supported"
        )
    return RQConfig(
        codebook_size=int(vq["n_embed"]),
        embed_dim=int(vq["embed_dim"]),
        depth=int(code[-1]),
        shared_codebook=bool(vq.get("shared_codebook", True)),
        ema_schedule=_SCHEDULES[kind],
        ema_decay=float(vq.get("decay", 0.99)),
        restart=bool(vq.get("restart_unused_codes", True)),
    )


def _decoder_config(dd: Mapping[str, Any]) -> VQGANConfig:
    ch_mult = tuple(int(m) for m in dd["ch_mult"])
    deepest = int(dd["resolution"]) // 2 ** (len(ch_mult) - 1)
    if [int(r) for r in dd.get("attn_resolutions", [])] != [deepest]:
        raise ValueError(
            f"ddconfig.attn_resolutions={dd.get('attn_resolutions')}: only attention at the deepest "
            f"level ([{deepest}] for resolution {dd['resolution']}) is supported, as in the released models"
        )
    if not dd.get("resamp_with_conv", True) or dd.get("give_pre_end", False):
        raise ValueError("ddconfig with resamp_with_conv=False or give_pre_end=True is not supported")
    return VQGANConfig(
        ch=int(dd["ch"]),
        ch_mult=ch_mult,
        num_res_blocks=int(dd["num_res_blocks"]),
        z_channels=int(dd["decoder_in_channels"]),
        out_channels=int(dd.get("out_ch", 3)),
    )


def _siglip_config(ref: Mapping[str, Any], siglip, with_text: bool, vision: Mapping, text: Mapping):
    over = dict(vision=dict(vision, scan=False), text=dict(text))
    if isinstance(siglip, siglip_lib.SigLIPConfig):
        cfg = siglip
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **over["vision"]))
        if cfg.text is not None:
            cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **over["text"]))
    else:
        if isinstance(siglip, (str, pathlib.Path)) and str(siglip).endswith(".json"):
            siglip = json.loads(pathlib.Path(siglip).read_text())
        if siglip is None:
            siglip = ref.get("siglip")
        if siglip is None:
            name = pathlib.PurePath(str(ref.get("pretrained_model", ""))).name
            if name not in KNOWN_TOWERS:
                raise ValueError(
                    f"cannot tell the SigLIP tower of this DualToken config (pretrained_model={name!r}); pass "
                    f"siglip= an HF SiglipConfig dict, its config.json path, or a SigLIPConfig; known names: "
                    f"{', '.join(KNOWN_TOWERS)}"
                )
            siglip = KNOWN_TOWERS[name]
        if isinstance(siglip, tuple):
            variant, res = siglip
            cfg = siglip_lib.get_config(variant, image_size=res, **over)
        else:
            cfg = config_from_hf(siglip, **over)
    if not with_text:
        cfg = dataclasses.replace(cfg, text=None)
    return cfg


def config_from_reference(
    ref: Mapping[str, Any], siglip=None, *, with_text: bool = True, vision: Mapping | None = None,
    text: Mapping | None = None, **overrides,
) -> DualTokenConfig:
    """``DualTokenConfig`` from the reference constructor arguments (or a released ``config.json``).

    ``siglip``: HF SiglipConfig dict / its path / a ``SigLIPConfig``; default ``ref["siglip"]`` or
    the tower named by ``pretrained_model``. ``vision``/``text``: tower field overrides
    (``remat``, ``dtype``); ``with_text=False`` drops the text tower; other keywords override
    ``DualTokenConfig`` fields.
    """
    ref = ref.get("rqvaesiglip", ref)
    scfg = _siglip_config(ref, siglip, with_text, vision or {}, text or {})
    if ref.get("hidden_size") not in (None, scfg.vision.width):
        raise ValueError(f"hidden_size={ref['hidden_size']} differs from the SigLIP width {scfg.vision.width}")
    shortcut = ref.get("layer_shortcut")
    kw: dict[str, Any] = dict(
        siglip=scfg,
        layer_recon=int(ref["layer_recon"]),
        layer_sem=int(ref["layer_sem"]),
        layer_shortcut=None if shortcut is None else int(shortcut),
        weight_shortcut=float(ref.get("weight_shortcut") or 0.0),
        pix_rq=_rq_config(ref["vq_pix"], "vq_pix"),
        sem_rq=_rq_config(ref["vq_sem"], "vq_sem"),
        decoder=_decoder_config(ref["ddconfig"]),
        decoder_latent_shape=ref.get("decoder_latent_shape"),
    )
    kw.update(overrides)
    return DualTokenConfig(**kw)


# ---- state dict --------------------------------------------------------------------------------


def _find_prefix(sd: Mapping[str, np.ndarray]) -> str:
    """Wrappers nest the model (``rqvaesiglip.``, ``vision_tower.rqvaesiglip.``): find its prefix."""
    anchor = "prequant_sem.proj.weight"
    for k in sd:
        if k.endswith(anchor):
            return k[: -len(anchor)]
    raise CheckpointMismatchError(f"no '{anchor}' key: this does not look like a DualToken RQVAESiglipModel state dict")


def _norm(path: str, kind: str) -> str:
    return f"{path}/{'scale' if kind == 'weight' else 'bias'}"


def _decoder_path(rest: str, levels: int) -> str:
    rest = re.sub(r"^mid\.block_1", "mid_0", rest)
    rest = re.sub(r"^mid\.attn_1", "mid_1", rest)
    rest = re.sub(r"^mid\.block_2", "mid_2", rest)
    m = re.match(r"^up\.(\d+)\.(block|attn)\.(\d+)(.*)$", rest)
    if m:
        kind = "res" if m.group(2) == "block" else "attn"
        rest = f"conv_blocks_{levels - 1 - int(m.group(1))}.{kind}_{m.group(3)}{m.group(4)}"
    m = re.match(r"^up\.(\d+)\.upsample(.*)$", rest)
    if m:
        rest = f"conv_blocks_{levels - 1 - int(m.group(1))}.upsample{m.group(2)}"
    return rest.replace(".", "/")


def taming_decoder_rule(levels: int):
    """The rule for a taming / kakaobrain VQGAN decoder's ``decoder.(rest).(weight|bias)`` keys →
    ``params/decoder/...`` of ``models.vqgan``'s decoder (RQ-VAE and DualToken share it)."""

    def dec(m, w):
        rest, kind = m.group(1), m.group(2)
        path = "params/decoder/" + _decoder_path(rest, levels)
        if re.search(r"(norm\d?|norm_out)$", rest):
            return _norm(path, kind), w
        if kind == "bias":
            return path + "/bias", w
        if re.search(r"(mid_1|attn_\d+)/(q|k|v|proj_out)$", path):
            return path + "/kernel", conv1x1_as_dense(w)
        return path + "/kernel", conv_kernel(w)

    return dec


def _rules(cfg: DualTokenConfig):
    levels = len(cfg.decoder.ch_mult)
    width = cfg.siglip.vision.width

    def heads(proj: str) -> int:
        code = cfg.pix_rq.embed_dim if proj.endswith(("pix", "shortcut")) else cfg.sem_rq.embed_dim
        return width // code

    def leaf(kind: str) -> str:
        return {"weight": "kernel", "bias": "bias"}[kind]

    norm = _norm

    def proj_qkv(m, w):
        h = heads(m.group(1))
        return f"params/{m.group(1)}/attn/qkv/kernel", np.transpose(w).reshape(w.shape[1], 3, h, w.shape[0] // (3 * h))

    def proj_bias(m, b):
        return f"params/{m.group(1)}/attn/{m.group(2)}_bias", b.reshape(heads(m.group(1)), -1)

    def zero_k(m, b):
        if np.any(b != 0):
            raise CheckpointMismatchError(f"{m.group(0)} is not zero; the reference never uses a key bias")
        return None

    def dense(m, w):
        path = f"params/{m.group(1)}/{m.group(2).replace('.', '/')}/{leaf(m.group(3))}"
        return path, linear_kernel(w) if m.group(3) == "weight" else w

    def proj_norm(m, w):
        return norm(f"params/{m.group(1)}/{m.group(2).replace('.', '/')}", m.group(3)), w

    def pq(m, w):
        name, kind = m.group(1), m.group(2)
        if name.startswith("norm"):
            return norm(f"params/post_quant_conv/{name}", kind), w
        return f"params/post_quant_conv/{name}/{leaf(kind)}", conv_kernel(w) if kind == "weight" else w

    dec = taming_decoder_rule(levels)

    return [
        (rf"{_PROJ}\.attn\.qkv\.weight", proj_qkv),
        (rf"{_PROJ}\.attn\.(q|v)_bias", proj_bias),
        (rf"{_PROJ}\.attn\.zero_k_bias", zero_k),
        (rf"{_PROJ}\.(norm[123]|mlp\.norm)\.(weight|bias)", proj_norm),
        (rf"{_PROJ}\.(proj|attn\.proj|mlp\.w[012])\.(weight|bias)", dense),
        (r"post_quant_conv\.(norm1|norm2|conv1|conv2|nin_shortcut)\.(weight|bias)", pq),
        (r"decoder\.(.+)\.(weight|bias)", dec),
    ]


def _codebooks(sd: Mapping[str, np.ndarray], cfg: DualTokenConfig) -> tuple[dict[str, np.ndarray], set[str]]:
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for branch, rq in (("pix", cfg.pix_rq), ("sem", cfg.sem_rq)):
        name = f"quantizer_{branch}"
        idx = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(rf"{name}\.codebooks\.(\d+)\.weight", k))})
        if not idx:
            continue
        per = {}
        for field, ours in (("weight", "embedding"), ("cluster_size_ema", "cluster_size"), ("embed_ema", "embed_sum")):
            arrs = []
            for d in idx:
                key = f"{name}.codebooks.{d}.{field}"
                if key in sd:
                    used.add(key)
                    a = np.asarray(sd[key], np.float32)
                    arrs.append(a[: rq.codebook_size] if field == "weight" else a)
            if arrs:
                per[ours] = arrs
        if rq.shared_codebook:
            for ours, arrs in per.items():
                if any(not np.array_equal(a, arrs[0]) for a in arrs[1:]):
                    raise CheckpointMismatchError(
                        f"{name}: codebooks differ across depths but the config says shared_codebook=True"
                    )
            per = {k: v[0] for k, v in per.items()}
        else:
            per = {k: np.stack(v) for k, v in per.items()}
        if rq.update == "ema":
            for ours, a in per.items():
                out[f"codebook/{name}/{ours}"] = a
        elif "embedding" in per:
            out[f"params/{name}/embedding"] = per["embedding"]
    return out, used


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: DualTokenConfig, what: str = "DualToken checkpoint") -> dict:
    """An ``RQVAESiglipModel`` state dict (any wrapper prefix) → DualToken variables, checked
    against ``cfg``'s shapes: every model variable must be filled and every key mapped."""
    prefix = _find_prefix(sd)
    foreign = sorted(k for k in sd if not k.startswith(prefix))
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    # The SigLIP converter only reads ``siglip_model.*`` keys and reports its own unmapped ones.
    sig_sd = {k: v for k, v in sd.items() if k.startswith("siglip_model.")}
    if cfg.siglip.text is None:
        sig_sd = {k: v for k, v in sig_sd.items() if not k.startswith("siglip_model.text_model.")}
    siglip = convert_siglip(sig_sd, cfg.siglip, prefix="siglip_model.", what=what)
    converted = {f"params/siglip/{k}": v for k, v in flatten(siglip["params"]).items()}
    rest = {k: v for k, v in sd.items() if not k.startswith("siglip_model.")}
    books, used = _codebooks(rest, cfg)
    converted.update(books)
    mapped, unmapped = apply_rules({k: v for k, v in rest.items() if k not in used}, _rules(cfg))
    converted.update(mapped)
    return check_and_build(converted, abstract_variables(cfg), [*foreign, *unmapped], what=what)


def load_dualtoken(path, config: Mapping | str | None = None, **overrides) -> tuple[DualToken, dict]:
    """Loads an official DualToken tokenizer checkpoint (file or folder).

    ``config``: the reference constructor arguments (dict or JSON path); default ``config.json`` in
    the folder or a ``.json`` beside the weights file. ``overrides`` go to ``config_from_reference``
    (``siglip=…``, ``with_text=False``, ``vision=dict(remat=True)``, DualTokenConfig fields).
    """
    p = pathlib.Path(path)
    ref = resolve_config(config, p, "the RQVAESiglip constructor arguments as a dict or JSON path",
                         beside_weights=True)
    cfg = config_from_reference(ref, **overrides)
    variables = convert_state_dict(read_state_dict(p), cfg, what=f"DualToken checkpoint {p}")
    return DualToken(cfg), variables


__all__ = ["KNOWN_TOWERS", "config_from_reference", "convert_state_dict", "load_dualtoken"]
