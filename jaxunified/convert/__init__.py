"""Weight import: ``load(kind, path, **overrides) -> (module, variables)``.

Each kind registers a loader in its own module; this file only dispatches, so importing
``jaxunified.convert`` stays cheap and never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from jaxunified.convert.common import CheckpointMismatchError, read_state_dict

# kind -> "module:function". The function takes (path, **overrides) and returns (module, variables).
_LOADERS: dict[str, str] = {
    "llamagen_vq": "jaxunified.convert.vq:load_llamagen_vq",
    "star_vq": "jaxunified.convert.vq:load_star_vq",
    "vgg16": "jaxunified.convert.lpips:load_vgg16",
    "lpips": "jaxunified.convert.lpips:load_lpips",
    "hf_siglip": "jaxunified.convert.siglip:load_hf_siglip",
    "toklip": "jaxunified.convert.toklip:load_toklip",
    "ibq": "jaxunified.convert.toklip:load_ibq",
    "open_clip_siglip": "jaxunified.convert.toklip:load_open_clip_siglip",
    "dualtoken": "jaxunified.convert.dualtoken:load_dualtoken",
    "hf_qwen2": "jaxunified.convert.qwen2:load_hf_qwen2",
    "llamagen_gpt": "jaxunified.convert.llamagen_gpt:load_llamagen_gpt",
    "rq_transformer": "jaxunified.convert.rq_transformer:load_rq_transformer",
    "star": "jaxunified.convert.star:load_star",
}


def kinds() -> list[str]:
    return sorted(_LOADERS)


def _resolve(kind: str) -> Callable[..., Any]:
    if kind not in _LOADERS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known kinds: {', '.join(kinds())}")
    mod, fn = _LOADERS[kind].split(":")
    return getattr(importlib.import_module(mod), fn)


def load(kind: str, path, **overrides):
    """Loads a local checkpoint of ``kind`` and returns ``(flax_module, variables)``."""
    return _resolve(kind)(path, **overrides)


__all__ = ["load", "kinds", "read_state_dict", "CheckpointMismatchError"]
