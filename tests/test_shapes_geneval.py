import itertools

import numpy as np
import pytest

from jaxunified.data import shapes
from jaxunified.eval import shapes_geneval as sg
from jaxunified.eval.shapes_geneval import ObjectSpec, check, evaluate, parse_prompt, validate


def _paint(objects, res=64):
    """A render of hand-placed objects: (shape, colour, (cx, cy), radius) each, like render_example."""
    image = np.broadcast_to(shapes.BACKGROUND_RGB, (res, res, 3)).copy()
    for shape, color, (cx, cy), radius in objects:
        r = radius * res
        y0, x0, alpha = shapes._coverage(shapes.SHAPES.index(shape), cx * res, cy * res, r, r, res, res)
        h, w = alpha.shape
        window = image[y0 : y0 + h, x0 : x0 + w]
        window += alpha[..., None] * (shapes.COLOR_RGB[shapes.COLORS.index(color)] - window)
    return np.rint(image).astype(np.uint8)


RED_CIRCLE_LEFT = ("circle", "red", (0.25, 0.5), 0.12)
BLUE_SQUARE_RIGHT = ("square", "blue", (0.75, 0.5), 0.12)


# ----------------------------------------------------------------------------------------------
# Parser


def _grammar_captions():
    """Every caption the shapes grammar can produce, with its template and objects."""
    objs = list(itertools.product(range(len(shapes.SHAPES)), range(len(shapes.COLORS))))
    for s, c in objs:
        yield shapes.object_phrase(s, c), "single", [(s, c, 1)], None
        for n, word in shapes.NUMBER_WORDS.items():
            yield f"{word} {shapes.COLORS[c]} {shapes.PLURALS[s]}", "count", [(s, c, n)], None
    for a, b in itertools.permutations(objs, 2):
        for r, phrase in enumerate(shapes._RELATION_PHRASES):
            caption = f"{shapes.object_phrase(*a)} {phrase} {shapes.object_phrase(*b)}"
            yield caption, "relation", [(*a, 1), (*b, 1)], shapes.RELATIONS[r]
        if a[0] != b[0] and a[1] != b[1]:
            yield f"{shapes.object_phrase(*a)} and {shapes.object_phrase(*b)}", "binding", [(*a, 1), (*b, 1)], None


def test_parser_covers_the_whole_grammar():
    seen = set()
    for caption, template, objs, relation in _grammar_captions():
        p = parse_prompt(caption)
        assert p.template == template and p.relation == relation and p.caption == caption
        assert p.objects == tuple(ObjectSpec(shapes.SHAPES[s], shapes.COLORS[c], n) for s, c, n in objs)
        seen.add(template)
    assert seen == set(shapes.TEMPLATES)  # a new template needs a parser rule and a category


def test_parser_agrees_with_rendered_labels():
    for i in range(300):
        ex = shapes.render_example(i, "test", 0, 32)
        p = parse_prompt(ex["caption"])
        assert p.template == shapes.TEMPLATES[ex["template"]]
        assert p.num_objects == ex["count"]
        assert p.relation == (shapes.RELATIONS[ex["relation"]] if ex["relation"] >= 0 else None)
        assert (p.objects[0].shape, p.objects[0].color) == (
            shapes.SHAPES[ex["main_shape"]], shapes.COLORS[ex["main_color"]])


def test_relation_phrases_match_the_dataset():
    assert tuple(sg._RELATION_PHRASES[r] for r in shapes.RELATIONS) == shapes._RELATION_PHRASES


@pytest.mark.parametrize("caption, categories", [
    ("a red circle", ("colors", "single_object")),
    ("three red circles", ("counting", "colors")),
    ("a red circle above a blue square", ("position", "two_object", "color_attr")),
    ("a red circle and a blue square", ("color_attr", "two_object")),
    # GenEval-style colourless prompts drop the colour categories.
    ("a photo of a circle", ("single_object",)),
    ("two circles", ("counting",)),
    ("a circle left of a square", ("position", "two_object")),
    ("a circle and a square", ("two_object",)),
])
def test_category_mapping(caption, categories):
    p = parse_prompt(caption)
    assert p.categories == categories and p.category == categories[0]
    assert set(categories) <= set(sg.CATEGORIES)


