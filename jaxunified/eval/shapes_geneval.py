"""GenEval-style structural checks of generated images against shapes-dataset captions.

GenEval (Ghosh et al. 2023) scores a text-to-image model by detecting the objects in each image
and checking them against the prompt's structure, per category; its overall score is the mean of
the category scores. Here the "detector" is ``jaxunified.data.shapes.detect_objects``, which
inverts the shapes renderer from pixels, and the prompts are the shapes grammar's captions.

Categories (GenEval's names) and what passing one means:

``single_object``  the one named shape is present ("a red circle": a circle).
``two_object``     both named shapes are present ("a red circle and a blue square").
``counting``       exactly the named number of the named shape ("three red circles": 3 circles).
``colors``         the named object(s) have the named colour ("a red circle": the circle is red).
``position``       the first named object stands in the named relation to the second, along the
                   dominant axis of their centres ("a red circle above a blue square").
``color_attr``     each colour is bound to its own object: distinct objects match each full
                   phrase (so the scene "a blue circle and a red square" fails
                   "a red circle and a blue square" here while passing two_object).

Mapping of the dataset's templates (a caption is scored under every category it tests and passes
only if it passes all of them; its ``category`` is the one its template was designed to test,
listed first). position and color_attr find objects by their full phrase, so a missing or
wrongly coloured object fails those too:

==========  =======================================  ==========================================
template    example                                  categories
==========  =======================================  ==========================================
single      a red circle                             **colors**, single_object
count       three red circles                        **counting**, colors
relation    a red circle above a blue square         **position**, two_object, color_attr
binding     a red circle and a blue square           **color_attr**, two_object
==========  =======================================  ==========================================

A colourless phrase ("a circle", "two circles", "a circle above a square") drops ``colors`` /
``color_attr``, and the nouns "object(s)"/"shape(s)" leave the shape unspecified; the dataset
never produces either, but GenEval's own prompts have this form (an optional "a photo of" prefix
is accepted too).

Strictness. A shapes caption describes the whole scene (the renderer draws exactly the objects
named), so by default (``strict=True``) a caption also fails if the image holds objects the
caption does not allow: single_object / two_object / counting require the exact set of shapes
(extra objects of any kind fail them), and ``colors`` requires *every* object of the named shape
to have the colour. ``strict=False`` follows GenEval's rules instead: named objects must be
present, extra objects of other kinds are ignored, counting is exact for the named shape only
(GenEval's ``exclude`` rule), and ``colors`` needs only enough objects of the right colour. Both
modes compare relations along the dominant axis, stricter than GenEval's ±60° cones, because the
dataset's relations hold along the dominant axis by a margin and a cone would accept the
perpendicular relation of a diagonal pair.

Generated images are noisier than renders: ``detect_objects`` drops connected components smaller
than a third of the smallest object (speckle), and isolated outlier pixels are replaced by their
neighbours' median before detection (``despeckle``) so a stray pixel inside an object does not
change its shape (anti-aliased edges are kept: they are blends of their neighbours). Everything
here is numpy; nothing from training is imported.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Sequence

import numpy as np

from jaxunified.data.shapes import (
    COLORS,
    NUMBER_WORDS,
    PLURALS,
    RELATIONS,
    SHAPES,
    Detection,
    detect_objects,
    negative_caption,
    render_example,
    spatial_relation,
)

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

_RELATION_PHRASES = {
    "left": "to the left of", "right": "to the right of", "above": "above", "below": "below",
}
# Longest first, so "to the left of" is not read as "to the" + "left of".
_RELATION_TOKENS = (
    (("to", "the", "left", "of"), "left"),
    (("to", "the", "right", "of"), "right"),
    (("left", "of"), "left"),
    (("right", "of"), "right"),
    (("above",), "above"),
    (("below",), "below"),
)
_COUNT_WORDS = {word: n for n, word in NUMBER_WORDS.items()}
_ANY_SINGULAR, _ANY_PLURAL = ("object", "shape"), ("objects", "shapes")


# ----------------------------------------------------------------------------------------------
# Prompts


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One object phrase: ``count`` objects of ``shape`` and ``color`` (``None``: any)."""

    shape: str | None
    color: str | None
    count: int = 1

    def noun(self, plural: bool = False) -> str:
        if self.shape is None:
            return "objects" if plural else "object"
        return PLURALS[SHAPES.index(self.shape)] if plural else self.shape

    def phrase(self, article: bool = True) -> str:
        """``"a red circle"``, ``"three circles"``; without the article: ``"red circle"``."""
        words = [self.color] if self.color else []
        words.append(self.noun(plural=self.count > 1))
        if self.count > 1:
            return " ".join([NUMBER_WORDS.get(self.count, str(self.count))] + words)
        if not article:
            return " ".join(words)
        return " ".join(["an" if words[0][0] in "aeiou" else "a"] + words)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """The structure a caption requires.

    ``template`` is the shapes template (``shapes.TEMPLATES``) the caption's form belongs to;
    ``objects`` are in caption order: one phrase for the single/count templates, two for
    relation/binding. ``relation`` (a name in ``shapes.RELATIONS``) places ``objects[0]``
    relative to ``objects[1]``; ``None`` unless the template is "relation".
    """

    caption: str
    template: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    @property
    def categories(self) -> tuple[str, ...]:
        """Every GenEval category the caption tests, its main one (``category``) first."""
        colored = any(o.color for o in self.objects)
        if self.template == "single":
            return ("colors", "single_object") if colored else ("single_object",)
        if self.template == "count":
            return ("counting", "colors") if colored else ("counting",)
        if self.template == "relation":
            return ("position", "two_object") + (("color_attr",) if colored else ())
        return ("color_attr", "two_object") if colored else ("two_object",)

    @property
    def category(self) -> str:
        return self.categories[0]

    @property
    def num_objects(self) -> int:
        return sum(o.count for o in self.objects)


