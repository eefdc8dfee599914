"""The procedural shapes dataset: determinism, labels, caption grammar, and the checker."""

import collections
import re

import numpy as np
import pytest

from jaxunified.data import shapes
from jaxunified.data.shapes import COLORS, RELATIONS, SHAPES, SIZES, TEMPLATES


def _objects(ex):
    k = int(ex["count"])
    return [
        (SHAPES[s], COLORS[c], SIZES[z], tuple(xy))
        for s, c, z, xy in zip(ex["obj_shape"][:k], ex["obj_color"][:k], ex["obj_size"][:k], ex["obj_center"][:k])
    ]


def test_vocabulary():
    assert {"circle", "square", "triangle"} < set(SHAPES) and len(SHAPES) >= 4
    assert {"red", "green", "blue", "yellow", "purple", "orange"} <= set(COLORS)
    assert SIZES == ("small", "large")
    # The background must not be mistaken for an object colour.
    assert np.linalg.norm(shapes.COLOR_RGB - shapes.BACKGROUND_RGB, axis=-1).min() > 100


def test_deterministic_and_keyed_by_index_split_seed():
    a = shapes.render_example(7, "train", seed=0, resolution=32)
    b = shapes.render_example(7, "train", seed=0, resolution=32)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    for other in (
        shapes.render_example(8, "train", 0, 32),
        shapes.render_example(7, "test", 0, 32),
        shapes.render_example(7, "train", 1, 32),
    ):
        assert not np.array_equal(a["image"], other["image"])


@pytest.mark.parametrize("resolution", [32, 64, 256])
def test_record_layout(resolution):
    ex = shapes.render_example(3, "train", 0, resolution)
    assert ex["image"].shape == (resolution, resolution, 3) and ex["image"].dtype == np.uint8
    assert isinstance(ex["caption"], str) and ex["caption"]
    assert set(ex) == {"image", "caption", *shapes.LABEL_KEYS}
    n = shapes.MAX_OBJECTS
    assert ex["obj_shape"].shape == ex["obj_color"].shape == ex["obj_size"].shape == (n,)
    assert ex["obj_center"].shape == (n, 2) and ex["obj_center"].dtype == np.float32
    assert ex["obj_mask"].dtype == np.bool_


def test_bad_resolution_is_a_clear_error():
    for bad in (16, 300, 64.0):
        with pytest.raises(ValueError, match="resolution"):
            shapes.render_example(0, "train", 0, bad)


def test_labels_and_grammar():
    seen = collections.Counter()
    for i in range(300):
        ex = shapes.render_example(i, "train", 0, 32)
        objs = _objects(ex)
        k, template = int(ex["count"]), TEMPLATES[int(ex["template"])]
        seen[template] += 1
        assert 1 <= k <= 4 and ex["obj_mask"].sum() == k
        assert (ex["obj_shape"][k:] == -1).all() and (ex["obj_color"][k:] == -1).all()
        assert (ex["main_shape"], ex["main_color"]) == (ex["obj_shape"][0], ex["obj_color"][0])
        cap = ex["caption"]
        if template == "single":
            assert k == 1 and re.fullmatch(rf"an? {objs[0][1]} {objs[0][0]}", cap)
        elif template == "count":
            assert 2 <= k <= 4 and len({o[:2] for o in objs}) == 1
            assert cap.split()[0] == {2: "two", 3: "three", 4: "four"}[k] and cap.endswith("s")
        elif template == "relation":
            rel = RELATIONS[int(ex["relation"])]
            assert k == 2 and objs[0][:2] != objs[1][:2]
            assert cap.startswith(f"a{'n' if objs[0][1][0] in 'aeiou' else ''} {objs[0][1]} {objs[0][0]} ")
            assert cap.endswith(f" {objs[1][1]} {objs[1][0]}")
            assert {"left": "to the left of", "right": "to the right of"}.get(rel, rel) in cap
            # The caption's relation holds clearly on the dominant axis.
            assert shapes.spatial_relation(objs[0][3], objs[1][3], margin=0.05) == int(ex["relation"])
        else:
            assert k == 2 and objs[0][0] != objs[1][0] and objs[0][1] != objs[1][1]
            assert " and " in cap
        if template != "relation":
            assert ex["relation"] == -1
        # Boxes never overlap and stay inside the image.
        for i1, (_, _, z1, c1) in enumerate(objs):
            r1 = shapes.SIZE_RADIUS[SIZES.index(z1)]
            assert r1 <= c1[0] <= 1 - r1 and r1 <= c1[1] <= 1 - r1
            for _, _, z2, c2 in objs[:i1]:
                gap = r1 + shapes.SIZE_RADIUS[SIZES.index(z2)]
                assert abs(c1[0] - c2[0]) >= gap or abs(c1[1] - c2[1]) >= gap
    assert set(seen) == set(TEMPLATES), seen


def test_spatial_relation():
    assert RELATIONS[shapes.spatial_relation((0.2, 0.5), (0.8, 0.45))] == "left"
    assert RELATIONS[shapes.spatial_relation((0.8, 0.5), (0.2, 0.45))] == "right"
    assert RELATIONS[shapes.spatial_relation((0.5, 0.1), (0.45, 0.9))] == "above"
    assert RELATIONS[shapes.spatial_relation((0.5, 0.9), (0.45, 0.1))] == "below"
    assert shapes.spatial_relation((0.2, 0.2), (0.5, 0.5), margin=0.1) == -1


