"""Frozen sub-models a task takes from a config block: a finished run, a released checkpoint, or
(smoke tests) a random init. One place for the dispatch, so every task reads ``tokenizer`` /
``teacher`` / ``text_encoder`` blocks the same way and no task imports another.

A block has ``kind``: ``"workdir"`` (``workdir`` + optional ``config`` spec: the run's own
exported module through ``runs.load_run``), a ``convert`` kind (``path`` + ``overrides``), or
``"random"`` (``variant`` + ``overrides``, ``seed``).

Inside ``train.planning.shapes_only`` (ahead-of-time plans, ``bench step``) no file is read: each
part is built from its block's shape alone — a ``workdir`` run's saved ``config.json`` when the run
exists, else the block's ``preset`` (the config that trains that run), else its ``variant`` +
``overrides`` (for a checkpoint kind: the converter's default variant, e.g. ``VQ-16`` for
``llamagen_vq``, or ``overrides.variant``) — and its variables are ``jax.ShapeDtypeStruct``s. Tasks
turn them into arrays only in traced code (``fill_boxes``, ``planning.materialize``), so a 7B frozen
base costs no memory.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp

from jaxunified import convert
from jaxunified.data import shapes_chat
from jaxunified.data.text import make_tokenizer
from jaxunified.models import dualtoken as dualtoken_lib
from jaxunified.models import lm as lm_lib
from jaxunified.models import siglip as siglip_lib
from jaxunified.models import star as star_lib
from jaxunified.models import toklip as toklip_lib
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.train import runs
from jaxunified.train.planning import as_shapes, is_shapes_only
from jaxunified.train.runs import load_run
from jaxunified.train.task import host_variables, kwargs

VQ_KINDS = ("workdir", "llamagen_vq", "star_vq", "ibq", "random")
SIGLIP_KINDS = ("workdir", "hf_siglip", "open_clip", "random")
LM_KINDS = ("workdir", "hf_qwen2", "star", "random")  # a decoder LM: an mllm/LM run, HF Qwen2, a STAR checkpoint's base

def text_tokenizer(text_cfg):
    """``data.text``'s tokenizer. When planning (shapes only) and the tokenizer file is not on this
    machine, a byte tokenizer of the same ``max_len`` stands in: the step only sees [B, max_len] ids."""
    path = str(text_cfg.get("path") or "")
    here = path.startswith("builtin:") or (path and pathlib.Path(path).expanduser().exists())
    if is_shapes_only() and text_cfg.get("tokenizer", "byte") not in ("byte", None, "") and not here:
        return make_tokenizer(max_len=int(text_cfg.get("max_len") or 64))
    return make_tokenizer(text_cfg)


def run_model_config(tc, fallback):
    """The model config of block ``tc``'s ``workdir`` run (its saved config, no checkpoint read); when
    there is no such run yet (planning a chain whose earlier stages have not run), that of the
    block's ``preset`` (the config that trains the run), else ``fallback()``."""
    workdir, config = tc.get("workdir") or "", tc.get("config") or None
    if config or not is_shapes_only() or (pathlib.Path(workdir).expanduser() / "config.json").exists():
        return runs.model_config(workdir, config)
    if tc.get("preset"):
        return runs.model_config(None, tc.get("preset"))
    return fallback()


def _variant_overrides(tc, default: str) -> tuple[str, dict]:
    over = kwargs(tc.get("overrides"))
    over.pop("prefer", None)
    return over.pop("variant", default), over


def _vq_shapes(tc) -> tuple[vqgan_lib.VQGAN, dict]:
    from jaxunified.convert import vq as vq_convert
    from jaxunified.models.toklip import IBQ_262144

    kind = tc.kind
    if kind == "workdir":
        cfg = run_model_config(tc, lambda: vqgan_lib.get_config(tc.variant, **kwargs(tc.get("overrides"))))
    elif kind in ("llamagen_vq", "star_vq"):
        variant, over = _variant_overrides(tc, "VQ-16" if kind == "llamagen_vq" else "STAR-VQ")
        cfg = vq_convert.config_from_overrides(variant, **over)
    elif kind == "ibq":
        cfg = IBQ_262144
    elif kind == "random":
        cfg = vqgan_lib.get_config(tc.variant, **kwargs(tc.get("overrides")))
    else:
        raise ValueError(f"tokenizer.kind={kind!r}; use one of {', '.join(VQ_KINDS)}")
    return vqgan_lib.VQGAN(cfg), as_shapes(vqgan_lib.abstract_variables(cfg))


