"""Task ``toklip``: cached batches give the image batch's loss, frozen parts stay out of the
optimizer and never move, per-device step == global step, and a tiny run trains and evaluates."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunified.data import cache
from jaxunified.data.pipeline import build_dataset
from jaxunified.nn.transformer import stack_layers
from jaxunified.parallel import mesh as meshlib
from jaxunified.train import loop as looplib
from jaxunified.train import toklip as T
from tests import helpers
from tests.helpers import one_step


def tiny_config(**kw):
    return helpers.tiny_config("toklip", **kw)


@pytest.fixture(scope="module")
def task():
    t = T.TokLIPTask(tiny_config(), meshlib.make_mesh((1, -1, 1)))
    batch = t.dummy_batch()
    params, colls = jax.jit(lambda k: t.init_variables(k, batch))(jax.random.key(0))
    return t, nn.meta.unbox(params)["student"], nn.meta.unbox(colls)["frozen"]


def test_cached_batch_gives_the_image_batch_loss(task, tmp_path):
    t, student, frozen = task
    source, data = cache.in_order_batches(t.config.data, "train", 16)
    host = next(data)
    images = {"image": jnp.asarray(host["image"]), "tokens": jnp.asarray(host["tokens"])}

    path = t.precompute_cache(frozen, "train", tmp_path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    assert arrays["codes"].shape == (256, 16, 16) and arrays["teacher_embeds"].shape == (256, 32)
    _, cached_data = cache.in_order_batches(t.config.data, "train", 16, source=cache.CachedSource(source, arrays))
    cached = next(cached_data)
    assert "image" not in cached  # training from the cache reads no pixels
    cached = {k: jnp.asarray(cached[k]) for k in ("codes", "teacher_embeds", "text_embeds")}

    loss = jax.jit(lambda s, b: t.loss_and_metrics(s, frozen, b)[1])
    a, b = loss(student, images), loss(student, cached)
    np.testing.assert_array_equal(np.asarray(cached["codes"]).reshape(16, -1),
                                  np.asarray(jax.jit(t.codes)(frozen, images)).reshape(16, -1))
    for k in ("loss", "contrastive", "distill_mse"):
        np.testing.assert_allclose(float(b[k]), float(a[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    # Codes alone (teacher and text still from pixels and tokens) give it too.
    np.testing.assert_allclose(float(loss(student, {**images, "codes": cached["codes"]})["loss"]), float(a["loss"]),
                               rtol=1e-6)

    # The training iterator over the cache: shuffled, fixed-shape batches without pixels.
    assert path == cache.cache_path(tmp_path, "train", t.cache_key())
    it = cache.cached_dataset(t.config.data, "train", t.mesh, cache.cache_path(tmp_path, "train", t.cache_key()))
    batch = next(it)
    assert batch["codes"].shape == (16, 16, 16) and batch["codes"].dtype == np.int32 and "image" not in batch


def test_task_builds_its_cache_on_first_use_and_keys_it_by_the_frozen_weights(task, tmp_path):
    t, _, _ = task
    data = t.config.data
    old = data.cache_dir, data.build_cache
    try:
        data.cache_dir = str(tmp_path)
        data.build_cache = False
        with pytest.raises(FileNotFoundError, match="build_cache"):
            t.build_dataset("train")
        data.build_cache = True
        batch = next(iter(t.build_dataset("train")))
        assert {"codes", "teacher_embeds", "text_embeds"} <= set(batch) and "image" not in batch
        example = t.train_batch_example()  # what bench and AOT plans compile the step for
        assert set(example) == {"codes", "teacher_embeds", "text_embeds"}
        for k, v in example.items():
            assert (v.shape[1:], v.dtype) == (batch[k].shape[1:], batch[k].dtype), k
        assert cache.cache_path(tmp_path, "train", t.cache_key()).exists()
        key = t.cache_key()
        teacher = t._teacher_params
        t._teacher_params = jax.tree.map(lambda x: np.asarray(x) + 1.0, teacher)  # a retrained teacher
        try:
            assert t.cache_key() != key
        finally:
            t._teacher_params = teacher
    finally:
        data.cache_dir, data.build_cache = old


def test_hard_negatives_reach_the_contrastive_loss_but_not_the_cache_key(task, tmp_path):
    from jaxunified.losses import contrastive

    t, student, frozen = task
    text = t.config.data.text
    key = t.cache_key()
    path = t.precompute_cache(frozen, "train", tmp_path, key=key)
    old = text.hard_negatives, text.negative_kinds
    try:
        text.hard_negatives, text.negative_kinds = 2, ("shape",)
        assert t.cache_key() == key  # drawn per step, never cached
        batch = next(cache.cached_dataset(t.config.data, "train", t.mesh, cache.cache_path(tmp_path, "train", key)))
    finally:
        text.hard_negatives, text.negative_kinds = old
    assert path.exists() and batch["neg_tokens"].shape == (16, 2, 16)
    batch = {k: jnp.asarray(batch[k]) for k in ("codes", "teacher_embeds", "text_embeds", "neg_tokens")}
    got = jax.jit(lambda s, b: t.loss_and_metrics(s, frozen, b)[1])(student, batch)

    z_img = t.student_embeds(student, frozen, batch["codes"])
    negs = t.caption_embeds(frozen, batch["neg_tokens"].reshape(32, -1))
    want, _ = contrastive.clip_loss(z_img, batch["text_embeds"], student["logit_scale"], negatives=negs)
    plain, _ = contrastive.clip_loss(z_img, batch["text_embeds"], student["logit_scale"])
    np.testing.assert_allclose(float(got["contrastive"]), float(want), rtol=1e-5)
    assert float(want) > float(plain)  # the negatives joined every image's softmax


def test_student_starts_from_teacher_and_frozen_parts_are_not_params(task):
    t, student, frozen = task
    assert set(student) == {"adapter", "vision", "logit_scale"}
    assert set(frozen) == {"tokenizer", "teacher"}
    assert set(frozen["tokenizer"]) == {"encoder", "quant_conv", "quantize"}  # no decoder loaded
    tv = frozen["teacher"]["vision"]
    chex.assert_trees_all_equal(student["vision"]["encoder"], tv["encoder"])
    chex.assert_trees_all_equal(student["vision"]["head"], tv["head"])
    assert "patch_embed" not in student["vision"]
    # The teacher reads 4-px patches (8×8), the student 2-px codes (16×16): bilinear resize.
    assert tv["pos_embedding"].shape == (64, 32) and student["vision"]["pos_embedding"].shape == (256, 32)
    assert float(student["logit_scale"]) == pytest.approx(float(np.log(10.0)))


def test_scanned_student_from_unscanned_teacher(task):
    t, student, frozen = task
    cfg = dataclasses.replace(t.model_cfg, vision=dataclasses.replace(t.model_cfg.vision, scan=True))
    fresh = {**student, "vision": {**student["vision"], "encoder": stack_layers(student["vision"]["encoder"], 1)}}
    out = T.student_from_teacher(fresh, frozen["teacher"], cfg, t.teacher_cfg)
    np.testing.assert_array_equal(out["vision"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"][0],
                                  frozen["teacher"]["vision"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"])
    wide = dataclasses.replace(t.teacher_cfg, vision=dataclasses.replace(t.teacher_cfg.vision, width=48))
    with pytest.raises(ValueError, match="does not fit"):
        bad = jax.tree.map(lambda x: np.zeros(x.shape[:-1] + (48,)) if x.ndim else x, frozen["teacher"])
        T.student_from_teacher(student, bad, t.model_cfg, wide)


@pytest.mark.parametrize("form", ["global", "per_device"])
def test_step_trains_only_the_student(form):
    sgd = {"optim.name": "sgd", "optim.lr": 0.1, "optim.warmup_steps": 0}
    config = tiny_config(step_form=form, **sgd)
    one = looplib.Trainer(config, "/tmp/unused", devices=jax.devices()[:1])
    state = one.init_state()
    n_student = len(jax.tree.leaves(state.params["student"]))
    assert set(state.params) == {"student"}  # the optimizer never sees the frozen parts
    assert len(jax.tree.leaves(state.opt_state)) <= n_student + 2
    batch = next(iter(build_dataset(config.data, "train", one.mesh)))
    batch = {k: batch[k] for k in ("image", "tokens")}
    ref = one_step(tiny_config(step_form="global", **sgd), jax.devices()[:1], batch)
    got = one_step(config, jax.devices(), batch)
    chex.assert_trees_all_close(got[2]["loss"], ref[2]["loss"], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(got[0], ref[0], atol=2e-5, rtol=2e-4)
    chex.assert_trees_all_equal(got[1]["frozen"], jax.device_get(state.collections["frozen"]))
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), got[0]["student"], jax.device_get(state.params["student"]))
    assert moved["adapter"]["vq_table"]["kernel"] > 0 and moved["vision"]["head"]["probe"] > 0


def test_weight_decay_groups_match_the_reference():
    from jaxunified.train.optim import decay_mask

    config = tiny_config()
    trainer = looplib.Trainer(config, "/tmp/unused", devices=jax.devices()[:1])
    params = trainer.abstract_state.params["student"]
    mask = decay_mask(params)

    def reference(path, x):  # open_clip main.py: ndim < 2, or "bn"/"ln"/"bias"/"logit_scale" in the name
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not (x.ndim < 2 or "bias" in name or "ln" in name.split("/")[-2:] or "logit_scale" in name)

    want = jax.tree_util.tree_map_with_path(reference, params)
    assert jax.tree.leaves(mask) == jax.tree.leaves(want)


@pytest.mark.slow
def test_tiny_run_trains_and_evaluates_with_teacher(tmp_path):
    import json

    from jaxunified.train.evaluate import evaluate_run

    # With the shapes preset's optional causal stem and blockwise attention, so both round-trip
    # through the run's config.json.
    config = tiny_config(total_steps=6, **{"model.causal_stem": ((8, 3),), "model.vision.causal_chunks": 4})
    looplib.Trainer(config, tmp_path).run()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert train[-1]["distill_mse"] < train[0]["distill_mse"]
    evals = [x for x in lines if x["split"] == "eval"]
    assert {"zs_color_top1", "i2t_r1", "teacher_zs_shape_top1", "teacher_t2i_r5"} <= set(evals[-1])
    again = evaluate_run(config, tmp_path)
    assert again["zs_color_top1"] == pytest.approx(evals[-1]["zs_color_top1"])
    # The run loads back whole (student + frozen text tower), as a converted TokLIP checkpoint does.
    from jaxunified.train.runs import load_run

    _, model, variables = load_run(tmp_path)
    tokens = jnp.zeros((2, model.cfg.text.max_len), jnp.int32)
    codes = jnp.zeros((2, model.cfg.grid, model.cfg.grid), jnp.int32)
    txt = model.apply(variables, tokens, method=model.encode_text)
    img = model.apply(variables, codes=codes, method=model.encode)["pooled"]
    assert txt.shape == img.shape == (2, model.cfg.text.proj_dim)
