"""Procedural image edits of shapes scenes, and the checker that scores an edited image.

An edit changes one object of a scene and says so in words (``EDIT_KINDS``):

    recolor   "make the red circle blue"
    remove    "remove the red circle"
    add       "add a green star"               (a small object where it overlaps nothing; ≤ 5 objects)
    move      "move the red circle left"       (by ``MOVE_STEP`` of the image side; up/down/left/right)
    resize    "make the red circle larger"     (small ↔ large, kept clear of the others)

The object is named by colour and shape, so only objects whose description is unique in the scene
are edited, and an edit that would overlap another object or leave the image is not proposed.

``check_edit`` judges a generated image against the edit from the pixels
(``shapes.detect_objects``): the detected objects must be exactly the target scene's (shape and
colour, as a multiset), every object the edit did not touch must stay within ``POSITION_TOL`` of
its place, a moved object must have moved at least half the step the right way, and a resized
one must have grown/shrunk by at least 25% of its area.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Sequence

import numpy as np

from jaxunified.data import shapes

EDIT_KINDS = ("recolor", "remove", "add", "move", "resize")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOVE_STEP = 0.2
POSITION_TOL = 0.08
WORDS = ("make", "remove", "add", "move", "up", "down", "left", "right", "larger", "smaller")

Obj = tuple  # (shape id, colour id, size id, (cx, cy))


@dataclasses.dataclass(frozen=True)
class Edit:
    kind: str
    instruction: str
    source: tuple[Obj, ...]
    target: tuple[Obj, ...]
    index: int  # the edited object: in ``source`` (recolor/remove/move/resize) or ``target`` (add)
    direction: str = ""


def _name(o: Obj) -> str:
    return f"{shapes.COLORS[o[1]]} {shapes.SHAPES[o[0]]}"


def _fits(objs: Sequence[Obj], i: int) -> bool:
    """Object ``i`` inside the image (with the dataset's edge margin) and clear of every other."""
    s, _, z, (x, y) = objs[i]
    r = shapes.SIZE_RADIUS[z]
    lo, hi = r + shapes._EDGE_MARGIN, 1.0 - r - shapes._EDGE_MARGIN
    if not (lo <= x <= hi and lo <= y <= hi):
        return False
    for j, (_, _, z2, (x2, y2)) in enumerate(objs):
        if j != i and abs(x - x2) < r + shapes.SIZE_RADIUS[z2] + shapes._GAP and \
                abs(y - y2) < r + shapes.SIZE_RADIUS[z2] + shapes._GAP:
            return False
    return True


def propose(objects: Sequence[Obj], kind: str, rng: np.random.Generator) -> Edit | None:
    """A random ``kind`` edit of the scene ``objects``, or None when the scene admits none."""
    objs = tuple((int(s), int(c), int(z), (float(x), float(y))) for s, c, z, (x, y) in objects)
    names = Counter((s, c) for s, c, _, _ in objs)
    unique = [i for i, o in enumerate(objs) if names[o[:2]] == 1]
    if kind == "add":
        if len(objs) > shapes.MAX_OBJECTS:
            return None
        options = [(s, c) for s in range(len(shapes.SHAPES)) for c in range(len(shapes.COLORS)) if (s, c) not in names]
        s, c = options[int(rng.integers(len(options)))]
        r = shapes.SIZE_RADIUS[0] + shapes._EDGE_MARGIN
        for _ in range(64):
            new = (s, c, 0, (float(rng.uniform(r, 1 - r)), float(rng.uniform(r, 1 - r))))
            target = objs + (new,)
            if _fits(target, len(objs)):
                article = shapes.object_phrase(s, c).split()[0]
                return Edit("add", f"add {article} {_name(new)}", objs, target, len(objs))
        return None
    if not unique:
        return None
    i = unique[int(rng.integers(len(unique)))]
    s, c, z, (x, y) = objs[i]
    if kind == "recolor":
        options = [c2 for c2 in range(len(shapes.COLORS)) if c2 != c and (s, c2) not in names]
        c2 = options[int(rng.integers(len(options)))]
        target = objs[:i] + ((s, c2, z, (x, y)),) + objs[i + 1:]
        return Edit("recolor", f"make the {_name(objs[i])} {shapes.COLORS[c2]}", objs, target, i)
    if kind == "remove":
        return Edit("remove", f"remove the {_name(objs[i])}", objs, objs[:i] + objs[i + 1:], i)
    if kind == "move":
        for d in rng.permutation(list(DIRECTIONS)):
            dx, dy = DIRECTIONS[d]
            target = objs[:i] + ((s, c, z, (x + dx * MOVE_STEP, y + dy * MOVE_STEP)),) + objs[i + 1:]
            if _fits(target, i):
                return Edit("move", f"move the {_name(objs[i])} {d}", objs, target, i, str(d))
        return None
    if kind == "resize":
        target = objs[:i] + ((s, c, 1 - z, (x, y)),) + objs[i + 1:]
        if not _fits(target, i):
            return None
        return Edit("resize", f"make the {_name(objs[i])} {'larger' if z == 0 else 'smaller'}", objs, target, i)
    raise ValueError(f"unknown edit kind {kind!r}; use one of {EDIT_KINDS}")


def random_edit(objects: Sequence[Obj], rng: np.random.Generator, kinds: Sequence[str] = EDIT_KINDS) -> Edit | None:
    """An edit of a kind drawn uniformly among those the scene admits; None if it admits none (rare:
    a crowded scene of identical objects)."""
    edits = [e for e in (propose(objects, k, rng) for k in kinds) if e is not None]
    return edits[int(rng.integers(len(edits)))] if edits else None


@dataclasses.dataclass(frozen=True)
class EditCheck:
    passed: bool
    reason: str


def check_edit(image, edit: Edit) -> EditCheck:
    """Does ``image`` (uint8 or [-1, 1] float [H, W, 3]) show ``edit.target`` and nothing else changed?"""
    dets = shapes.detect_objects(image)
    want = Counter((shapes.SHAPES[s], shapes.COLORS[c]) for s, c, _, _ in edit.target)
    got = Counter((d.shape, d.color) for d in dets)
    if got != want:
        return EditCheck(False, f"objects {sorted(got.elements())} where the edit wants {sorted(want.elements())}")
    by_name = {}
    for d in dets:
        by_name.setdefault((d.shape, d.color), []).append(d)
    for k, (s, c, z, (x, y)) in enumerate(edit.target):
        cands = by_name[(shapes.SHAPES[s], shapes.COLORS[c])]
        d = min(cands, key=lambda d: (d.center[0] - x) ** 2 + (d.center[1] - y) ** 2)
        edited = k == edit.index and edit.kind != "remove"
        if edited and edit.kind == "move":
            dx, dy = DIRECTIONS[edit.direction]
            sx, sy = edit.source[k][3]
            shift = (d.center[0] - sx) * dx + (d.center[1] - sy) * dy
            if shift < MOVE_STEP / 2:
                return EditCheck(False, f"the {_name(edit.source[k])} moved {shift:.2f} {edit.direction}")
            continue
        if edited and edit.kind == "resize":
            before = _area(edit.source[k])
            grew = d.area / before
            if (z == 1 and grew < 1.25) or (z == 0 and grew > 0.8):
                return EditCheck(False, f"the {_name(edit.source[k])} changed area ×{grew:.2f}")
        if edited and edit.kind == "add":
            continue  # the new object may go anywhere it fits
        if max(abs(d.center[0] - x), abs(d.center[1] - y)) > POSITION_TOL:
            return EditCheck(False, f"the {_name((s, c, z, (x, y)))} moved to ({d.center[0]:.2f}, {d.center[1]:.2f})")
    return EditCheck(True, "")


def _area(o: Obj) -> float:
    """Expected area fraction of a source object (its shape's coverage of its box)."""
    r = shapes.SIZE_RADIUS[o[2]]
    u = (np.arange(64) + 0.5) / 32 - 1.0
    return float(shapes._inside(o[0], u[None, :], u[:, None]).mean()) * (2 * r) ** 2


def summarize(edits: Sequence[Edit], checks: Sequence[EditCheck]) -> dict:
    out = {"edit_success": float(np.mean([c.passed for c in checks])) if checks else 0.0}
    for kind in EDIT_KINDS:
        ks = [c.passed for e, c in zip(edits, checks) if e.kind == kind]
        if ks:
            out[f"edit_{kind}"] = float(np.mean(ks))
    return out


__all__ = ["EDIT_KINDS", "WORDS", "Edit", "EditCheck", "propose", "random_edit", "check_edit", "summarize"]
