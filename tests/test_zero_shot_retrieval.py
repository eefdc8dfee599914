"""Zero-shot classification, retrieval recall and prompt templates on constructed embeddings."""

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxunified.data import shapes
from jaxunified.eval.retrieval import (
    caption_groups,
    hit_rate,
    image_text_retrieval,
    rank_stats,
    recall_at_k,
)
from jaxunified.eval.templates import IMAGENET_TEMPLATES, fill_templates, shapes_targets, shapes_tasks
from jaxunified.eval.zero_shot import (
    best_prompt_logits,
    class_embeddings,
    counts_from_logits,
    prompt_embeddings,
    zero_shot_accuracy,
    zero_shot_counts,
    zero_shot_logits,
)
from jaxunified.parallel.mesh import BATCH_AXES, make_mesh


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_ranks(scores, same, q_mask, g_mask):
    """Position of the first relevant item in each query's descending (tie-free) gallery order."""
    ranks = []
    for i in range(scores.shape[0]):
        order = [j for j in np.argsort(-scores[i], kind="stable") if g_mask[j]]
        hits = [pos for pos, j in enumerate(order) if same[i, j]]
        ranks.append(hits[0] if hits and q_mask[i] else None)
    return ranks


# ----------------------------------------------------------------------------------------------
# Templates


def test_imagenet_templates():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    prompts = fill_templates(["cat", "dog"])
    assert len(prompts) == 2 and len(prompts[1]) == 80 and prompts[1][0] == "a bad photo of a dog."
    with pytest.raises(ValueError, match="exactly one"):
        fill_templates(["cat"], ["a photo.", "a {} and a {}."])


def test_shapes_prompts_follow_the_caption_grammar():
    tasks = shapes_tasks()
    colors, names, plurals = "|".join(shapes.COLORS), "|".join(shapes.SHAPES), "|".join(shapes.PLURALS)
    single = re.compile(rf"^(a|an) ({colors}) ({names})$")
    several = re.compile(rf"^(two|three|four) ({colors}) ({plurals})$")

    def parse(prompt):
        if m := single.match(prompt):
            assert m[1] == ("an" if m[2][0] in "aeiou" else "a"), prompt
            return 1, shapes.COLORS.index(m[2]), shapes.SHAPES.index(m[3])
        m = several.match(prompt)
        assert m, f"{prompt!r} is not a shapes caption"
        return ["two", "three", "four"].index(m[1]) + 2, shapes.COLORS.index(m[2]), shapes.PLURALS.index(m[3])

    assert tasks["color"].class_names == shapes.COLORS and tasks["shape"].class_names == shapes.SHAPES
    assert tasks["count"].class_names == ("one", "two", "three", "four")
    n_s, n_c, n_n = len(shapes.SHAPES), len(shapes.COLORS), shapes.MAX_OBJECTS
    for name, attr in (("count", 0), ("color", 1), ("shape", 2)):
        task = tasks[name]
        assert len(task.prompts) == len(task.class_names)
        for cls, prompts in enumerate(task.prompts):
            parsed = [parse(p) for p in prompts]
            assert all(p[attr] == (cls + 1 if name == "count" else cls) for p in parsed), (name, cls)
            # Ensembles over every combination of the other attributes, each once.
            others = {tuple(v for a, v in enumerate(p) if a != attr) for p in parsed}
            assert len(others) == len(prompts) == n_s * n_c * n_n // len(task.class_names)

    # Every rendered single/count caption is a prompt of its ground-truth class in every valid task.
    examples = [shapes.render_example(i, "test", resolution=32) for i in range(300)]
    labels = {k: np.stack([e[k] for e in examples]) for k in shapes.LABEL_KEYS}
    targets = jax.tree.map(np.asarray, shapes_targets(labels))
    seen = 0
    for i, ex in enumerate(examples):
        if shapes.TEMPLATES[int(ex["template"])] not in ("single", "count"):
            continue
        seen += 1
        for name, (cls, valid) in targets.items():
            assert valid[i], (name, ex["caption"])
            assert ex["caption"] in tasks[name].prompts[cls[i]], (name, ex["caption"])
    assert seen > 100


