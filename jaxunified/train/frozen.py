"""Frozen sub-models a task takes from a config block: a finished run, a released checkpoint, or
(smoke tests) a random init. One place for the dispatch, so every task reads ``tokenizer`` /
``teacher`` / ``text_encoder`` blocks the same way and no task imports another.

A block has ``kind``: ``"workdir"`` (``workdir`` + optional ``config`` spec: the run's own
exported module through ``runs.load_run``), a ``convert`` kind (``path`` + ``overrides``), or
``"random"`` (``variant`` + ``overrides``, ``seed``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxunified import convert
from jaxunified.models import dualtoken as dualtoken_lib
from jaxunified.models import siglip as siglip_lib
from jaxunified.models import toklip as toklip_lib
from jaxunified.models import vqgan as vqgan_lib
from jaxunified.train.runs import load_run
from jaxunified.train.task import host_variables, kwargs

VQ_KINDS = ("workdir", "llamagen_vq", "star_vq", "ibq", "random")
SIGLIP_KINDS = ("workdir", "hf_siglip", "open_clip", "random")


def load_vq(tc) -> tuple[vqgan_lib.VQGAN, dict]:
    """The frozen VQ tokenizer of block ``tc``: (VQGAN module, its variables)."""
    kind = tc.kind
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


def _run_or_checkpoint(tc, convert_kind: str, cls, what: str):
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
    return _run_or_checkpoint(tc, "toklip", toklip_lib.TokLIP, "toklip")


def load_dualtoken(tc) -> tuple[dualtoken_lib.DualToken, dict]:
    """A frozen DualToken tokenizer: a ``dualtoken`` run or an official checkpoint (``kind="dualtoken"``)."""
    return _run_or_checkpoint(tc, "dualtoken", dualtoken_lib.DualToken, "dualtoken")


def fill_code(data_cfg, encode, codebook_size: int, num_images: int = 256) -> int:
    """The code ``quant.simplify`` fills in: the most frequent code of the first ``num_images``
    training images (``encode``: jitted images [B, H, W, 3] in [-1, 1] → codes)."""
    from jaxunified.data import cache
    from jaxunified.quant import simplify

    _, data = cache.in_order_batches(data_cfg, "train", num_images)
    return simplify.most_frequent(encode(jnp.asarray(next(iter(data))["image"])), codebook_size)
