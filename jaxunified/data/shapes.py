"""The built-in procedural image–caption dataset ("shapes") and a checker for its images.

Every example is a pure function of ``(index, split, seed, resolution)``: 1–4 flat-coloured,
non-overlapping objects on a fixed near-white background, a caption from a small grammar, and
structured labels (per-object shape/colour/size/centre, count, template, relation, main object)
so that zero-shot classification and generated-image checks need no second source of truth.

Geometry: every shape exactly fills its axis-aligned box ``centre ± radius`` (x right, y down,
both in [0, 1] of the image side); an object's "centre" is its box centre. Sub-pixel edges come
from ``SUPERSAMPLE``² samples per pixel, so 32 px renders stay clean.

``detect_objects`` inverts the renderer on clean images: it segments pixels by the background→
colour line they lie on, then fits each component's box and picks the shape whose rendered
coverage matches it best. It is the checker later tasks use for colour/count/relation/shape.
"""

from __future__ import annotations

import functools
import zlib
from typing import NamedTuple

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = ("circles", "squares", "triangles", "stars", "diamonds", "crosses")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
# Far from each other and from the background, so that even anti-aliased edge pixels (blends of
# one colour with the background) are told apart by detect_objects.
COLOR_RGB = np.array(
    [(220, 30, 30), (30, 160, 50), (30, 60, 220), (240, 210, 20), (140, 40, 170), (245, 130, 20)],
    np.float32,
)
BACKGROUND_RGB = np.array((245, 245, 240), np.float32)
SIZES = ("small", "large")
SIZE_RADIUS = (0.09, 0.15)  # half the box side, as a fraction of the image side
TEMPLATES = ("single", "count", "relation", "binding")
RELATIONS = ("left", "right", "above", "below")
_RELATION_PHRASES = ("to the left of", "to the right of", "above", "below")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = 4
MIN_RESOLUTION, MAX_RESOLUTION = 32, 256
SUPERSAMPLE = 4
_EDGE_MARGIN = 0.03  # keeps every object this far from the border
_GAP = 0.06  # minimum gap between object boxes: ≥ 2 px at 32 px, so colours never bleed together
_RELATION_MARGIN = 0.1  # generated relations are unambiguous: dominant axis wins by this much
_STAR_INNER = 0.45  # inner/outer radius; chunkier than a pentagram (0.38) so small stars stay stars

LABEL_KEYS = (
    "obj_shape", "obj_color", "obj_size", "obj_center", "obj_mask",
    "count", "template", "relation", "main_shape", "main_color",
)


# ----------------------------------------------------------------------------------------------
# Geometry


