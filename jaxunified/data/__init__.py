"""Data: the procedural shapes dataset and its checker, user-image sources, grain pipelines.

``shapes`` is numpy-only and imported eagerly; the TFDS builder, sources and pipelines load on
first use (TFDS and grain add about a second to import time).
"""

import importlib

from jaxunified.data.shapes import (
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    Detection,
    detect_objects,
    render_example,
    spatial_relation,
)

_LAZY = {
    "build_shapes": "shapes_tfds",
    "shapes_source": "shapes_tfds",
    "ImageFolderSource": "sources",
    "WebDatasetSource": "sources",
    "ImageDecodeError": "sources",
    "make_loader": "pipeline",
    "normalize_images": "pipeline",
    "to_global": "pipeline",
    "grain_checkpoint_args": "pipeline",
    "build_dataset": "pipeline",
    "DataIterator": "pipeline",
}

__all__ = ["COLORS", "RELATIONS", "SHAPES", "SIZES", "TEMPLATES", "Detection", "detect_objects", "render_example",
           "spatial_relation", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"jaxunified.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'jaxunified.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