def load_vq(tc) -> tuple[vqgan_lib.VQGAN, dict]:
    """The frozen VQ tokenizer of block ``tc``: (VQGAN module, its variables)."""
    kind = tc.kind
    if is_shapes_only():
        return _vq_shapes(tc)
    if kind == "workdir":
        _, module, variables = load_run(tc.workdir, tc.get("config") or None)
    elif kind in ("llamagen_vq", "star_vq"):
        module, variables = convert.load(kind, tc.path, **kwargs(tc.get("overrides")))
    elif kind == "ibq":
        module, variables = convert.load("ibq", tc.path)
    elif kind == "random":  # smoke tests only: an untrained tokenizer
        module = vqgan_lib.VQGAN(vqgan_lib.get_config(tc.variant, **kwargs(tc.get("overrides"))))
        f = module.cfg.downsample_factor
        variables = host_variables(module, jax.random.key(int(tc.get("seed", 0))), jnp.zeros((1, f, f, 3)))
    else:
        raise ValueError(f"tokenizer.kind={kind!r}; use one of {', '.join(VQ_KINDS)}")
    if not isinstance(module, vqgan_lib.VQGAN):
        raise ValueError(f"the tokenizer block names a {type(module).__name__}, not a VQGAN")
    return module, variables


def load_siglip(tc) -> tuple[siglip_lib.SigLIP, dict]:
    """The frozen SigLIP of block ``tc`` (a ``siglip`` run, an HF SiglipModel folder, an open_clip
    SigLIP ``.pt`` with ``variant``/``image_size``, or random): (SigLIP module, variables)."""
    kind, towers = tc.kind, dict(vision=kwargs(tc.get("vision")), text=kwargs(tc.get("text")))
    if is_shapes_only():
        if kind not in SIGLIP_KINDS:
            raise ValueError(f"teacher/text_encoder kind={kind!r}; use one of {', '.join(SIGLIP_KINDS)}")

        def from_variant():
            return siglip_lib.get_config(tc.variant, image_size=tc.get("image_size") or None, **towers)

        cfg = run_model_config(tc, from_variant) if kind == "workdir" else from_variant()
        return siglip_lib.SigLIP(cfg), as_shapes(siglip_lib.abstract_variables(cfg))
    if kind == "workdir":
        _, module, variables = load_run(tc.workdir, tc.get("config") or None)
    elif kind == "hf_siglip":
        module, variables = convert.load("hf_siglip", tc.path, **towers)
    elif kind == "open_clip":
        module, variables = convert.load("open_clip_siglip", tc.path, name=tc.variant,
                                         image_size=tc.get("image_size") or None, **towers)
    elif kind == "random":  # smoke tests only: an untrained model
        module = siglip_lib.SigLIP(siglip_lib.get_config(tc.variant, **towers))
        r, n = module.cfg.vision.image_size, module.cfg.text.max_len
        variables = host_variables(module, jax.random.key(int(tc.get("seed", 0))), jnp.zeros((1, r, r, 3)),
                                   jnp.zeros((1, n), jnp.int32))
    else:
        raise ValueError(f"teacher/text_encoder kind={kind!r}; use one of {', '.join(SIGLIP_KINDS)}")
    if not isinstance(module, siglip_lib.SigLIP):
        raise ValueError(f"the block names a {type(module).__name__}, not a SigLIP")
    return module, variables


def _run_or_checkpoint(tc, convert_kind: str, cls, what: str, shapes=None):
    if is_shapes_only() and tc.kind in ("workdir", convert_kind):
        get_config, abstract_variables, default = shapes

        def from_variant():
            variant, over = _variant_overrides(tc, tc.get("variant") or default)
            return get_config(variant, **over)

        cfg = run_model_config(tc, from_variant) if tc.kind == "workdir" else from_variant()
        return cls(cfg), as_shapes(abstract_variables(cfg))
    if tc.kind == "workdir":
        _, module, variables = load_run(tc.workdir, tc.get("config") or None)
    elif tc.kind == convert_kind:
        module, variables = convert.load(convert_kind, tc.path, **kwargs(tc.get("overrides")))
    else:
        raise ValueError(f"{what} kind={tc.kind!r}; use 'workdir' or {convert_kind!r}")
    if not isinstance(module, cls):
        raise ValueError(f"the block names a {type(module).__name__}, not a {cls.__name__}")
    return module, variables