def _normalise(caption: str) -> list[str]:
    words = caption.strip().lower().rstrip(".").split()
    if words[:3] == ["a", "photo", "of"]:
        words = words[3:]
    return words


def _parse_phrase(words: list[str], caption: str) -> ObjectSpec:
    def fail(why: str):
        raise ValueError(f"cannot parse shapes caption {caption!r}: {why}")

    if not words:
        fail("an object phrase is empty")
    head, rest = words[0], words[1:]
    if head in ("a", "an"):
        count = 1
    elif head in _COUNT_WORDS:
        count = _COUNT_WORDS[head]
    else:
        fail(f"an object phrase must start with 'a', 'an' or one of {tuple(_COUNT_WORDS)}, not {head!r}")
    if len(rest) not in (1, 2):
        fail(f"expected '[colour] shape' after {head!r}, got {' '.join(rest)!r}")
    color = None
    if len(rest) == 2:
        if rest[0] not in COLORS:
            fail(f"unknown colour {rest[0]!r} (colours: {', '.join(COLORS)})")
        color = rest[0]
    noun = rest[-1]
    if count == 1:
        nouns, other = {**dict(zip(SHAPES, SHAPES)), **dict.fromkeys(_ANY_SINGULAR)}, PLURALS + _ANY_PLURAL
    else:
        nouns, other = {**dict(zip(PLURALS, SHAPES)), **dict.fromkeys(_ANY_PLURAL)}, SHAPES + _ANY_SINGULAR
    if noun in nouns:
        return ObjectSpec(nouns[noun], color, count)
    if noun in other:
        fail(f"{noun!r} does not agree in number with {head!r}")
    fail(f"unknown shape {noun!r} (shapes: {', '.join(SHAPES)})")


def parse_prompt(caption: str) -> Prompt:
    """Parses a shapes caption (any the dataset's grammar produces) into its required structure.

    Raises ``ValueError`` naming the problem for a caption outside the grammar.
    """
    if not isinstance(caption, str):
        raise TypeError(f"parse_prompt: expected a caption string, got {type(caption).__name__}")
    words = _normalise(caption)
    if not words:
        raise ValueError(f"cannot parse shapes caption {caption!r}: it is empty")
    relations, i = [], 0  # (start, stop, relation name) of each relation phrase
    while i < len(words):
        for tokens, name in _RELATION_TOKENS:
            if tuple(words[i : i + len(tokens)]) == tokens:
                relations.append((i, i + len(tokens), name))
                i += len(tokens)
                break
        else:
            i += 1
    ands = [k for k, w in enumerate(words) if w == "and"]
    if len(relations) + len(ands) > 1:
        raise ValueError(
            f"cannot parse shapes caption {caption!r}: at most one relation or 'and' joins two objects"
        )
    if relations or ands:
        start, stop, relation = relations[0] if relations else (ands[0], ands[0] + 1, None)
        a, b = _parse_phrase(words[:start], caption), _parse_phrase(words[stop:], caption)
        if a.count != 1 or b.count != 1:
            raise ValueError(f"cannot parse shapes caption {caption!r}: two-object captions name single objects")
        template = "relation" if relation else "binding"
        return Prompt(caption, template, (a, b), relation)
    spec = _parse_phrase(words, caption)
    return Prompt(caption, "single" if spec.count == 1 else "count", (spec,))