def _star_inside_exact(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Map the unit box onto an upright 5-point star of outer radius 1 (y up), then fold every
    # point into the canonical half-sector between a tip (angle 0) and a valley (angle 36°).
    sin72, cos36 = np.sin(np.deg2rad(72)), np.cos(np.deg2rad(36))
    x = u * sin72
    y = 1.0 - (v + 1.0) * 0.5 * (1.0 + cos36)
    rho = np.hypot(x, y)
    sector = 2 * np.pi / 5
    phi = np.mod(np.arctan2(y, x) - np.pi / 2, sector)
    phi = np.minimum(phi, sector - phi)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    vx, vy = _STAR_INNER * np.cos(sector / 2) - 1.0, _STAR_INNER * np.sin(sector / 2)
    # Inside iff P lies on the origin's side of the tip→valley edge.
    return vx * py - vy * (px - 1.0) >= 0.0


_STAR_LUT_SIZE = 1024  # finer than the 4× supersampling grid of the largest object at 256 px


@functools.lru_cache(maxsize=None)
def _star_lut() -> np.ndarray:
    u = (np.arange(_STAR_LUT_SIZE) + 0.5) / (_STAR_LUT_SIZE / 2) - 1.0
    return _star_inside_exact(u[None, :], u[:, None])


def _star_inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Trigonometry per sample made stars 5× costlier than other shapes; a cached mask is exact
    # to 1/512 of the box.
    lut = _star_lut()
    iu = np.floor((u + 1.0) * (_STAR_LUT_SIZE / 2)).astype(np.int64)
    iv = np.floor((v + 1.0) * (_STAR_LUT_SIZE / 2)).astype(np.int64)
    iu, iv = np.broadcast_arrays(iu, iv)
    valid = (iu >= 0) & (iu < _STAR_LUT_SIZE) & (iv >= 0) & (iv < _STAR_LUT_SIZE)
    return valid & lut[np.clip(iv, 0, _STAR_LUT_SIZE - 1), np.clip(iu, 0, _STAR_LUT_SIZE - 1)]


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether box-normalised points (u right, v down, box = [-1, 1]²) lie inside ``shape``."""
    au, av = np.abs(u), np.abs(v)
    name = SHAPES[shape]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return (au <= 1.0) & (av <= 1.0)
    if name == "triangle":  # apex up, base along the bottom of the box
        return (v <= 1.0) & (au <= (v + 1.0) * 0.5)
    if name == "star":
        return _star_inside(u, v)
    if name == "diamond":
        return au + av <= 1.0
    if name == "cross":
        return (au <= 1.0) & (av <= 1.0) & (np.minimum(au, av) <= 0.34)
    raise ValueError(f"unknown shape id {shape}")


def _coverage(shape: int, cx: float, cy: float, rx: float, ry: float, height: int, width: int):
    """Supersampled coverage of one object inside its pixel window: ``(y0, x0, alpha[h, w])``.

    Centre and radii are in pixels of a ``height`` × ``width`` canvas the window is clipped to.
    Only the window is sampled, so cost scales with the object, not the image.
    """
    x0 = max(int(np.floor(cx - rx)) - 1, 0)
    x1 = min(int(np.ceil(cx + rx)) + 1, width)
    y0 = max(int(np.floor(cy - ry)) - 1, 0)
    y1 = min(int(np.ceil(cy + ry)) + 1, height)
    offsets = (np.arange(SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    xs = (np.arange(x0, x1, dtype=np.float32)[:, None] + offsets).ravel()
    ys = (np.arange(y0, y1, dtype=np.float32)[:, None] + offsets).ravel()
    inside = _inside(shape, ((xs - cx) / rx)[None, :], ((ys - cy) / ry)[:, None])
    h, w = y1 - y0, x1 - x0
    alpha = inside.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)
    return y0, x0, alpha


def spatial_relation(center_a, center_b, margin: float = 0.0) -> int:
    """Relation id of A relative to B along the dominant axis, or -1 if no axis dominates by ``margin``.

    Centres are (x, y) in [0, 1] with y pointing down, so "above" means a smaller y.
    """
    dx = float(center_a[0]) - float(center_b[0])
    dy = float(center_a[1]) - float(center_b[1])
    if abs(dx) >= abs(dy) + margin:
        return RELATIONS.index("left" if dx < 0 else "right")
    if abs(dy) >= abs(dx) + margin:
        return RELATIONS.index("above" if dy < 0 else "below")
    return -1


# ----------------------------------------------------------------------------------------------
# Scene sampling and captions


def _split_key(split: str) -> int:
    # crc32, not hash(): it must not change between processes or Python runs.
    return zlib.crc32(str(split).encode())


def _rng(index: int, split: str, seed: int) -> np.random.Generator:
    if not (0 <= index < 2**63 and 0 <= seed < 2**32):
        raise ValueError(f"shapes: index ({index}) must be in [0, 2**63) and seed ({seed}) in [0, 2**32)")
    # Philox keyed directly: a counter-based stream per example, 2× cheaper than SeedSequence.
    key = np.array([(int(seed) << 32) | _split_key(split), int(index)], np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


def _place(rng, radii, relation: int) -> list[tuple[float, float]] | None:
    """Rejection-samples non-overlapping box centres (and the required relation for two objects).

    Candidates are drawn in vectorised rounds: a Python loop per attempt dominated render time.
    """
    r = np.asarray(radii, np.float64)
    n, tries = len(r), 64
    lo, hi = (r + _EDGE_MARGIN)[:, None], (1.0 - r - _EDGE_MARGIN)[:, None]
    for _ in range(8):
        c = rng.uniform(lo, hi, size=(tries, n, 2))
        ok = np.ones(tries, bool)
        for i in range(n):
            for j in range(i):
                ok &= (np.abs(c[:, i] - c[:, j]) >= r[i] + r[j] + _GAP).any(-1)
        for k in np.flatnonzero(ok):
            if relation < 0 or spatial_relation(c[k, 0], c[k, 1], _RELATION_MARGIN) == relation:
                return [(float(x), float(y)) for x, y in c[k]]
    return None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(shape: int, color: int) -> str:
    return f"{_article(COLORS[color])} {COLORS[color]} {SHAPES[shape]}"


def _sample_scene(rng: np.random.Generator):
    template = int(rng.integers(len(TEMPLATES)))
    relation = -1
    n_shapes, n_colors = len(SHAPES), len(COLORS)
    if TEMPLATES[template] == "single":
        objs = [(int(rng.integers(n_shapes)), int(rng.integers(n_colors)))]
        caption = object_phrase(*objs[0])
    elif TEMPLATES[template] == "count":
        n = int(rng.integers(2, MAX_OBJECTS + 1))
        shape, color = int(rng.integers(n_shapes)), int(rng.integers(n_colors))
        objs = [(shape, color)] * n
        caption = f"{NUMBER_WORDS[n]} {COLORS[color]} {PLURALS[shape]}"
    elif TEMPLATES[template] == "relation":
        a = (int(rng.integers(n_shapes)), int(rng.integers(n_colors)))
        b = a
        while b == a:  # the two must be told apart by the caption
            b = (int(rng.integers(n_shapes)), int(rng.integers(n_colors)))
        objs = [a, b]
        relation = int(rng.integers(len(RELATIONS)))
        caption = f"{object_phrase(*a)} {_RELATION_PHRASES[relation]} {object_phrase(*b)}"
    else:  # binding: both attributes differ, so swapping them changes the caption's meaning
        s = rng.choice(n_shapes, size=2, replace=False)
        c = rng.choice(n_colors, size=2, replace=False)
        objs = [(int(s[0]), int(c[0])), (int(s[1]), int(c[1]))]
        caption = f"{object_phrase(*objs[0])} and {object_phrase(*objs[1])}"

    sizes = [int(rng.integers(len(SIZES))) for _ in objs]
    centres = _place(rng, [SIZE_RADIUS[s] for s in sizes], relation)
    if centres is None:  # crowded draw: small objects always fit
        sizes = [0] * len(objs)
        centres = _place(rng, [SIZE_RADIUS[0]] * len(objs), relation)
    assert centres is not None, "shapes: placement failed even with small objects"
    return template, relation, caption, [(s, c, z, xy) for (s, c), z, xy in zip(objs, sizes, centres)]


def render_objects(objects, resolution: int) -> np.ndarray:
    """uint8 [R, R, 3] image of ``objects``: (shape id, colour id, size id, (cx, cy)) in [0, 1], drawn
    in order over the background."""
    image = np.broadcast_to(BACKGROUND_RGB, (resolution, resolution, 3)).copy()
    for shape, color, size, (cx, cy) in objects:
        r = SIZE_RADIUS[size] * resolution
        y0, x0, alpha = _coverage(shape, cx * resolution, cy * resolution, r, r, resolution, resolution)
        h, w = alpha.shape
        window = image[y0 : y0 + h, x0 : x0 + w]
        window += alpha[..., None] * (COLOR_RGB[color] - window)
    return np.rint(image).astype(np.uint8)


def scene_objects(labels) -> list[tuple[int, int, int, tuple[float, float]]]:
    """The objects of an example's labels, in ``render_objects``' form."""
    return [(int(labels["obj_shape"][i]), int(labels["obj_color"][i]), int(labels["obj_size"][i]),
             (float(labels["obj_center"][i][0]), float(labels["obj_center"][i][1])))
            for i in range(int(labels["count"]))]


def render_example(index: int, split: str = "train", seed: int = 0, resolution: int = 64) -> dict:
    """Renders example ``index`` of ``split``: a dict with ``image`` (uint8 [H, W, 3]), ``caption``
    (str) and the labels in ``LABEL_KEYS``.

    Per-object arrays are padded to ``MAX_OBJECTS`` (ids with -1, centres with 0) beside
    ``obj_mask``; objects are in caption order. ``relation`` is -1 unless the template is
    "relation"; ``main_shape``/``main_color`` describe the first object the caption mentions.
    """
    if not isinstance(resolution, (int, np.integer)) or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ValueError(
            f"shapes: resolution {resolution!r} is not supported; use an integer in "
            f"[{MIN_RESOLUTION}, {MAX_RESOLUTION}]"
        )
    rng = _rng(index, split, seed)
    template, relation, caption, objects = _sample_scene(rng)
    image = render_objects(objects, resolution)
    pad = MAX_OBJECTS - len(objects)
    ids = lambda k: np.array([o[k] for o in objects] + [-1] * pad, np.int32)  # noqa: E731
    return dict(
        image=image,
        caption=caption,
        obj_shape=ids(0),
        obj_color=ids(1),
        obj_size=ids(2),
        obj_center=np.array([o[3] for o in objects] + [(0.0, 0.0)] * pad, np.float32),
        obj_mask=np.arange(MAX_OBJECTS) < len(objects),
        count=np.int32(len(objects)),
        template=np.int32(template),
        relation=np.int32(relation),
        main_shape=np.int32(objects[0][0]),
        main_color=np.int32(objects[0][1]),
    )


# ----------------------------------------------------------------------------------------------
# Hard-negative captions

NEGATIVE_KINDS = ("shape", "color", "count", "relation", "swap")
_WORD_SETS = {"shape": (SHAPES, PLURALS), "color": (COLORS,), "count": (tuple(NUMBER_WORDS.values()),)}


def negative_caption(caption: str, rng: np.random.Generator, kinds=NEGATIVE_KINDS) -> str:
    """A grammatical caption that no longer describes the scene ``caption`` describes.

    NegCLIP-style (Yuksekgonul et al. 2023) hard negatives: one edit of a kind drawn uniformly
    from those ``kinds`` that apply — replace one shape / colour / number word (plurality and
    articles kept right), change the relation phrase, or swap the two objects' shapes (their
    colours when the shapes agree). Every edit contradicts the rendered image: objects are
    unambiguous in the grammar and relations hold by a margin. Raises if no kind applies.
    """
    words = caption.split()
    edits = []  # (kind, where: word index | relation phrase | pair of word indices, vocabulary)
    for kind in kinds:
        if kind in _WORD_SETS:
            for i, w in enumerate(words):
                for vocab in _WORD_SETS[kind]:
                    if w in vocab:
                        edits.append((kind, i, vocab))
        elif kind == "relation":
            phrase = next((p for p in _RELATION_PHRASES if p in caption), None)
            if phrase:
                edits.append((kind, phrase, None))
        elif kind == "swap":
            pair = _swappable(words)
            if pair:
                edits.append((kind, pair, None))
        else:
            raise ValueError(f"unknown negative kind {kind!r}; use any of {NEGATIVE_KINDS}")
    if not edits:
        raise ValueError(f"no hard negative of kinds {tuple(kinds)} applies to {caption!r}")
    kind, where, vocab = edits[int(rng.integers(len(edits)))]
    if vocab is not None:
        others = [w for w in vocab if w != words[where]]
        words[where] = others[int(rng.integers(len(others)))]
    elif kind == "relation":
        others = [p for p in _RELATION_PHRASES if p != where]
        words = caption.replace(where, others[int(rng.integers(len(others)))]).split()
    else:
        i, j = where
        words[i], words[j] = words[j], words[i]
    for k in range(len(words) - 1):
        if words[k] in ("a", "an"):
            words[k] = _article(words[k + 1])
    return " ".join(words)


def negative_or_self(caption: str, rng: np.random.Generator, kinds=NEGATIVE_KINDS) -> tuple[str, bool]:
    """``negative_caption``'s edit and True, or the caption itself and False where no kind applies."""
    unknown = sorted(set(kinds) - set(NEGATIVE_KINDS))
    if unknown:
        raise ValueError(f"unknown negative kind(s) {unknown}; use any of {NEGATIVE_KINDS}")
    try:
        return negative_caption(caption, rng, kinds), True
    except ValueError:
        return caption, False