def test_shapes_targets_validity():
    examples = [shapes.render_example(i, "test", resolution=32) for i in range(200)]
    labels = {k: np.stack([e[k] for e in examples]) for k in shapes.LABEL_KEYS}
    mask = np.arange(200) < 190
    out = jax.tree.map(np.asarray, jax.jit(shapes_targets)(labels, mask))
    n = [int(e["count"]) for e in examples]
    same_color = np.array([len(set(e["obj_color"][: n[i]])) == 1 for i, e in enumerate(examples)])
    same_shape = np.array([len(set(e["obj_shape"][: n[i]])) == 1 for i, e in enumerate(examples)])
    assert 0 < same_color.sum() < 200 and 0 < same_shape.sum() < 200
    np.testing.assert_array_equal(out["color"][0], labels["main_color"])
    np.testing.assert_array_equal(out["shape"][0], labels["main_shape"])
    np.testing.assert_array_equal(out["count"][0], labels["count"] - 1)
    np.testing.assert_array_equal(out["color"][1], same_color & mask)
    np.testing.assert_array_equal(out["shape"][1], same_shape & mask)
    np.testing.assert_array_equal(out["count"][1], mask)
    with pytest.raises(ValueError, match="obj_mask"):
        shapes_targets({k: v for k, v in labels.items() if k != "obj_mask"})


# ----------------------------------------------------------------------------------------------
# Zero-shot


def test_class_embeddings_ensemble_math():
    rng = np.random.default_rng(0)
    prompts = [["a", "b", "c"], ["d"], ["e", "f"]]
    table = {p: rng.normal(size=4).astype(np.float32) * (i + 1) for i, p in enumerate("abcdef")}
    calls = []

    def encode(batch):
        calls.append(list(batch))
        return np.stack([table[p] for p in batch])

    out = np.asarray(class_embeddings(encode, prompts, batch_size=4))
    assert [len(c) for c in calls] == [4, 4] and calls[1] == ["e", "f", "f", "f"]  # padded to one shape
    want = _unit(np.stack([np.mean([_unit(table[p]) for p in ps], axis=0) for ps in prompts]))
    np.testing.assert_allclose(out, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)

    with pytest.raises(ValueError, match=r"\[4, D\]"):
        class_embeddings(lambda b: np.zeros((len(b) - 1, 4)), prompts, batch_size=4)
    with pytest.raises(ValueError, match="class 1"):
        class_embeddings(encode, [["a"], []])


def test_best_prompt_scoring_reads_the_best_caption():
    # Class 0's prompts are (x, y), class 1's are (x + y) / |x + y|: an image at y matches class 0's
    # second prompt exactly, yet the class-0 mean (x + y) equals class 1's embedding — the mean
    # ensemble ties the classes while the best prompt separates them.
    x, y = np.eye(3, dtype=np.float32)[:2]
    table = {"x": x, "y": y, "xy": (x + y) / np.sqrt(2)}
    embs, owner = prompt_embeddings(lambda b: np.stack([table[p] for p in b]), [["x", "y"], ["xy"]], batch_size=2)
    np.testing.assert_array_equal(owner, [0, 0, 1])
    images = np.stack([y, (x + y) / np.sqrt(2), x])
    best = np.asarray(best_prompt_logits(images, embs, owner))
    np.testing.assert_allclose(best, [[1.0, 1 / np.sqrt(2)], [1 / np.sqrt(2), 1.0], [1.0, 1 / np.sqrt(2)]], atol=1e-6)
    mean = np.asarray(zero_shot_logits(images, class_embeddings(lambda b: np.stack([table[p] for p in b]),
                                                                 [["x", "y"], ["xy"]], batch_size=2)))
    np.testing.assert_allclose(mean[:, 0], mean[:, 1], atol=1e-6)
    counts = counts_from_logits(best, np.array([0, 1, 0]), ks=(1,))
    assert float(counts["top1"]) == 3 and float(counts["count"]) == 3
    np.testing.assert_allclose(jax.jit(lambda i, e: best_prompt_logits(i, e, owner))(images, embs), best, atol=1e-6)


