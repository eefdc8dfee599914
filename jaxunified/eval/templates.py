"""Prompt templates for zero-shot classification: CLIP's 80 ImageNet templates and the shapes tasks.

The shapes prompts are built with the dataset's own caption grammar (``jaxunified.data.shapes``),
so a prompt is always a caption the dataset can produce: a model trained on shapes captions is
asked about colour, shape and count in exactly the words it has seen. Each class averages over
the attributes the task does not ask about (CLIP-style prompt ensembling).
"""

from __future__ import annotations

import functools
import itertools
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxunified.data.shapes import COLORS, MAX_OBJECTS, NUMBER_WORDS, PLURALS, SHAPES, object_phrase

# The 80 prompts OpenAI's CLIP ensembles for ImageNet (its "Prompt Engineering for ImageNet"
# notebook), in that order; the grammar slips ("a origami", "a embroidered") are theirs and kept,
# so ensembled class embeddings match published numbers.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


def fill_templates(class_names: Sequence[str], templates: Sequence[str] = IMAGENET_TEMPLATES) -> list[list[str]]:
    """Prompts per class (``class_embeddings``' input): every template filled with every class name."""
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"fill_templates: every template needs exactly one '{{}}', these do not: {bad}")
    return [[t.format(name) for t in templates] for name in class_names]


class ZeroShotTask(NamedTuple):
    name: str
    class_names: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]  # per class, in class order
    # "mean": CLIP prompt ensembling; "best": a class scores its best-matching prompt (zero_shot module).
    scoring: str = "mean"


SHAPES_TASK_NAMES = ("color", "shape", "count")
COUNT_CLASSES = tuple(range(1, MAX_OBJECTS + 1))  # class i is a count of i + 1 objects
_COUNT_WORDS = {1: "one", **NUMBER_WORDS}


def _count_caption(n: int, shape: int, color: int) -> str:
    # The dataset's "count" template; one object is the "single" template's phrase.
    return object_phrase(shape, color) if n == 1 else f"{NUMBER_WORDS[n]} {COLORS[color]} {PLURALS[shape]}"


@functools.lru_cache(maxsize=None)
def shapes_tasks() -> dict[str, ZeroShotTask]:
    """The shapes zero-shot tasks, keyed by ``SHAPES_TASK_NAMES``; class ids match the dataset's labels
    (``main_color``, ``main_shape``, ``count - 1``).

    A class's prompts are every single-object and count caption with that class's value (colour
    prompts include "two red circles" as well as "a red circle"), so every class covers the same
    spread of the other attributes. They are scored by the best-matching prompt: the answer is the
    class of the caption the model ranks first among all 144, the question the contrastive loss
    trains. Averaging the prompts (CLIP ensembling) assumes the embedding is additive in colour,
    shape and count; a shapes SigLIP whose best prompt named the right shape for 96% of the images
    scored 72% that way (one-object images sit far from "three red circles"), so the eval reports
    the ensemble too (``zs_<task>_ensemble_top1``) but does not judge by it.
    """
    combos = itertools.product(COUNT_CLASSES, range(len(SHAPES)), range(len(COLORS)))
    captions = [(n, s, c, _count_caption(n, s, c)) for n, s, c in combos]

    def by(attr: int, values) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(cap[3] for cap in captions if cap[attr] == v) for v in values)

    return {
        "color": ZeroShotTask("color", COLORS, by(2, range(len(COLORS))), "best"),
        "shape": ZeroShotTask("shape", SHAPES, by(1, range(len(SHAPES))), "best"),
        "count": ZeroShotTask("count", tuple(_COUNT_WORDS[n] for n in COUNT_CLASSES), by(0, COUNT_CLASSES), "best"),
    }


def _uniform(values: jax.Array, main: jax.Array, present: jax.Array) -> jax.Array:
    return jnp.all((values == main[..., None]) | ~present, axis=-1)


def shapes_targets(
    labels: Mapping[str, jax.Array], mask: jax.Array | None = None
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Ground truth per shapes task: ``{task: (class_id [B], valid [B])}`` from a batch's label fields.

    Colour and shape are only asked of images whose objects all share that attribute (a two-colour
    scene has no single right colour); count is always valid. ``mask`` (the pipeline's padding
    mask) is folded into ``valid``. Pure ``jnp``: works on host arrays and sharded global arrays.
    """
    need = ("obj_color", "obj_shape", "obj_mask", "main_color", "main_shape", "count")
    missing = [k for k in need if k not in labels]
    if missing:
        raise ValueError(f"shapes_targets: labels lack {missing}; pass a shapes batch (fields {need})")
    present = jnp.asarray(labels["obj_mask"], bool)
    main_color = jnp.asarray(labels["main_color"], jnp.int32)
    main_shape = jnp.asarray(labels["main_shape"], jnp.int32)
    count = jnp.asarray(labels["count"], jnp.int32)
    ok = jnp.ones(count.shape, bool) if mask is None else jnp.asarray(mask, bool)
    in_range = (count >= COUNT_CLASSES[0]) & (count <= COUNT_CLASSES[-1])
    return {
        "color": (main_color, ok & _uniform(jnp.asarray(labels["obj_color"]), main_color, present)),
        "shape": (main_shape, ok & _uniform(jnp.asarray(labels["obj_shape"]), main_shape, present)),
        "count": (count - COUNT_CLASSES[0], ok & in_range),
    }