def test_parser_optional_attributes():
    assert parse_prompt("A photo of an object.").objects == (ObjectSpec(None, None, 1),)
    assert parse_prompt("four green shapes").objects == (ObjectSpec(None, "green", 4),)
    p = parse_prompt("a star right of a blue object")
    assert p.relation == "right" and p.objects == (ObjectSpec("star", None), ObjectSpec(None, "blue"))


@pytest.mark.parametrize("caption, match", [
    ("", "empty"),
    ("a pink circle", "unknown colour 'pink'"),
    ("a red hexagon", "unknown shape 'hexagon'"),
    ("a red circles", "does not agree in number"),
    ("two red circle", "does not agree in number"),
    ("five red circles", "must start with"),
    ("red circle", "must start with"),
    ("a big red circle", "got 'big red circle'"),
    ("a red circle and a blue square and a star", "at most one relation"),
    ("a red circle above a blue square below a star", "at most one relation"),
    ("two red circles and a blue square", "name single objects"),
    ("a red circle above", "empty"),
])
def test_parser_rejects_captions_outside_the_grammar(caption, match):
    with pytest.raises(ValueError, match=match):
        parse_prompt(caption)


# ----------------------------------------------------------------------------------------------
# Validation targets


def test_validation_targets_at_32px():
    r = validate(num=200, resolution=32, seed=0)
    assert r["own_pass_rate"] >= 0.98, r["own_failures"]
    assert r["changed_pass_rate"] <= 0.05, r["changed_passes"]
    assert r["num"] == 200 and r["resolution"] == 32


def test_validation_is_also_good_when_lenient_at_64px():
    r = validate(num=100, resolution=64, seed=1, strict=False)
    assert r["own_pass_rate"] >= 0.98 and r["changed_pass_rate"] <= 0.05


# ----------------------------------------------------------------------------------------------
# Exact failures on hand-made scenes


def test_correct_scene_passes_every_category():
    image = _paint([RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT])
    for caption in ("a red circle to the left of a blue square", "a blue square to the right of a red circle",
                    "a red circle and a blue square", "a circle left of a square"):
        r = check(image, caption)
        assert r.passed and r.reason == "" and all(r.category_passed.values()), (caption, r.reason)


def test_wrong_colour():
    r = check(_paint([("circle", "blue", (0.5, 0.5), 0.15)]), "a red circle")
    assert not r.passed and r.category == "colors"
    assert r.category_passed == {"colors": False, "single_object": True}
    assert r.reason == "colors: expected red circle, found a blue circle (detected: a blue circle)"


def test_missing_object():
    r = check(_paint([RED_CIRCLE_LEFT]), "a red circle and a blue square")
    assert r.category_passed == {"color_attr": False, "two_object": False}
    assert r.reason == ("color_attr: missing a blue square; two_object: missing a square "
                        "(detected: a red circle)")
    r = check(_paint([]), "a red circle")
    assert r.reason == ("colors: no circle to check the colour of; single_object: expected a circle, "
                        "found none (detected: none)")


def test_extra_object_fails_strict_but_not_geneval_rules():
    image = _paint([RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT])
    r = check(image, "a red circle")
    assert r.category_passed == {"colors": True, "single_object": False}
    assert r.reason == ("single_object: unexpected extra object(s): a blue square "
                        "(detected: a red circle, a blue square)")
    assert check(image, "a red circle", strict=False).passed

    three = _paint([RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT, ("star", "green", (0.5, 0.15), 0.1)])
    r = check(three, "a red circle and a blue square")
    assert r.category_passed == {"color_attr": True, "two_object": False}
    assert r.reason.startswith("two_object: unexpected extra object(s): a green star (")
    assert check(three, "a red circle and a blue square", strict=False).passed