def test_renders_are_antialiased():
    image = shapes.render_example(0, "train", 0, 32)["image"].reshape(-1, 3).astype(np.float32)
    palette = np.concatenate([shapes.COLOR_RGB, shapes.BACKGROUND_RGB[None]])
    off_palette = np.linalg.norm(image[:, None] - palette[None], axis=-1).min(-1) > 8
    assert 0 < off_palette.mean() < 0.2  # soft edges exist, but only at edges


def test_detector_on_clean_renders():
    n, color_ok, count_ok, shape_ok, rel_ok, rel_n = 200, 0, 0, 0, 0, 0
    for i in range(n):
        ex = shapes.render_example(i, "test", 0, 64)
        objs = _objects(ex)
        found = shapes.detect_objects(ex["image"])
        count_ok += len(found) == len(objs)
        color_ok += collections.Counter(d.color for d in found) == collections.Counter(o[1] for o in objs)
        shape_ok += collections.Counter(d.shape for d in found) == collections.Counter(o[0] for o in objs)
        if ex["relation"] >= 0:
            rel_n += 1
            by_identity = {(d.shape, d.color): d.center for d in found}
            a, b = by_identity.get(objs[0][:2]), by_identity.get(objs[1][:2])
            rel_ok += a is not None and b is not None and shapes.spatial_relation(a, b) == ex["relation"]
    assert color_ok / n >= 0.95 and count_ok / n >= 0.95, (color_ok, count_ok)
    assert shape_ok / n >= 0.90, shape_ok
    assert rel_ok / rel_n >= 0.95, (rel_ok, rel_n)


def test_detector_centres_and_float_input():
    ex = shapes.render_example(11, "test", 0, 64)
    found = shapes.detect_objects(ex["image"])
    as_float = shapes.detect_objects(ex["image"].astype(np.float32) / 127.5 - 1.0)
    assert [(d.shape, d.color) for d in found] == [(d.shape, d.color) for d in as_float]
    for shape, color, _, centre in _objects(ex):
        match = [d for d in found if (d.shape, d.color) == (shape, color)]
        assert min(np.hypot(d.center[0] - centre[0], d.center[1] - centre[1]) for d in match) < 1.5 / 64


def test_detector_on_blank_image():
    blank = np.broadcast_to(shapes.BACKGROUND_RGB.astype(np.uint8), (64, 64, 3))
    assert shapes.detect_objects(blank) == []
    with pytest.raises(ValueError, match="H, W, 3"):
        shapes.detect_objects(np.zeros((2, 64, 64, 3), np.uint8))


# Bump this together with JaxunifiedShapes.VERSION: a changed render must never be served from a
# build made by the old renderer.
_RENDER_DIGEST = {"1.0.0": "3437544d54f66345fc1de8318d42e8095cfad462"}


def test_renderer_changes_bump_the_tfds_version():
    import hashlib

    from jaxunified.data.shapes_tfds import JaxunifiedShapes

    digest = hashlib.sha1()
    for i in range(20):
        ex = shapes.render_example(i, "train", 0, 32)
        for k in sorted(ex):
            digest.update(ex[k].encode() if k == "caption" else np.ascontiguousarray(ex[k]).tobytes())
    version = str(JaxunifiedShapes.VERSION)
    assert _RENDER_DIGEST.get(version) == digest.hexdigest(), (
        f"shapes renders changed ({digest.hexdigest()}) but the TFDS version is still {version}: "
        "bump JaxunifiedShapes.VERSION and record the new digest here"
    )


def test_negative_captions_contradict_and_stay_grammatical():
    from jaxunified.data.text import make_tokenizer

    tok = make_tokenizer(tokenizer="sentencepiece", path="builtin:shapes_words", max_len=16)
    rng = np.random.default_rng(0)
    shape_words = set(shapes.SHAPES) | set(shapes.PLURALS)
    for i in range(200):
        caption = shapes.render_example(i, "train", 0, 32)["caption"]
        for kind in shapes.NEGATIVE_KINDS:
            try:
                neg = shapes.negative_caption(caption, rng, (kind,))
            except ValueError:
                assert kind in ("relation", "swap", "count"), (kind, caption)  # edits that need a 2nd object/number
                continue
            assert neg != caption
            words, old = neg.split(), caption.split()
            ids = tok.encode(neg)
            assert 1 not in ids and tok.decode(ids) == neg  # every word known (unk is id 1)
            for k, w in enumerate(words[:-1]):
                if w in ("a", "an"):
                    assert w == ("an" if words[k + 1][0] in "aeiou" else "a"), neg
            if kind in ("shape", "color", "count"):
                changed = [(a, b) for a, b in zip(old, words) if a != b and a not in ("a", "an")]
                vocab = {"shape": shape_words, "color": set(shapes.COLORS),
                         "count": {"two", "three", "four"}}[kind]
                assert len(changed) == 1 and set(changed[0]) <= vocab, (caption, neg)
                if kind == "shape":  # plurality kept
                    assert (changed[0][0] in shapes.PLURALS) == (changed[0][1] in shapes.PLURALS)
    binding = "a red circle and a blue square"
    assert shapes.negative_caption(binding, rng, ("swap",)) == "a red square and a blue circle"
    same_shape = "a red circle above an orange circle"
    assert shapes.negative_caption(same_shape, rng, ("swap",)) == "an orange circle above a red circle"
    rel = shapes.negative_caption("a red circle above a blue square", rng, ("relation",))
    assert rel.startswith("a red circle ") and rel.endswith(" a blue square") and " above " not in rel
    with pytest.raises(ValueError, match="no hard negative"):
        shapes.negative_caption("a red circle", rng, ("relation", "swap", "count"))
    with pytest.raises(ValueError, match="unknown negative kind"):
        shapes.negative_caption("a red circle", rng, ("size",))