def _swappable(words: list[str]) -> tuple[int, int] | None:
    """Positions of the two objects' differing shape words (else colour words) in a two-object caption."""
    for vocab in (SHAPES, COLORS):
        at = [i for i, w in enumerate(words) if w in vocab]
        if len(at) == 2 and words[at[0]] != words[at[1]]:
            return at[0], at[1]
    return None


# ----------------------------------------------------------------------------------------------
# Checker


class Detection(NamedTuple):
    shape: str
    color: str
    center: tuple[float, float]  # (x, y) in [0, 1], y down
    area: float = 0.0  # the component's pixels, as a fraction of the image


def _to_rgb255(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"detect_objects: expected one [H, W, 3] image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    # Model outputs: float in the library's [-1, 1] convention.
    return (np.clip(image.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5


def _fit_box(alpha: np.ndarray):
    """Initial box (cx, cy, rx, ry) in window pixels from the soft mask's row/column profiles."""
    cols, rows = alpha.max(axis=0), alpha.max(axis=1)
    cx = float((cols * (np.arange(cols.size) + 0.5)).sum() / cols.sum())
    cy = float((rows * (np.arange(rows.size) + 0.5)).sum() / rows.sum())
    return cx, cy, max(cols.sum() / 2, 0.5), max(rows.sum() / 2, 0.5)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def _match_shape(alpha: np.ndarray):
    """Best (iou, shape, cx, cy) for one object's soft mask, rendering every shape in the fitted box."""
    h, w = alpha.shape
    cx, cy, rx, ry = _fit_box(alpha)
    best = (-1.0, 0, cx, cy)
    for shape in range(len(SHAPES)):
        # Profiles underestimate the boxes of shapes whose extremes are points (circle, diamond,
        # star, triangle apex) by up to a pixel, so slightly larger boxes are tried too.
        for grow in (0.0, 0.5, 1.0):
            y0, x0, cov = _coverage(shape, cx, cy, rx + grow, ry + grow, h, w)
            template = np.zeros_like(alpha)
            template[y0 : y0 + cov.shape[0], x0 : x0 + cov.shape[1]] = cov
            iou = _soft_iou(alpha, template)
            if iou > best[0]:
                best = (iou, shape, cx, cy)
    return best


def detect_objects(image, *, min_area: float | None = None) -> list[Detection]:
    """Finds the flat-coloured objects of a shapes image: a list of ``Detection(shape, color, center)``.

    ``image``: uint8 [H, W, 3], or float in [-1, 1]. Designed for clean renders (and close
    reproductions): each pixel is assigned to the colour whose background→colour segment it lies
    nearest, components smaller than ``min_area`` pixels (default: a third of the smallest object
    at this resolution) are dropped, and each kept component is matched against every shape.
    Objects are returned in reading order (top-to-bottom, then left-to-right).
    """
    from scipy import ndimage  # scipy ships with jax; imported lazily to keep import time low

    rgb = _to_rgb255(image)
    res_y, res_x = rgb.shape[:2]
    delta = rgb - BACKGROUND_RGB  # [H, W, 3]
    axes = COLOR_RGB - BACKGROUND_RGB  # [C, 3]
    alpha = np.clip(np.einsum("hwk,ck->hwc", delta, axes) / (axes**2).sum(-1), 0.0, 1.0)
    residual = np.linalg.norm(delta[:, :, None, :] - alpha[..., None] * axes, axis=-1)
    nearest = residual.argmin(-1)
    if min_area is None:
        min_area = _smallest_area_fraction() * (2 * SIZE_RADIUS[0]) ** 2 * res_x * res_y / 3.0

    found = []
    eight = np.ones((3, 3), bool)
    for color in range(len(COLORS)):
        a = np.where(nearest == color, alpha[..., color], 0.0)
        labels, n = ndimage.label(a >= 0.5, structure=eight)
        for sl, idx in zip(ndimage.find_objects(labels), range(1, n + 1)):
            pixels = int((labels[sl] == idx).sum())
            if pixels < min_area:
                continue
            y0, y1 = max(sl[0].start - 2, 0), min(sl[0].stop + 2, res_y)
            x0, x1 = max(sl[1].start - 2, 0), min(sl[1].stop + 2, res_x)
            window = a[y0:y1, x0:x1].copy()
            # Keep this component plus its anti-aliased rim; drop any other component in the window.
            grown = ndimage.binary_dilation(labels[y0:y1, x0:x1] == idx, structure=eight, iterations=2)
            window[~grown] = 0.0
            _, shape, cx, cy = _match_shape(window)
            centre = ((x0 + cx) / res_x, (y0 + cy) / res_y)
            found.append(Detection(SHAPES[shape], COLORS[color], centre, pixels / (res_x * res_y)))
    found.sort(key=lambda d: (round(d.center[1], 2), d.center[0]))
    return found


@functools.lru_cache(maxsize=None)
def _smallest_area_fraction() -> float:
    """Smallest fraction of its box a shape covers (sizes the default noise threshold)."""
    u = (np.arange(256) + 0.5) / 128 - 1.0
    return float(min(_inside(s, u[None, :], u[:, None]).mean() for s in range(len(SHAPES))))