def test_swapped_relation():
    r = check(_paint([RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT]), "a red circle to the right of a blue square")
    assert r.category_passed == {"position": False, "two_object": True, "color_attr": True}
    assert r.reason == ("position: expected the red circle to the right of the blue square, found it to "
                        "the left of it (detected: a red circle, a blue square)")
    vertical = _paint([("circle", "red", (0.5, 0.2), 0.12), ("square", "blue", (0.45, 0.75), 0.12)])
    assert check(vertical, "a red circle above a blue square").passed
    r = check(vertical, "a blue square above a red circle")
    assert "found it below it" in r.reason


def test_wrong_count():
    two = _paint([("circle", "red", (0.25, 0.5), 0.1), ("circle", "red", (0.75, 0.5), 0.1)])
    r = check(two, "three red circles")
    assert r.category_passed == {"counting": False, "colors": True}
    assert r.reason == "counting: expected three circles, found 2 (detected: a red circle, a red circle)"
    assert check(two, "two red circles").passed
    # GenEval's counting is exact for the counted class even when other classes may appear.
    extra = _paint([("circle", "red", (0.25, 0.3), 0.1), ("circle", "red", (0.75, 0.3), 0.1),
                    ("square", "blue", (0.5, 0.75), 0.1)])
    assert not check(extra, "two red circles").passed
    assert check(extra, "two red circles", strict=False).passed
    assert not check(extra, "three red circles", strict=False).passed


def test_colour_binding_swap_fails_color_attr_only():
    image = _paint([("circle", "blue", (0.25, 0.5), 0.12), ("square", "red", (0.75, 0.5), 0.12)])
    r = check(image, "a red circle and a blue square")
    assert r.category_passed == {"color_attr": False, "two_object": True}
    assert r.reason.startswith("color_attr: missing a red circle and a blue square (")
    r = check(image, "a red circle to the left of a blue square")
    assert r.category_passed == {"position": False, "two_object": True, "color_attr": False}


def test_same_shape_objects_are_told_apart_by_colour():
    image = _paint([("circle", "red", (0.25, 0.5), 0.12), ("circle", "blue", (0.75, 0.5), 0.12)])
    assert check(image, "a red circle to the left of a blue circle").passed
    assert not check(image, "a blue circle to the left of a red circle").passed
    r = check(_paint([RED_CIRCLE_LEFT]), "a circle and a circle")
    assert r.reason.startswith("two_object: expected two circles, found 1")


def test_mixed_colours_in_a_count():
    image = _paint([("circle", "red", (0.25, 0.5), 0.1), ("circle", "blue", (0.75, 0.5), 0.1)])
    r = check(image, "two red circles")
    assert r.category_passed == {"counting": True, "colors": False}
    assert r.reason.startswith("colors: expected red circles, found a blue circle (")
    r = check(image, "two red circles", strict=False)
    assert r.reason.startswith("colors: expected two red circles, found 1 red (")


# ----------------------------------------------------------------------------------------------
# Noise robustness


def test_despeckle_leaves_renders_unchanged():
    for res in (32, 64):
        for i in range(40):
            image = shapes.render_example(i, "test", 0, res)["image"]
            assert np.array_equal(sg.despeckle(image), image), (res, i)


def test_isolated_pixels_are_repaired():
    clean = _paint([("star", "purple", (0.5, 0.5), 0.09)], res=32)
    noisy = clean.copy()
    noisy[16, 16] = (0, 255, 0)  # inside the star
    noisy[3, 3] = (20, 60, 220)  # on the background, a palette colour
    repaired = sg.despeckle(noisy).astype(np.float32)
    # Medians of a 32 px star's neighbourhood mix in its anti-aliased rim: close, not exact.
    assert np.abs(repaired - clean).max(-1).max() <= 16
    assert check(noisy, "a purple star").passed


def test_tiny_blobs_are_ignored():
    image = _paint([RED_CIRCLE_LEFT])
    image[5:7, 50:52] = shapes.COLOR_RGB[2].astype(np.uint8)  # a 2×2 blue blob: below min_area
    assert check(image, "a red circle").passed
    assert not check(image, "a red circle", min_area=2).passed  # not ignored when told so


