"""Task ``mllm`` and its chat data: answers only are supervised, questions are unambiguous and
right for their scene, caption attribute scoring, padded prompts answer as alone, only the MLLM
trains, and a tiny run trains, answers and loads back."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunified.data import shapes, shapes_chat
from jaxunified.sample.lm import cache_layout, left_pad, prefill_and_step
from jaxunified.train import loop as looplib
from jaxunified.train import mllm as M
from tests import helpers
from tests.helpers import one_step


def tiny_config(**kw):
    return helpers.tiny_config("mllm", **kw)


def test_only_the_answer_and_its_end_are_supervised():
    vocab = shapes_chat.ChatVocab()
    labels = shapes.render_example(3, "test", resolution=32)
    ex = shapes_chat.understanding_example(vocab, labels, "caption", 64, 96, np.random.default_rng(0))
    tokens, mask = ex["tokens"], ex["loss_mask"]
    targets = tokens[1:][mask[:-1] > 0]  # position t predicts token t + 1
    assert vocab.decode(targets) == labels["caption"] and targets[-1] == shapes_chat.IM_END
    assert tokens[shapes_chat.IMAGE_START - 1] == shapes_chat.VISION_START
    assert (tokens[shapes_chat.IMAGE_START:shapes_chat.IMAGE_START + 64] == shapes_chat.IMAGE_PAD).all()


def test_task_weights_set_how_often_each_conversation_kind_is_drawn():
    vocab = shapes_chat.ChatVocab()
    labels = shapes.render_example(3, "test", resolution=32)

    def answers(weights, n):
        t, rng = M.ChatExamples(64, 96, weights), np.random.default_rng(0)
        rows = [t.random_map(labels, rng) for _ in range(n)]
        return [vocab.decode(r["tokens"][1:][r["loss_mask"][:-1] > 0][:-1]) for r in rows]

    assert set(answers({"caption": 1.0}, 20)) == {labels["caption"]}
    share = np.mean([a == labels["caption"] for a in answers({**dict.fromkeys(shapes_chat.TASKS, 1.0), "caption": 3.0},
                                                              600)])
    assert 0.25 < share < 0.45  # 3 of 9 before redraws of kinds the scene cannot answer
    assert M.task_probabilities(dict.fromkeys(shapes_chat.TASKS, 2.0)) is None  # uniform: the old draws
    for bad in ({"bogus": 1.0}, {"color": 1.0}, {"caption": -1.0, "count": 2.0}):
        with pytest.raises(ValueError, match="task_weights"):
            M.task_probabilities(bad)


def test_questions_are_unambiguous_and_answered_from_the_scene():
    rng = np.random.default_rng(0)
    asked = {k: 0 for k in shapes_chat.QA_TYPES}
    for i in range(300):
        lab = shapes.render_example(i, "test", resolution=32)
        objs = [(shapes.SHAPES[lab["obj_shape"][j]], shapes.COLORS[lab["obj_color"][j]]) for j in range(lab["count"])]
        for kind in shapes_chat.QA_TYPES:
            qa = shapes_chat.question_answer(lab, kind, rng)
            if qa is None:
                continue
            asked[kind] += 1
            q, a = qa
            shapes_chat.ChatVocab().encode(q + " " + a)  # every word is in the vocabulary
            if kind == "count":
                assert a == shapes_chat.COUNT_WORDS[len(objs) - 1]
            elif kind == "color":
                shape = q.split()[-1]
                assert {c for s, c in objs if s == shape} == {a}
            elif kind == "shape":
                color = q.split()[-2]
                assert {s for s, c in objs if c == color} == {a}
            elif kind == "relation":
                assert a == shapes_chat.RELATION_ANSWERS[lab["relation"]]
            else:
                words = q.split()
                assert ((words[-1], words[-2]) in objs) == (a == "yes")
    assert min(asked.values()) > 30, asked


def test_caption_attribute_accuracy_judges_the_scene_not_the_wording():
    f = M.caption_attribute_accuracy
    # a red circle left of a blue square (centres), and the same scene's binding caption
    objs = [(0, 0, 0, (0.25, 0.5)), (1, 2, 0, (0.75, 0.5))]
    truth = "a red circle to the left of a blue square"
    assert f(truth, truth, objs) == 1.0
    assert f(truth, "a blue square to the right of a red circle", objs) == 1.0
    assert f(truth, "a red circle to the right of a blue square", objs) == pytest.approx(6 / 7)
    assert f(truth, "a red circle and a blue square", objs) == pytest.approx(6 / 7)  # relation unsaid
    assert f("a red circle and a blue square", "a blue square and a red circle", objs) == 1.0
    assert f("a red circle and a blue square", "a blue circle and a red square", objs) == pytest.approx(4 / 6)
    three = [(3, 1, 0, (0.2, 0.2)), (3, 1, 0, (0.5, 0.5)), (3, 1, 0, (0.8, 0.8))]
    assert f("three green stars", "two green stars", three) == pytest.approx(2 / 3)
    assert f("a red circle", "red red below", objs[:1]) == 0.0


@pytest.fixture(scope="module")
def task():
    t, params, colls = helpers.tiny_task(M.MLLMTask, tiny_config())
    return t, params["mllm"], colls


def test_a_padded_prompt_answers_as_it_would_alone(task):
    t, params, colls = task
    n = t.model_cfg.num_image_tokens
    vocab = shapes_chat.ChatVocab()
    prompts = [shapes_chat.understanding_ids(vocab, q, n) for q in
               ("where is the red circle relative to the blue square", "how many objects are there")]
    r = int(t.config.data.resolution)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, r, r, 3)), jnp.float32)
    vision = t.vision_vectors(colls["frozen"], images)
    ids, valid = left_pad(prompts, shapes_chat.PAD, bucket=8)
    _, pads, _ = cache_layout(jnp.asarray(valid), 1)
    start = pads[:, 0] + shapes_chat.IMAGE_START
    first, _, _ = prefill_and_step(t.model, params, jnp.asarray(ids), jnp.asarray(valid), 1,
                                   {"vision": vision, "image_start": start})
    alone = t.model.apply({"params": params}, jnp.asarray([prompts[1]]), vision[1:])["logits"][0, -1]
    np.testing.assert_allclose(np.asarray(first[1]), np.asarray(alone), atol=2e-5)


def test_step_trains_only_the_mllm_and_the_vision_model_stays_bit_identical(task):
    t, _, colls = task
    b = t.dummy_batch()
    b["image"] = np.random.default_rng(0).uniform(-1, 1, b["image"].shape).astype(np.float32)
    b["loss_mask"][:, 70:75] = 1.0
    params, new_colls, metrics = one_step(tiny_config(), jax.devices(), b)
    assert set(params) == {"mllm"} and np.isfinite(metrics["loss"])
    for x, y in zip(jax.tree.leaves(colls["frozen"]), jax.tree.leaves(new_colls["frozen"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cached_vision_vectors_give_the_pixel_batches_conversations_and_loss(task, tmp_path):
    t, params, colls = task
    config = tiny_config(**{"data.cache_dir": str(tmp_path), "data.build_cache": False})
    tc = M.MLLMTask(config, t.mesh)
    with pytest.raises(FileNotFoundError, match="build_cache"):
        tc.build_dataset("train")
    config.unlock()
    config.data.build_cache = True
    cached = next(iter(tc.build_dataset("train")))
    pixels = next(iter(t.build_dataset("train")))
    assert "image" not in cached and cached["vision"].dtype == np.float32
    for k in ("tokens", "loss_mask", "has_image"):  # the same shuffled images get the same conversations
        np.testing.assert_array_equal(cached[k], pixels[k], err_msg=k)
    vectors = jax.jit(t.vision_vectors)(colls["frozen"], jnp.asarray(pixels["image"]))
    np.testing.assert_allclose(cached["vision"], vectors, rtol=1e-5, atol=1e-6)
    loss = jax.jit(lambda b: t.loss_and_metrics(params, colls, b)[0])
    step_fields = ("tokens", "loss_mask", "has_image")
    np.testing.assert_allclose(float(loss({k: jnp.asarray(cached[k]) for k in step_fields + ("vision",)})),
                               float(loss({k: jnp.asarray(pixels[k]) for k in step_fields + ("image",)})), rtol=1e-5)
    example = tc.train_batch_example()  # what bench and AOT plans compile the step for
    assert set(example) == set(step_fields) | {"vision"}
    for k, v in example.items():
        assert (v.shape[1:], v.dtype) == (cached[k].shape[1:], cached[k].dtype), k
    key = tc.cache_key()
    tc.vision._variables = jax.tree.map(lambda x: np.asarray(x) + 1.0, tc.vision._variables)  # a retrained tower
    assert tc.cache_key() != key


@pytest.mark.slow
def test_tiny_run_trains_answers_and_loads_back(tmp_path):
    from jaxunified.train.runs import load_run

    config = tiny_config(total_steps=8, **{"optim.lr": 3e-3})
    looplib.Trainer(config, tmp_path).run()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    ev = [x for x in lines if x["split"] == "eval"][-1]
    assert {f"qa_{k}" for k in shapes_chat.QA_TYPES} | {"qa_mean", "caption_attr_acc", "caption_exact"} <= set(ev)
    rows = json.loads(next(tmp_path.glob("answers_test_*.json")).read_text())
    assert {r["kind"] for r in rows} == set(shapes_chat.TASKS)
    _, model, variables = load_run(tmp_path)
    c = model.config
    out = model.apply(variables, jnp.zeros((1, 80), jnp.int32), jnp.zeros((1, c.num_image_tokens, c.vision_dim)))
    assert out["logits"].shape == (1, 80, shapes_chat.ChatVocab().size)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["toklip", "dualtoken"])
def test_tiny_mllm_reads_a_toklip_or_dualtoken_run(tmp_path, kind):
    helpers.untrained_run(kind, tmp_path / kind)
    config = tiny_config(total_steps=2, **{"vision.kind": kind, "vision.source.kind": "workdir",
                                           "vision.source.workdir": str(tmp_path / kind),
                                           "data.max_len": 288 if kind == "toklip" else 96})  # 16×16 TokLIP tokens
    t, _, colls = helpers.tiny_task(M.MLLMTask, config)
    c = t.model_cfg
    r = int(config.data.resolution)
    vectors = t.vision_vectors(colls["frozen"], jnp.zeros((2, r, r, 3)))
    assert vectors.shape == (2, c.num_image_tokens, c.vision_dim)
    if kind == "toklip":  # code embeddings ⊕ causal features
        assert c.vision_dim == t.vision.model.cfg.vq.vq.embed_dim + t.vision.model.cfg.width
    looplib.Trainer(config, tmp_path / "mllm").run()
    ev = [json.loads(x) for x in (tmp_path / "mllm" / "metrics.jsonl").read_text().splitlines()][-1]
    assert ev["split"] == "eval" and "qa_mean" in ev


def test_select_layer_reads_llavas_hidden_state_and_rejects_what_it_cannot():
    from jaxunified.train.vision_input import VisionInput

    config = tiny_config(**{"vision.select_layer": -2})
    r = int(config.data.resolution)
    vi = VisionInput(config.vision, r)
    variables = vi.frozen_variables()
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, r, r, 3)), jnp.float32)
    hidden = vi.model.apply(variables, x, return_hidden=True)["hidden_states"]
    np.testing.assert_array_equal(np.asarray(vi.vectors(variables, x)), np.asarray(hidden[-2]))
    last = VisionInput(tiny_config().vision, r)
    assert not np.allclose(np.asarray(last.vectors(variables, x)), np.asarray(hidden[-2]))
    depth = vi.model.cfg.depth
    with pytest.raises(ValueError, match="select_layer"):
        VisionInput(tiny_config(**{"vision.select_layer": -(depth + 2)}).vision, r)
    with pytest.raises(ValueError, match="select_layer"):
        VisionInput(tiny_config(**{"vision.select_layer": -1, "vision.kind": "vq"}).vision, r)