def test_zero_shot_accuracy_known_answers():
    classes = np.eye(6, dtype=np.float32)
    # Image i is closest to class i, then class i+1, ...: its true class (labels) sits at rank r_i.
    ranks = np.array([0, 1, 2, 4, 5, 0, 3, 0])
    labels = np.arange(8) % 6
    images = np.zeros((8, 6), np.float32)
    for i, (label, r) in enumerate(zip(labels, ranks)):
        order = [(label - r + j) % 6 for j in range(6)]  # best first; the true class is at position r
        images[i, order] = np.linspace(1.0, 0.5, 6)
    mask = np.ones(8, bool)
    mask[5] = False  # a correct but padded row
    acc = zero_shot_accuracy(images, classes * 3.0, labels, mask)
    np.testing.assert_allclose(acc["top1"], 2 / 7, rtol=1e-6)
    np.testing.assert_allclose(acc["top5"], 6 / 7, rtol=1e-6)
    counts = zero_shot_counts(images, classes, labels, mask)
    assert float(counts["count"]) == 7 and float(counts["top1"]) == 2
    assert set(zero_shot_accuracy(images[:, :4], classes[:4, :4], labels % 4)) == {"top1"}  # C < 5
    np.testing.assert_allclose(zero_shot_logits(images, classes), _unit(images), atol=1e-6)

    # Sharded over the 8 devices' batch axis under jit: the same sums.
    mesh = make_mesh((2, 4, 1))
    sharded = jax.device_put(images, NamedSharding(mesh, P(BATCH_AXES, None)))
    fn = jax.jit(lambda x, c, y, m: zero_shot_counts(x, c, y, m))
    got = fn(sharded, classes, labels, mask)
    assert len(sharded.sharding.device_set) == 8
    for k in counts:
        np.testing.assert_allclose(got[k], counts[k])
    # All classes tied (a collapsed model) is chance level, not a perfect score.
    np.testing.assert_allclose(zero_shot_accuracy(np.zeros((8, 6)), classes, labels)["top1"], 1 / 6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Retrieval


def test_identity_and_permuted_galleries():
    e = np.eye(6, dtype=np.float32)
    out = image_text_retrieval(e, e, np.arange(6))
    assert {k: float(v) for k, v in out.items()} == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}
    # Text j is image j's caption, but its embedding is image perm[j]'s: query i ranks its
    # relevant text exactly where the score order puts it.
    perm = np.array([1, 0, 3, 2, 5, 4])
    scores = np.array([[6 - abs(i - j) + 0.01 * j for j in range(6)] for i in range(6)], np.float32)
    stats = rank_stats(np.eye(6, dtype=np.float32), scores.T[perm], np.arange(6), np.arange(6), normalize=False)
    want = _brute_ranks(scores[:, perm], np.eye(6, dtype=bool), np.ones(6, bool), np.ones(6, bool))
    np.testing.assert_array_equal(stats.greater, want)
    assert list(want) == [1, 2, 1, 2, 1, 1]
    np.testing.assert_array_equal(stats.tied_other, 0)


def test_random_scores_match_brute_force_and_chunking():
    rng = np.random.default_rng(1)
    n_q, n_g = 23, 31
    scores = rng.permutation(n_q * n_g).reshape(n_q, n_g).astype(np.float32)  # distinct: no ties
    q_groups, g_groups = rng.integers(0, 9, n_q), rng.integers(0, 9, n_g)
    q_mask, g_mask = rng.random(n_q) < 0.9, rng.random(n_g) < 0.8
    same = q_groups[:, None] == g_groups[None]
    want = _brute_ranks(scores, same, q_mask, g_mask)
    queries, gallery = np.eye(n_q, dtype=np.float32), np.ascontiguousarray(scores.T)
    kw = dict(query_mask=q_mask, gallery_mask=g_mask, normalize=False)
    for chunk in (1, 5, 1024):
        stats = rank_stats(queries, gallery, q_groups, g_groups, chunk_size=chunk, **kw)
        has = np.asarray(stats.has_relevant)
        np.testing.assert_array_equal(has, [r is not None for r in want])
        np.testing.assert_array_equal(np.asarray(stats.greater)[has], [r for r in want if r is not None])
        np.testing.assert_array_equal(np.asarray(stats.tied_other)[has], 0)
    recall = recall_at_k(queries, gallery, q_groups, g_groups, ks=(1, 3, 5), chunk_size=7, **kw)
    for k in (1, 3, 5):
        hits = [r is not None and r < k for r, m in zip(want, q_mask) if m]
        np.testing.assert_allclose(recall[k], np.mean(hits), rtol=1e-6)