# ----------------------------------------------------------------------------------------------
# Pixels


def to_uint8(image, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """One ``[H, W, 3]`` image as uint8 RGB.

    Floats are read in ``value_range``; by default ``(-1, 1)`` (the library's convention) if any
    value is negative, else ``(0, 1)``. The guess is safe for shapes images: every palette colour
    has a channel below mid-grey, so a [-1, 1] image with an object in it has negative values.
    Values outside the range (generators overshoot) are clipped; non-finite ones read as the low end.
    """
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"shapes check: expected one [H, W, 3] image, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError("shapes check: integer images must lie in [0, 255]")
        return x.astype(np.uint8)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"shapes check: unsupported image dtype {x.dtype}")
    x = x.astype(np.float32)
    finite = np.isfinite(x)
    if value_range is None:
        low = x[finite].min() if finite.any() else 0.0
        value_range = (-1.0, 1.0) if low < 0 else (0.0, 1.0)
        # A [0, 255] float image would otherwise read as almost all white.
        if finite.any() and x[finite].max() > 2.0:
            raise ValueError("shapes check: float images must lie in [-1, 1] or [0, 1]; pass uint8 for [0, 255]")
    lo, hi = (float(v) for v in value_range)
    x = np.where(finite, x, lo)
    return np.rint(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


# RGB distance beyond which a pixel counts as an outlier: a fifth to a quarter of the
# background→palette distances (223–301), clear of Gaussian noise up to σ ≈ 15 between neighbours
# (a tighter 40 started "repairing" noisy edges at 32 px and lost more than it fixed).
_SPECKLE_DIST = 60.0


def despeckle(image: np.ndarray) -> np.ndarray:
    """Replaces isolated outlier pixels of a uint8 ``[H, W, 3]`` image by their 8 neighbours'
    channel-wise median.

    A pixel is an outlier if it lies farther than ``_SPECKLE_DIST`` from every segment between
    two of its neighbours (a neighbour itself included). Anti-aliased edges, star tips and
    triangle apexes are blends of the background and an object colour, so they lie on such a
    segment and clean renders are left unchanged; a stray pixel of another colour does not.
    """
    x = image.astype(np.float32)
    h, w, _ = x.shape
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    neighbours = np.stack(
        [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    )  # [8, H, W, 3]
    # Cheap pre-filter: only pixels far from every neighbour need the 8×8 segment test.
    candidate = ((neighbours - x) ** 2).sum(-1).min(0) > _SPECKLE_DIST**2
    if not candidate.any():
        return image
    p, nb = x[candidate], neighbours[:, candidate]  # [P, 3], [8, P, 3]
    start, step = nb[:, None], nb[None, :] - nb[:, None]  # segments start → start + step: [8, 8, P, 3]
    t = np.clip(((p - start) * step).sum(-1) / np.maximum((step**2).sum(-1), 1e-6), 0.0, 1.0)
    gap = ((p - start - t[..., None] * step) ** 2).sum(-1).min((0, 1))
    outlier = np.zeros(candidate.shape, bool)
    outlier[candidate] = gap > _SPECKLE_DIST**2
    if not outlier.any():
        return image
    out = image.copy()
    out[outlier] = np.rint(np.median(neighbours[:, outlier], axis=0)).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------
# Checks


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Outcome of one image against one caption.

    ``passed``: every tested category passed. ``category_passed`` maps each category the caption
    tests to its outcome; ``reason`` is ``""`` on success, else each failing category's reason
    ("counting: expected three circles, found 2") followed by what was detected.
    """

    passed: bool
    prompt: Prompt
    category_passed: dict[str, bool]
    reason: str
    detections: tuple[Detection, ...]

    @property
    def categories(self) -> tuple[str, ...]:
        return self.prompt.categories

    @property
    def category(self) -> str:
        return self.prompt.category


def _shape_ok(d: Detection, spec: ObjectSpec) -> bool:
    return spec.shape is None or d.shape == spec.shape


def _full_ok(d: Detection, spec: ObjectSpec) -> bool:
    return _shape_ok(d, spec) and (spec.color is None or d.color == spec.color)


def _describe(d: Detection) -> str:
    return ObjectSpec(d.shape, d.color).phrase()


def _listing(dets: Iterable[Detection]) -> str:
    return ", ".join(_describe(d) for d in dets) or "none"


def _pairs(dets: Sequence[Detection], a: ObjectSpec, b: ObjectSpec, ok) -> list[tuple[int, int]]:
    """Every (i, j), i ≠ j, with detection i matching ``a`` and detection j matching ``b``."""
    return [(i, j) for i, j in itertools.permutations(range(len(dets)), 2) if ok(dets[i], a) and ok(dets[j], b)]


def _missing(dets: Sequence[Detection], a: ObjectSpec, b: ObjectSpec, ok) -> str:
    """Why no distinct pair matches ``a`` and ``b`` under ``ok``."""
    if a == b:  # the same phrase twice needs two matches of it
        n = sum(ok(d, a) for d in dets)
        return f"expected {dataclasses.replace(a, count=2).phrase()}, found {n or 'none'}"
    lacking = [s.phrase() for s in (a, b) if not any(ok(d, s) for d in dets)]
    if lacking:
        return "missing " + " and ".join(lacking)
    return f"no two distinct objects are {a.phrase()} and {b.phrase()}"


def _judge(dets: Sequence[Detection], prompt: Prompt, strict: bool) -> tuple[dict[str, bool], dict[str, str]]:
    reasons: dict[str, str] = {}
    if len(prompt.objects) == 1:
        spec = prompt.objects[0]
        n = spec.count
        same = [d for d in dets if _shape_ok(d, spec)]
        others = [d for d in dets if not _shape_ok(d, spec)]
        cat = "counting" if prompt.template == "count" else "single_object"
        expected = ObjectSpec(spec.shape, None, n).phrase()
        if len(same) != n and (strict or cat == "counting" or not same):
            reasons[cat] = f"expected {expected}, found {len(same) or 'none'}"
        elif strict and others:
            reasons[cat] = f"unexpected extra object(s): {_listing(others)}"
        if spec.color:
            right = [d for d in same if d.color == spec.color]
            if not same:
                reasons["colors"] = f"no {spec.noun()} to check the colour of"
            elif strict and len(right) < len(same):
                wrong = [d for d in same if d.color != spec.color]
                reasons["colors"] = f"expected {spec.color} {spec.noun(n > 1)}, found {_listing(wrong)}"
            elif not strict and len(right) < n:
                reasons["colors"] = f"expected {spec.phrase()}, found {len(right) or 'none'} {spec.color}"
    else:
        a, b = prompt.objects
        by_shape = _pairs(dets, a, b, _shape_ok)
        if not by_shape:
            reasons["two_object"] = _missing(dets, ObjectSpec(a.shape, None), ObjectSpec(b.shape, None), _shape_ok)
        elif strict and len(dets) > 2:
            i, j = by_shape[0]
            extra = [d for k, d in enumerate(dets) if k not in (i, j)]
            reasons["two_object"] = f"unexpected extra object(s): {_listing(extra)}"
        full = _pairs(dets, a, b, _full_ok)
        if "color_attr" in prompt.categories and not full:
            reasons["color_attr"] = _missing(dets, a, b, _full_ok)
        if prompt.relation is not None:
            if not full:
                reasons["position"] = "cannot place the objects: " + _missing(dets, a, b, _full_ok)
            elif not any(_relation(dets[i], dets[j]) == prompt.relation for i, j in full):
                i, j = full[0]
                reasons["position"] = (
                    f"expected the {a.phrase(article=False)} {_RELATION_PHRASES[prompt.relation]} the "
                    f"{b.phrase(article=False)}, found it {_RELATION_PHRASES[_relation(dets[i], dets[j])]} it"
                )
    return {c: c not in reasons for c in prompt.categories}, reasons


def _relation(a: Detection, b: Detection) -> str:
    # Margin 0: the dominant axis decides; with equal offsets spatial_relation picks left/right.
    return RELATIONS[spatial_relation(a.center, b.center, margin=0.0)]


def _result(dets: Sequence[Detection], prompt: Prompt, strict: bool) -> CheckResult:
    passed, reasons = _judge(dets, prompt, strict)
    reason = ""
    if reasons:
        reason = "; ".join(f"{c}: {reasons[c]}" for c in prompt.categories if c in reasons)
        reason += f" (detected: {_listing(dets)})"
    return CheckResult(all(passed.values()), prompt, passed, reason, tuple(dets))


def detect(image, *, min_area: float | None = None, value_range=None) -> list[Detection]:
    """The objects of a (possibly generated) shapes image: ``despeckle`` then ``detect_objects``."""
    return detect_objects(despeckle(to_uint8(image, value_range)), min_area=min_area)


def check(
    image, prompt_or_caption: Prompt | str, *, strict: bool = True, min_area: float | None = None,
    value_range: tuple[float, float] | None = None,
) -> CheckResult:
    """Checks one ``[H, W, 3]`` image (uint8, or float in [-1, 1] / [0, 1]) against a caption.

    ``min_area`` (pixels) overrides ``detect_objects``' speckle threshold; ``strict`` is
    described in the module docstring.
    """
    prompt = prompt_or_caption if isinstance(prompt_or_caption, Prompt) else parse_prompt(prompt_or_caption)
    return _result(detect(image, min_area=min_area, value_range=value_range), prompt, strict)


def summarize(results: Sequence[CheckResult]) -> dict:
    """GenEval scores of a list of results: see ``evaluate``."""
    if not results:
        raise ValueError("shapes geneval: no results to summarize")
    per_category, counts = {}, {}
    for cat in CATEGORIES:
        outcomes = [r.category_passed[cat] for r in results if cat in r.category_passed]
        if outcomes:
            per_category[cat], counts[cat] = float(np.mean(outcomes)), len(outcomes)
    return dict(
        overall=float(np.mean(list(per_category.values()))),
        per_category=per_category,
        counts=counts,
        caption_pass_rate=float(np.mean([r.passed for r in results])),
        results=list(results),
    )


def evaluate(images, captions: Sequence[str | Prompt], *, strict: bool = True, min_area: float | None = None,
             value_range: tuple[float, float] | None = None) -> dict:
    """Scores generated images against their captions, GenEval style.

    ``images``: ``[N, H, W, 3]`` array or a sequence of ``[H, W, 3]`` images. Returns
    ``per_category`` (accuracy of each category present), ``counts`` (captions scored under each),
    ``overall`` (mean of the category accuracies, GenEval's headline number),
    ``caption_pass_rate`` (fraction of images passing every check) and ``results`` (one
    ``CheckResult`` per image, in order).
    """
    if isinstance(captions, (str, Prompt)):
        raise ValueError("shapes geneval: captions must be a sequence, one per image")
    if len(images) != len(captions):
        raise ValueError(f"shapes geneval: {len(images)} images but {len(captions)} captions")
    return summarize([
        check(img, cap, strict=strict, min_area=min_area, value_range=value_range)
        for img, cap in zip(images, captions)
    ])


def validate(num: int = 500, resolution: int = 64, seed: int = 0, *, split: str = "test",
             negative_seed: int = 0, strict: bool = True) -> dict:
    """Checks the checker on renders: ``num`` examples of ``split`` against their own caption
    and against a caption changed in one attribute (``shapes.negative_caption``, seeded per
    example by ``(negative_seed, index)``).

    Returns ``own_pass_rate`` (should be ~1), ``changed_pass_rate`` (should be ~0),
    ``own_failures`` (``(index, caption, reason)``) and ``changed_passes`` (``(index, caption,
    changed caption)``) for inspection, and ``num``/``resolution``.
    """
    if num < 1:
        raise ValueError(f"shapes geneval validate: num must be ≥ 1, got {num}")
    own_failures, changed_passes = [], []
    for index in range(num):
        ex = render_example(index, split, seed, resolution)
        dets = detect(ex["image"])
        caption = ex["caption"]
        own = _result(dets, parse_prompt(caption), strict)
        if not own.passed:
            own_failures.append((index, caption, own.reason))
        changed = negative_caption(caption, np.random.default_rng([negative_seed, index]))
        if _result(dets, parse_prompt(changed), strict).passed:
            changed_passes.append((index, caption, changed))
    return dict(
        own_pass_rate=1.0 - len(own_failures) / num,
        changed_pass_rate=len(changed_passes) / num,
        own_failures=own_failures,
        changed_passes=changed_passes,
        num=num,
        resolution=resolution,
    )