def load_toklip(tc) -> tuple[toklip_lib.TokLIP, dict]:
    """A frozen TokLIP: a ``toklip`` run or a released checkpoint (``kind="toklip"``, ``path``)."""
    return _run_or_checkpoint(tc, "toklip", toklip_lib.TokLIP, "toklip",
                              (toklip_lib.get_config, toklip_lib.abstract_variables, "S"))


def load_dualtoken(tc) -> tuple[dualtoken_lib.DualToken, dict]:
    """A frozen DualToken tokenizer: a ``dualtoken`` run or an official checkpoint (``kind="dualtoken"``)."""
    return _run_or_checkpoint(tc, "dualtoken", dualtoken_lib.DualToken, "dualtoken",
                              (dualtoken_lib.get_config, dualtoken_lib.abstract_variables, "So400m/14-384"))


def fill_code(data_cfg, encode, codebook_size: int, num_images: int = 256) -> int:
    """The code ``quant.simplify`` fills in: the most frequent code of the first ``num_images``
    training images (``encode``: jitted images [B, H, W, 3] in [-1, 1] → codes). When planning (shapes
    only) no data is read: any code gives the same program, so 0."""
    if is_shapes_only():
        return 0
    from jaxunified.data import cache
    from jaxunified.quant import simplify

    _, data = cache.in_order_batches(data_cfg, "train", num_images)
    return simplify.most_frequent(encode(jnp.asarray(next(iter(data))["image"])), codebook_size)


def _lm_shapes(bc, name: str):
    """``load_lm`` when planning (``train.planning.shapes_only``): the LM's config and parameter
    shapes; a STAR checkpoint's trained parts come from init, whose shapes they have."""
    lm_fields = {f.name for f in dataclasses.fields(lm_lib.LMConfig)}
    kind = bc.kind
    over = {k: v for k, v in kwargs(bc.get("overrides")).items() if k in lm_fields}  # not the converters' kwargs
    chat = {"vocab_size": shapes_chat.ChatVocab().size}
    if kind == "workdir":
        cfg = run_model_config(bc, lambda: lm_lib.variant(bc.variant, **{**over, **chat}))
        cfg = getattr(cfg, "lm", cfg)
        if not isinstance(cfg, lm_lib.LMConfig):  # e.g. a preset left pointing at another kind of run
            raise ValueError(f"{name}: the run {bc.workdir!r} (preset {bc.get('preset')!r}) is not an mllm or LM run; "
                             f"its model is {type(cfg).__name__}")
    elif kind == "hf_qwen2":
        cfg = lm_lib.variant(bc.variant, **over)
    elif kind == "star":
        cfg = dataclasses.replace(star_lib.variant(bc.variant).base, **over)
    elif kind == "random":
        cfg = lm_lib.variant(bc.variant, **{**over, **chat})
    else:
        raise ValueError(f"{name}.kind={kind!r}; use one of {', '.join(LM_KINDS)}")
    return cfg, as_shapes(lm_lib.abstract_params(lm_lib.DecoderLM(cfg))), None


def load_lm(bc, name: str = "base"):
    """(LMConfig, LM params, STAR params or None, the understanding run's (vision block, MLLM
    module, projector params) or None) of a decoder-LM block (STAR's ``base``, a text encoder), named
    ``name`` in errors."""
    kind = bc.kind
    if is_shapes_only():
        return _lm_shapes(bc, name) + (None,)
    if kind == "workdir":
        run_cfg, module, variables = load_run(bc.workdir, bc.get("config") or None)
        lm_cfg = getattr(module.config, "lm", module.config)  # an MLLM run's LM, or an LM run
        params = variables["params"]
        understanding = (run_cfg.vision, module, params["projector"]) if "projector" in params else None
        return lm_cfg, params.get("lm", params), None, understanding
    if kind == "hf_qwen2":
        module, variables = convert.load("hf_qwen2", bc.path, **kwargs(bc.get("overrides")))
        return module.config, variables["params"], None, None
    if kind == "star":
        module, variables = convert.load("star", bc.path, **kwargs(bc.get("overrides")))
        return module.config.base, variables["params"]["base"], variables["params"], None
    if kind == "random":  # smoke tests only
        cfg = lm_lib.variant(bc.variant, **{**kwargs(bc.get("overrides")), "vocab_size": shapes_chat.ChatVocab().size})
        model = lm_lib.DecoderLM(cfg)
        return cfg, host_variables(model, jax.random.key(int(bc.get("seed", 0))), jnp.zeros((1, 4), jnp.int32))[
            "params"], None, None
    raise ValueError(f"{name}.kind={kind!r}; use one of {', '.join(LM_KINDS)}")
