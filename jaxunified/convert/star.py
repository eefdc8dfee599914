"""STAR checkpoints (``STARMultiModal.state_dict()``) → ``models.star.STAR`` variables.

Key mapping:

    llm.model.* , llm.lm_head.weight          → params/base/*      (the Qwen2 rules of convert.qwen2)
    llm.visual.*                              → skipped (the understanding ViT is not part of t2i)
    stacked_ar.model.{layers,norm}.*          → params/stacked/*   (the same rules; no embedding, no head)
    pixel_adapter.layers.{2j}.{weight,bias}   → params/adapter/dense_{j}/{kernel,bias}
    pixel_output_head.{weight,bias}           → params/head/{kernel,bias}
    pixel_encoder.*                           → the VQ (convert.vq's STAR-VQ rules) under vq/
    diffusion_decoder.*                       → skipped (the optional Lumina2 decoder is not ported)

Released checkpoints (``STAR-{3B,7B}.pt``) are loaded by the reference with ``strict=False`` on
top of ``Qwen2.5-VL-*-Instruct`` and the separate ``VQ-Model.pt``; ``base=`` (the HF folder) and
``vq=`` (the VQ file) supply what the STAR file lacks, the STAR file winning where both have a
key, as there. The base's shape comes from ``base_config`` (a config.json dict/path or an
``models.lm`` variant name; default: the base folder's or the checkpoint folder's config.json);
the stacked depth and adapter depth are read from the keys.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from jaxunified.convert import qwen2, vq as vq_convert
from jaxunified.convert.common import (
    CheckpointMismatchError,
    check_and_build,
    flatten,
    linear_kernel,
    read_state_dict,
    resolve_config,
)
from jaxunified.models import lm as lm_lib
from jaxunified.models.star import STAR, STARConfig, abstract_variables

log = logging.getLogger(__name__)

_SKIPPED = (r"llm\.visual\..*", r"llm\.model\.visual\..*", r"diffusion_decoder\..*")
_PARTS = ("llm.", "stacked_ar.", "pixel_adapter.", "pixel_output_head.", "pixel_encoder.")


def _part(sd: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _adapter_depth(sd: Mapping[str, np.ndarray]) -> int:
    idx = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"pixel_adapter\.layers\.(\d+)\.weight", k))})
    if not idx:
        raise CheckpointMismatchError("STAR checkpoint has no pixel_adapter.layers.*.weight keys")
    if idx != list(range(0, 2 * len(idx), 2)):
        raise CheckpointMismatchError(f"pixel_adapter linear layers at {idx}; MLP_GELU puts them at 0, 2, 4, ...")
    return len(idx)


def _num_stacked(sd: Mapping[str, np.ndarray]) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(r"stacked_ar\.model\.layers\.(\d+)\.", k))}
    if not idx:
        raise CheckpointMismatchError("STAR checkpoint has no stacked_ar.model.layers.* keys")
    return max(idx) + 1


def _base_config(base_config, base, path, **overrides) -> lm_lib.LMConfig:
    if isinstance(base_config, str) and base_config in lm_lib.VARIANTS:
        return lm_lib.variant(base_config, **overrides)
    hf = resolve_config(base_config, base if base is not None else path,
                        "the base Qwen2.5-VL config.json, or an models.lm variant name", beside_weights=True)
    return qwen2.config_from_hf(hf, **overrides)


def merged_state_dict(path, base=None, vq=None, prefer: str | None = None) -> dict[str, np.ndarray]:
    """The STAR file's tensors over those of ``base`` (HF folder, as ``llm.*``) and ``vq`` (as
    ``pixel_encoder.*``): the reference's strict=False layering."""
    sd: dict[str, np.ndarray] = {}
    if base is not None:
        sd.update({"llm." + k: v for k, v in read_state_dict(base).items()})
    if vq is not None:
        sd.update({"pixel_encoder." + k: v for k, v in read_state_dict(vq).items()})
    sd.update(read_state_dict(path, prefer=prefer))
    return sd


def convert_state_dict(sd: Mapping[str, np.ndarray], config: STARConfig, what: str = "STAR checkpoint") -> dict:
    """A STAR state dict → variables of ``STAR(config)``, checked against its shapes."""
    skipped = sorted(k for k in sd if any(re.fullmatch(p, k) for p in _SKIPPED))
    if skipped:
        log.info("%s: skipping %d tensors of the ViT / diffusion decoder", what, len(skipped))
    unmapped = sorted(k for k in sd if not k.startswith(_PARTS) and k not in skipped)
    kept = {k: v for k, v in sd.items() if k not in skipped}

    base = qwen2.convert_state_dict(_part(kept, "llm."), config.base, what=f"{what} (llm.*)")["params"]
    stacked = qwen2.convert_state_dict(_part(kept, "stacked_ar."), config.stacked,
                                       what=f"{what} (stacked_ar.*)", token_embedding=False)["params"]
    vq_vars = vq_convert.convert_state_dict(_part(kept, "pixel_encoder."), config.vq,
                                            what=f"{what} (pixel_encoder.*)")
    flat: dict[str, Any] = {}
    for name, tree in (("base", base), ("stacked", stacked)):
        flat.update({f"params/{name}/{k}": v for k, v in flatten(tree).items()})
    for col, tree in vq_vars.items():
        flat.update({f"{col}/vq/{k}": v for k, v in flatten(tree).items()})
    for k, v in _part(kept, "pixel_adapter.layers.").items():
        i, leaf = k.split(".")
        name = f"params/adapter/dense_{int(i) // 2}"
        flat[f"{name}/kernel" if leaf == "weight" else f"{name}/bias"] = linear_kernel(v) if leaf == "weight" else v
    for k, v in _part(kept, "pixel_output_head.").items():
        flat["params/head/kernel" if k == "weight" else f"params/head/{k}"] = linear_kernel(v) if k == "weight" else v
    expected = nn.meta.unbox(abstract_variables(config))
    return check_and_build(flat, expected, unmapped, what)


def load_star(path, *, base=None, vq=None, base_config=None, vq_overrides: Mapping | None = None,
              prefer: str | None = None, **lm_overrides) -> tuple[STAR, dict]:
    """``convert.load("star", path)``: (STAR module, variables), float32.

    ``path``: ``STAR-*.pt`` or a ``.safetensors`` of the full state dict. ``base``/``vq``: the HF
    Qwen2.5-VL folder and ``VQ-Model.pt`` when the file holds only the trained parts.
    ``vq_overrides``: STAR-VQ config fields (reference ``ModelArgs`` names work) for non-released
    shapes. ``lm_overrides``: ``LMConfig`` fields for both decoders (e.g. ``dtype``).
    """
    sd = merged_state_dict(path, base, vq, prefer)
    lm_cfg = _base_config(base_config, base, path, **lm_overrides)
    vq_cfg = vq_convert.config_from_overrides("STAR-VQ", **dict(vq_overrides or {}))
    config = STARConfig(lm_cfg, _num_stacked(sd), vq_cfg, adapter_depth=_adapter_depth(sd))
    return STAR(config), convert_state_dict(sd, config, what=f"STAR checkpoint {path}")


__all__ = ["convert_state_dict", "load_star", "merged_state_dict"]