def test_random_speckle_robustness():
    rng = np.random.default_rng(0)
    own = changed = 0
    n = 150
    for i in range(n):
        ex = shapes.render_example(i, "test", 0, 32)
        image = ex["image"].copy()
        ys, xs = rng.integers(32, size=10), rng.integers(32, size=10)
        image[ys, xs] = rng.integers(256, size=(10, 3))
        own += check(image, ex["caption"]).passed
        changed += check(image, shapes.negative_caption(ex["caption"], np.random.default_rng(i))).passed
    assert own / n >= 0.97 and changed / n <= 0.05, (own, changed)


def test_mild_gaussian_noise_robustness():
    rng = np.random.default_rng(1)
    n = 60
    own = sum(
        check(np.clip(ex["image"] + rng.normal(0, 8, ex["image"].shape), 0, 255).astype(np.uint8),
              ex["caption"]).passed
        for ex in (shapes.render_example(i, "test", 0, 32) for i in range(n))
    )
    assert own / n >= 0.97, own


# ----------------------------------------------------------------------------------------------
# Input formats and evaluate


def test_input_formats_agree():
    ex = shapes.render_example(3, "test", 0, 64)
    u8 = ex["image"]
    forms = {
        "uint8": u8,
        "[-1, 1]": u8.astype(np.float32) / 127.5 - 1.0,
        "[0, 1]": u8.astype(np.float64) / 255.0,
        "int64": u8.astype(np.int64),
        "explicit range": u8.astype(np.float32) / 255.0 * 2 - 1,
        "overshoot": np.clip(u8.astype(np.float32) / 127.5 - 1.0, -1, 1) * 1.05,
    }
    for name, image in forms.items():
        kwargs = {"value_range": (-1, 1)} if name == "explicit range" else {}
        r = check(image, ex["caption"], **kwargs)
        assert r.passed, (name, r.reason)
        assert [d[:2] for d in r.detections] == [d[:2] for d in check(u8, ex["caption"]).detections]
    assert np.array_equal(sg.to_uint8(forms["[-1, 1]"]), u8)
    assert np.array_equal(sg.to_uint8(forms["[0, 1]"]), u8)


def test_bad_inputs_are_clear_errors():
    image = shapes.render_example(0, "test", 0, 32)["image"]
    with pytest.raises(ValueError, match="H, W, 3"):
        check(image[None], "a red circle")
    with pytest.raises(ValueError, match="H, W, 3"):
        check(image.transpose(2, 0, 1), "a red circle")
    with pytest.raises(ValueError, match="pass uint8"):
        check(image.astype(np.float32), "a red circle")
    with pytest.raises(ValueError, match="unknown shape"):
        check(image, "a red blob")


def test_prompt_objects_are_accepted():
    ex = shapes.render_example(5, "test", 0, 32)
    prompt = parse_prompt(ex["caption"])
    assert check(ex["image"], prompt) == check(ex["image"], ex["caption"])


def test_evaluate_reports_per_category_and_overall():
    exs = [shapes.render_example(i, "test", 0, 32) for i in range(40)]
    rng = np.random.default_rng(0)
    images = np.stack([ex["image"] for ex in exs])
    captions = [ex["caption"] if i % 2 == 0 else shapes.negative_caption(ex["caption"], rng)
                for i, ex in enumerate(exs)]
    out = evaluate(images, captions)
    results = out["results"]
    assert len(results) == 40 and [r.prompt.caption for r in results] == captions
    for cat, acc in out["per_category"].items():
        scored = [r.category_passed[cat] for r in results if cat in r.categories]
        assert out["counts"][cat] == len(scored) and acc == pytest.approx(np.mean(scored))
    assert set(out["per_category"]) == {c for r in results for c in r.categories}
    assert list(out["per_category"]) == [c for c in sg.CATEGORIES if c in out["per_category"]]
    assert out["overall"] == pytest.approx(np.mean(list(out["per_category"].values())))
    assert out["caption_pass_rate"] == pytest.approx(np.mean([r.passed for r in results]))
    assert 0.4 <= out["caption_pass_rate"] <= 0.6  # the own half passes, the changed half fails
    assert evaluate(list(images[:2]), captions[:2])["counts"]  # a list of images works too
    with pytest.raises(ValueError, match="2 images but 3 captions"):
        evaluate(images[:2], captions[:3])