def test_duplicates_and_masks():
    # Gallery texts 0 and 1 share a caption; query 0's nearest is text 1 → still a hit at rank 0.
    queries = _unit(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32))
    gallery = _unit(np.array([[0.8, 0.6, 0.0], [1.0, 0.1, 0.0], [0.9, 0.0, 0.3], [0.0, 1.0, 0.0]], np.float32))
    groups = caption_groups(["a red circle", "a red circle", "a blue star", "two green squares"])
    q_groups = caption_groups(["a red circle", "two green squares"])
    stats = rank_stats(queries, gallery, q_groups, groups)
    np.testing.assert_array_equal(stats.greater, [0, 0])
    # Masking the nearer duplicate: text 2 (another caption, score 0.95) now beats text 0 (0.8).
    stats = rank_stats(queries, gallery, q_groups, groups, gallery_mask=np.array([True, False, True, True]))
    np.testing.assert_array_equal(stats.greater, [1, 0])
    # A masked competitor never counts: text 2 padded → rank 0 again.
    stats = rank_stats(queries, gallery, q_groups, groups, gallery_mask=np.array([True, False, False, True]))
    np.testing.assert_array_equal(stats.greater, [0, 0])
    # No relevant item left → a miss, not a hit; masked queries leave the mean.
    r = recall_at_k(queries, gallery, q_groups, groups, ks=(1,), gallery_mask=np.array([False, False, True, True]))
    np.testing.assert_allclose(r[1], 0.5)
    r = recall_at_k(queries, gallery, q_groups, groups, ks=(1,), query_mask=np.array([False, True]),
                    gallery_mask=np.array([False, False, True, True]))
    np.testing.assert_allclose(r[1], 1.0)


def test_caption_groups():
    caps = ["a red circle", "an orange star", "a red circle", "A red circle", ""]
    g = caption_groups(caps)
    assert g.shape == (5, 2) and g.dtype == np.int32
    same = (g[:, None] == g[None]).all(-1)
    np.testing.assert_array_equal(same, np.array([[a == b for b in caps] for a in caps]))
    np.testing.assert_array_equal(g, caption_groups(np.array(caps, dtype=object)))  # deterministic
    with pytest.raises(ValueError, match="single string"):
        caption_groups("a red circle")


@pytest.mark.parametrize("k", [1, 2, 5])
def test_hit_rate_is_expected_recall_under_random_tie_breaks(k):
    for greater, tied, rel in itertools.product(range(4), range(5), range(1, 4)):
        items = [0] * tied + [1] * rel
        perms = set(itertools.permutations(items))
        want = np.mean([greater + p.index(1) < k for p in perms])
        got = float(hit_rate(greater, tied, rel, k))
        assert math.isclose(got, want, abs_tol=1e-6), (greater, tied, rel, k, got, want)
    assert float(hit_rate(0, 3, 0, k)) == 0.0  # nothing relevant


def test_sharded_gallery_equals_unsharded():
    rng = np.random.default_rng(2)
    n, d = 37, 8  # 37 rows: the gallery is padded to divide the 8 shards
    images = rng.normal(size=(n, d)).astype(np.float32)
    texts = (images + 0.8 * rng.normal(size=(n, d))).astype(np.float32)
    captions = [f"caption {i % 30}" for i in range(n)]  # some duplicates
    groups, mask = caption_groups(captions), np.arange(n) < 35
    mesh = make_mesh((2, 4, 1))
    ref = image_text_retrieval(images, texts, groups, image_mask=mask, chunk_size=1024)
    got = image_text_retrieval(images, texts, groups, image_mask=mask, chunk_size=8, mesh=mesh)
    assert 0.2 < float(ref["i2t_r1"]) < 1.0  # non-trivial
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-6)

    # Pre-sharded global arrays work as inputs, and the gallery counts are reduced across devices.
    put = lambda a: jax.device_put(a[:32], NamedSharding(mesh, P(BATCH_AXES, *([None] * (a.ndim - 1)))))  # noqa: E731
    args = [put(a) for a in (texts, images, groups, groups)]
    stats = rank_stats(*args, chunk_size=8, mesh=mesh)
    ref_stats = rank_stats(texts[:32], images[:32], groups[:32], groups[:32])
    for a, b in zip(stats, ref_stats):
        np.testing.assert_array_equal(a, b)
    from jaxunified.eval.retrieval import _rank_stats

    hlo = _rank_stats.lower(
        *args, jnp.ones(32, bool), jnp.ones(32, bool), chunk_size=8, mesh=mesh, normalize=True
    ).compile().as_text()
    assert "all-reduce" in hlo


def test_retrieval_input_errors():
    e = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"\[Q, D\]"):
        rank_stats(e, np.eye(5, dtype=np.float32), np.arange(4), np.arange(5))
    with pytest.raises(ValueError, match="gallery_groups"):
        rank_stats(e, e, np.arange(4), np.arange(3))
    with pytest.raises(ValueError, match="integer"):
        rank_stats(e, e, np.arange(4), np.arange(4.0))
    with pytest.raises(ValueError, match="words per id"):
        rank_stats(e, e, np.arange(4), caption_groups(list("abcd")))
    with pytest.raises(ValueError, match="query_mask"):
        rank_stats(e, e, np.arange(4), np.arange(4), query_mask=np.ones(3, bool))
