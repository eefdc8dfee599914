"""Task ``star``: only the stacked layers, adapter and head train; the frozen base and VQ stay
bit-identical and hold no optimizer state; teacher forcing equals the sampler's cached decode;
prompt dropout trains the sampler's unconditional row; a tiny run trains, samples and loads back."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunified.data import shapes_chat
from jaxunified.losses.teacher_forcing import noisy_inputs
from jaxunified.models.star import STAR
from jaxunified.sample import star as star_sample
from jaxunified.train import loop as looplib
from jaxunified.train import star as S
from tests import helpers
from jaxunified.data.pipeline import to_global
from tests.helpers import one_step


def tiny_config(**kw):
    return helpers.tiny_config("star", **kw)


@pytest.fixture(scope="module")
def task():
    t, params, colls = helpers.tiny_task(S.STARTask, tiny_config())
    return t, params["star"], colls


def _batch(t, captions, seed=0):
    vocab = shapes_chat.ChatVocab()
    rows = [S.left_padded_prompt(shapes_chat.generation_ids(vocab, c), t.prompt_len) for c in captions]
    r = int(t.config.data.resolution)
    image = np.random.default_rng(seed).uniform(-1, 1, (len(captions), r, r, 3)).astype(np.float32)
    return {"image": image, "prompt": np.stack([x[0] for x in rows]), "prompt_valid": np.stack([x[1] for x in rows])}


def test_only_stacked_adapter_head_train_and_the_base_stays_bit_identical(task):
    t, star, colls = task
    assert set(star) == {"stacked", "adapter", "head"}
    # the stacked layer starts as the base's top layer
    np.testing.assert_array_equal(star["stacked"]["layers"]["mlp"]["up"]["kernel"],
                                  colls["frozen"]["base"]["layers"]["mlp"]["up"]["kernel"][-1:])
    config = tiny_config()
    trainer = looplib.Trainer(config, "/tmp/unused", devices=jax.devices())
    state = trainer.init_state()
    opt_leaves = sum(int(x.size) for x in jax.tree.leaves(state.opt_state))
    trained = sum(int(x.size) for x in jax.tree.leaves(state.params))
    base = sum(int(x.size) for x in jax.tree.leaves(colls["frozen"]["base"]))
    assert opt_leaves < 2 * trained + 16 and base > 0  # Adam moments of the trained parts only

    b = _batch(t, ["a red circle", "three blue squares"] * 8)
    params, new_colls, metrics = one_step(config, jax.devices(), b)
    assert set(params) == {"star"} and np.isfinite(metrics["loss"])
    for x, y in zip(jax.tree.leaves(colls["frozen"]), jax.tree.leaves(new_colls["frozen"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the understanding outputs (the base's text logits) are those of the untouched base
    ids = jnp.asarray(b["prompt"][:2])
    before = t.model.apply(t.variables(star, colls), ids, method=STAR.text)["logits"]
    after = t.model.apply(t.variables(params["star"], new_colls), ids, method=STAR.text)["logits"]
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    assert not np.array_equal(params["star"]["head"]["kernel"], star["head"]["kernel"])


def test_a_part_left_out_of_model_train_stays_bit_identical_and_the_base_runs_no_backward(task):
    t, star, colls = task
    b = _batch(t, ["a red circle", "three blue squares"] * 8)
    counts = {}
    for parts in (("stacked", "adapter", "head"), ("stacked", "head")):
        config = tiny_config(**{"model.train": parts})
        trainer = looplib.Trainer(config, "/tmp/unused", devices=jax.devices())
        state = trainer.init_state()
        batch = to_global(b, trainer.mesh)
        opt = sum(int(x.size) for x in jax.tree.leaves(state.opt_state))
        adapter = sum(int(x.size) for x in jax.tree.leaves(state.params["star"]["adapter"]))
        trained = sum(int(x.size) for x in jax.tree.leaves(state.params)) - adapter
        before = jax.device_get(state.params["star"])
        with jax.set_mesh(trainer.mesh):
            jaxpr = jax.make_jaxpr(lambda p: trainer.task.grad_fn(p, state.collections, batch, None, 0))(state.params)
            new, _ = trainer.make_step(batch)(state, batch)  # donates ``state``
        counts[parts] = str(jaxpr).count("dot_general")
        after = jax.device_get(new.params["star"])
        assert not np.array_equal(after["stacked"]["final_norm"]["scale"], before["stacked"]["final_norm"]["scale"])
        if "adapter" in parts:
            assert not np.array_equal(after["adapter"]["dense_0"]["kernel"], before["adapter"]["dense_0"]["kernel"])
        else:
            for x, y in zip(jax.tree.leaves(before["adapter"]), jax.tree.leaves(after["adapter"])):
                np.testing.assert_array_equal(x, y)
            assert opt < 2 * trained + 16  # no Adam moments for the adapter
    # no gradient flows through the base's layers: fewer matmuls in the backward pass
    assert counts[("stacked", "head")] < counts[("stacked", "adapter", "head")], counts
    with pytest.raises(ValueError, match="model.train"):
        looplib.Trainer(tiny_config(**{"model.train": ("base",)}), "/tmp/unused", devices=jax.devices()).init_state()


@pytest.fixture(scope="module")
def shared_task(task):
    """``task`` with edits' output images at the source block's positions (same parameters)."""
    t, star, colls = task
    config = t.config.copy_and_resolve_references()
    config.model.edit_positions = "shared"
    return S.STARTask(config, t.mesh), star, colls


def _check_cached_decode(t, star, colls, edit, shared=False, instruction_first=False):
    """Teacher-forced image logits of two prompts equal the sampler's prefill + cached steps."""
    vocab = shapes_chat.ChatVocab()
    captions = ["a red circle to the left of a blue square", "two green stars"]
    b = _batch(t, captions)
    if edit:
        n = t.grid ** 2
        prompts = [shapes_chat.edit_ids(vocab, i, n, num_understanding=t.num_understanding,
                                        instruction_first=instruction_first)
                   for i in ("remove the red circle", "make the green star blue")]
        rows = [S.left_padded_prompt(p, t.prompt_len) for p in prompts]
        b["prompt"], b["prompt_valid"] = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
        b["target_image"] = np.random.default_rng(1).uniform(-1, 1, b["image"].shape).astype(np.float32)
    else:
        prompts = [shapes_chat.generation_ids(vocab, c) for c in captions]
    batch = {k: jnp.asarray(v) for k, v in b.items()}
    logits, codes = jax.jit(lambda p, bb: t.logits(p, colls, bb))(star, batch)
    variables = t.variables(star, colls)
    ids, valid = star_sample.left_pad(prompts, shapes_chat.PAD, bucket=t.prompt_len)
    valid &= ids != shapes_chat.PAD  # edit_ids' unused instruction slots
    source = {}
    if edit:
        source = {"source_codes": t.codes(colls["frozen"], batch["image"]), "source_id": shapes_chat.IMAGE_PAD,
                  "shared_positions": shared, "source_embeds": t.understanding_embeds(colls["frozen"], batch["image"])}
    n = codes.shape[1]
    first, cache, step = star_sample.prefill_and_step(t.model, variables, jnp.asarray(ids), jnp.asarray(valid), n,
                                                      **source)
    step = jax.jit(step)
    stepped = [first]
    for i in range(1, n):
        out, cache = step(codes[:, i - 1], cache, i)
        stepped.append(out)
    np.testing.assert_allclose(np.stack(stepped, axis=1), np.asarray(logits), atol=2e-5)
    if edit:  # the source image matters
        no_source = t.model.apply(variables, batch["prompt"][:, -4:], codes[:, :1])["image_logits"]
        assert not np.allclose(np.asarray(no_source)[:, 0], np.asarray(logits)[:, 0], atol=1e-3)
    return variables, batch, source, logits, codes


@pytest.mark.parametrize("edit,layout,first", [(False, "sequential", False), (True, "sequential", False),
                                               (True, "shared", False), (True, "sequential", True),
                                               (True, "shared", True)])
def test_teacher_forcing_equals_the_samplers_cached_decode(task, shared_task, edit, layout, first):
    t, star, colls = shared_task if layout == "shared" else task
    _check_cached_decode(t, star, colls, edit, shared=layout == "shared", instruction_first=first)


@pytest.mark.slow
def test_edits_read_the_understanding_runs_vision_tokens(tmp_path):
    """With ``data.edit_understanding`` the source also enters as the mllm run's vision tokens
    through its projector: they change the logits, and teacher forcing still equals the sampler."""
    helpers.untrained_run("mllm", tmp_path / "mllm")
    # the probe only reads the understanding block's size; its prompts need room for that block
    probe = S.STARTask(tiny_config(**{"base.kind": "workdir", "base.workdir": str(tmp_path / "mllm"),
                                      "data.edit_understanding": True, "data.max_prompt_len": 4096}), None)
    m = probe.num_understanding
    assert m > 0
    config = tiny_config(**{"base.kind": "workdir", "base.workdir": str(tmp_path / "mllm"), "data.edit_understanding": True,
                            "data.max_prompt_len": 80 + m + 2, "model.edit_positions": "shared"})
    t, params, colls = helpers.tiny_task(S.STARTask, config)
    assert set(colls["frozen"]["understanding"]) == {"vision", "projector"}
    variables, batch, source, logits, codes = _check_cached_decode(t, params["star"], colls, edit=True, shared=True)
    blank = t.model.apply(variables, batch["prompt"], codes, positions=None, source_codes=source["source_codes"],
                          source_mask=batch["prompt"] == shapes_chat.IMAGE_PAD,
                          source_embeds=jnp.zeros_like(source["source_embeds"]),
                          attention_mask=jnp.concatenate([batch["prompt_valid"], jnp.ones_like(codes, bool)], 1))
    with_tokens = t.model.apply(variables, batch["prompt"], codes, positions=None, source_codes=source["source_codes"],
                                source_mask=batch["prompt"] == shapes_chat.IMAGE_PAD,
                                source_embeds=source["source_embeds"],
                                attention_mask=jnp.concatenate([batch["prompt_valid"], jnp.ones_like(codes, bool)], 1))
    assert not np.allclose(np.asarray(blank["image_logits"]), np.asarray(with_tokens["image_logits"]), atol=1e-4)
    with pytest.raises(ValueError, match="edit_understanding"):
        S.STARTask(tiny_config(**{"data.edit_understanding": True}), None)


@pytest.mark.parametrize("tol", [0.0, 0.05, 1e9])
def test_copy_aligned_edit_targets_decode_within_tolerance(task, tol):
    t, star, colls = task
    config = t.config.copy_and_resolve_references()
    config.tokenizer.edit_copy_tol = tol
    t = S.STARTask(config, t.mesh)
    vocab = shapes_chat.ChatVocab()
    b = _batch(t, ["two green stars", "a red circle"])
    rows = [S.left_padded_prompt(shapes_chat.edit_ids(vocab, "remove the red circle", t.grid ** 2), t.prompt_len)] * 2
    b["prompt"], b["prompt_valid"] = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    b["target_image"] = np.random.default_rng(1).uniform(-1, 1, b["image"].shape).astype(np.float32)
    _, codes = t.logits(star, colls, {k: jnp.asarray(v) for k, v in b.items()})
    frozen = colls["frozen"]
    own, source = t.codes(frozen, jnp.asarray(b["target_image"])), t.codes(frozen, jnp.asarray(b["image"]))
    if tol == 0:
        np.testing.assert_array_equal(codes, own)
    elif tol == 1e9:
        np.testing.assert_array_equal(codes, source)
    else:
        g = t.grid
        err = jnp.abs(t.decode_images(frozen, codes.reshape(-1, g, g)) - t.decode_images(frozen, own.reshape(-1, g, g)))
        assert float(err.max()) <= tol
        assert bool(((codes == own) | (codes == source)).all())


def test_edit_change_weight_weighs_the_codes_that_differ_from_the_source(task):
    import optax

    t, star, colls = task
    vocab = shapes_chat.ChatVocab()
    b = _batch(t, ["two green stars", "a red circle"])
    rows = [S.left_padded_prompt(shapes_chat.edit_ids(vocab, "remove the red circle", t.grid ** 2), t.prompt_len)] * 2
    b["prompt"], b["prompt_valid"] = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    b["target_image"] = np.concatenate([b["image"][:1], b["image"][:1]])  # row 0: nothing changed
    batch = {k: jnp.asarray(v) for k, v in b.items()}
    logits, codes, changed = t.teacher_forced(star, colls, batch)
    assert not bool(changed[0].any()) and bool(changed[1].any()) and not bool(changed[1].all())
    per_token = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, codes))
    for weight, want in ((1.0, per_token.mean(-1)),
                         (1e6, [per_token[0].mean(), per_token[1][np.asarray(changed[1])].mean()])):
        config = t.config.copy_and_resolve_references()
        config.model.edit_change_weight = weight
        ce, _ = S.STARTask(config, t.mesh).loss_and_metrics(star, colls, batch)
        np.testing.assert_allclose(np.asarray(ce), want, rtol=1e-4)


def test_an_edit_source_is_tokenized_as_its_target():
    """With simplified targets the source is simplified too: an unedited scene copies code for code."""
    config = tiny_config(**{"tokenizer.simplify_tol": 10.0})  # every image within tolerance of all-fill codes
    t, params, colls = helpers.tiny_task(S.STARTask, config)
    vocab = shapes_chat.ChatVocab()
    b = _batch(t, ["a red circle"])
    row = S.left_padded_prompt(shapes_chat.edit_ids(vocab, "remove the red circle", t.grid ** 2), t.prompt_len)
    b["prompt"], b["prompt_valid"] = row[0][None], row[1][None]
    b["target_image"] = b["image"]
    _, codes, changed = t.teacher_forced(params["star"], colls, {k: jnp.asarray(v) for k, v in b.items()})
    raw = t.codes(colls["frozen"], jnp.asarray(b["image"]), simplified=False)
    assert bool((codes != raw).any())  # the simplification changed codes: the check below means something
    assert not bool(changed.any())


def test_input_noise_swaps_input_codes_from_the_batch_and_keeps_the_targets(task):
    codes = jnp.arange(4 * 64).reshape(4, 64)
    key = jax.random.key(1)
    assert (noisy_inputs(codes, 0.0, key) == codes).all()
    noisy = np.asarray(noisy_inputs(codes, 0.3, key))
    assert 0.2 < (noisy != np.asarray(codes)).mean() < 0.4 and set(noisy.ravel()) <= set(range(4 * 64))

    t, star, colls = task
    batch = {k: jnp.asarray(v) for k, v in _batch(t, ["two green stars", "a red circle"]).items()}
    clean_logits, clean_codes, _ = t.teacher_forced(star, colls, batch)
    config = t.config.copy_and_resolve_references()
    config.model.input_noise = 0.5
    logits, codes, _ = S.STARTask(config, t.mesh).teacher_forced(star, colls, batch, noise_rng=key)
    np.testing.assert_array_equal(codes, clean_codes)  # the targets are the true codes
    np.testing.assert_allclose(logits[:, 0], clean_logits[:, 0], atol=1e-5)  # the first code sees the prompt only
    assert float(jnp.abs(logits[:, 1:] - clean_logits[:, 1:]).max()) > 1e-3
    same, _, _ = t.teacher_forced(star, colls, batch, noise_rng=key)  # input_noise 0: the plain loss
    np.testing.assert_array_equal(same, clean_logits)


def test_edit_rows_carry_the_source_block_and_the_edited_scene():
    from jaxunified.data import shapes, shapes_edit

    ex = shapes.render_example(7, "test", resolution=32)
    element = {**ex, "caption": ex["caption"].encode()}
    edit_prompt = functools.partial(shapes_chat.edit_ids, shapes_chat.ChatVocab(), num_image_tokens=64)
    out = S.GenerationPrompts(80, dropout=0.0, edit_fraction=1.0, edit_prompt=edit_prompt).random_map(
        element, np.random.default_rng(0))
    ids = out["prompt"][out["prompt_valid"]].tolist()
    assert ids.count(shapes_chat.IMAGE_PAD) == 64 and ids[-1] == shapes_chat.VISION_START
    instruction = shapes_chat.ChatVocab().decode(ids[3 + 64 + 1:-4])
    assert instruction.split()[0] in ("make", "remove", "add", "move")
    assert not np.array_equal(out["target_image"], ex["image"])
    dropped = S.GenerationPrompts(80, dropout=1.0, edit_fraction=1.0, edit_prompt=edit_prompt).random_map(
        element, np.random.default_rng(0))
    unc = dropped["prompt"][dropped["prompt_valid"]].tolist()
    # guidance is on the text: the unconditional edit row keeps the image block, loses the words
    assert unc.count(shapes_chat.IMAGE_PAD) == 64 and shapes_chat.ChatVocab().decode(unc) == "assistant"
    assert shapes_edit.check_edit(out["target_image"], shapes_edit.random_edit(
        shapes.scene_objects(ex), np.random.default_rng(0))).passed in (True, False)
    # data.edit_order="instruction_first": the same words, then the source block
    first = S.GenerationPrompts(80, dropout=0.0, edit_fraction=1.0, edit_prompt=functools.partial(
        edit_prompt, instruction_first=True)).random_map(element, np.random.default_rng(0))
    ids_first = first["prompt"][first["prompt_valid"]].tolist()
    assert sorted(ids_first) == sorted(ids) and ids_first[2:2 + len(instruction.split())] == ids[3 + 64 + 1:-4]
    assert ids_first[-4 - 66:-4] == [shapes_chat.VISION_START] + [shapes_chat.IMAGE_PAD] * 64 + [shapes_chat.VISION_END]


def _assert_example_matches(example, batch):
    """``train_batch_example`` (what bench and AOT plans compile the step for) has the fields, per-row
    shapes and dtypes of the batches training reads."""
    assert set(example) <= set(batch)
    for k, v in example.items():
        assert (v.shape[1:], v.dtype) == (batch[k].shape[1:], batch[k].dtype), k


def test_cached_simplified_codes_give_the_image_batch_loss(task, tmp_path):
    from jaxunified.data import cache

    _, star, colls = task
    config = tiny_config(**{"tokenizer.simplify_tol": 0.3, "data.edit_fraction": 0.0,
                            "data.cache_dir": str(tmp_path), "data.build_cache": True})
    t, _, _ = helpers.tiny_task(S.STARTask, config)
    assert 0 <= t.fill_code < t.vq.cfg.vq.codebook_size
    _, data = cache.in_order_batches(config.data, "train", 16)
    host = next(data)
    path = t.precompute_cache("train", tmp_path / "star.npz")
    with np.load(path) as z:
        codes = z["codes"][:16]
    b = _batch(t, [str(c) for c in host["caption"]])
    b["image"] = host["image"]
    loss = jax.jit(lambda p, bb: t.loss_and_metrics(p, colls, bb))
    from_images = loss(star, {k: jnp.asarray(v) for k, v in b.items()})
    from_cache = loss(star, {**{k: jnp.asarray(v) for k, v in b.items() if k != "image"}, "codes": jnp.asarray(codes)})
    np.testing.assert_allclose(from_cache[0], from_images[0], rtol=1e-6)
    decoded = t.decode_images(colls["frozen"], jnp.asarray(codes))
    plain = t.decode_images(colls["frozen"], t.codes(colls["frozen"], jnp.asarray(host["image"]), simplified=False))
    assert float(jnp.abs(decoded - plain).max()) <= 0.3
    it = t.build_dataset("train")  # reads the cache: no pixels, prompts added
    first = next(iter(it))
    assert "image" not in first and {"codes", "prompt", "prompt_valid"} <= set(first)
    _assert_example_matches(t.train_batch_example(), first)


def test_edit_batches_take_the_scenes_codes_from_the_cache(tmp_path):
    """Edits read each scene's (source's) simplified codes from the stage-2 cache and encode only the
    edited targets: the same rows give the pixel batch's loss, text-to-image rows included."""
    from jaxunified.data import cache
    from jaxunified.data.pipeline import normalize_images

    config = tiny_config(**{"tokenizer.simplify_tol": 0.3, "data.edit_fraction": 0.5,
                            "data.cache_dir": str(tmp_path), "data.build_cache": True})
    t, params, colls = helpers.tiny_task(S.STARTask, config)
    _, data = cache.in_order_batches(config.data, "train", 16)
    host = next(data)
    path = t.precompute_cache("train", cache.cache_path(tmp_path, "train", t.cache_key(), prefix="star"))
    with np.load(path) as z:  # the file build_dataset reads below
        cached = z["codes"][:16]
    r = int(config.data.resolution)
    pixels = np.rint((np.asarray(host["image"]) + 1.0) * 127.5).astype(np.uint8)  # the records' uint8
    prompts = S.GenerationPrompts(t.prompt_len, 0.0, 0.5, t.edit_prompt, resolution=r)
    labels = ("caption", "obj_shape", "obj_color", "obj_size", "obj_center", "count")
    rows = {"pixels": [], "cache": []}
    for i in range(16):
        element = {k: host[k][i] for k in labels}
        element["caption"] = str(element["caption"]).encode()
        rows["pixels"].append(prompts.random_map({**element, "image": pixels[i]}, np.random.default_rng(i)))
        rows["cache"].append(prompts.random_map({**element, "codes": cached[i]}, np.random.default_rng(i)))

    def stack(rs, k):  # images as the cache saw its inputs: normalised like in_order_batches'
        out = np.stack([x[k] for x in rs])
        return jnp.asarray(normalize_images({"image": out})["image"] if k == "target_image" else out)

    edits = [bool((x["prompt"] == shapes_chat.IMAGE_PAD).any()) for x in rows["pixels"]]
    assert 0 < sum(edits) < 16
    for x, edit in zip(rows["cache"], edits):  # a text-to-image row carries a blank target
        assert edit or not x["target_image"].any()
    keys = ("prompt", "prompt_valid", "target_image")
    from_pixels = {**{k: stack(rows["pixels"], k) for k in keys}, "image": jnp.asarray(host["image"])}
    from_cache = {**{k: stack(rows["cache"], k) for k in keys}, "codes": jnp.asarray(cached)}
    loss = jax.jit(lambda p, bb: t.loss_and_metrics(p, colls, bb))
    np.testing.assert_allclose(loss(params["star"], from_cache)[0], loss(params["star"], from_pixels)[0], rtol=1e-6)
    first = next(iter(t.build_dataset("train")))  # the cache again: no pixels read
    assert "image" not in first and {"codes", "target_image", "prompt", "prompt_valid"} <= set(first)
    example = t.train_batch_example()
    _assert_example_matches(example, first)
    assert {"codes", "target_image"} <= set(example)


@pytest.mark.parametrize("per_scene,copy_tol,fraction", [(1, 0.0, 1.0), (2, 0.2, 0.5)])
def test_cached_edits_give_the_loss_of_the_same_edits_encoded_in_the_step(tmp_path, per_scene, copy_tol, fraction):
    """``data.edits_per_scene``: each scene's edits are drawn once (seeded by its index) and their
    targets tokenized (and copy-aligned) into a cache; a batch of cached edit rows, text-to-image
    rows among them, gives the loss of the same edits rendered and encoded in the step, and
    training batches then carry target codes, no pixels."""
    from jaxunified.data import cache

    config = tiny_config(**{"tokenizer.simplify_tol": 0.3, "tokenizer.edit_copy_tol": copy_tol,
                            "data.edit_fraction": fraction, "data.edits_per_scene": per_scene,
                            "data.cache_dir": str(tmp_path), "data.build_cache": True})
    t, params, colls = helpers.tiny_task(S.STARTask, config)
    _, data = cache.in_order_batches(config.data, "train", 16)
    host = next(data)
    scene_cache = t.precompute_cache("train", cache.cache_path(tmp_path, "train", t.cache_key(), prefix="star"))
    with np.load(scene_cache) as z:
        scene_codes = z["codes"][:16]
    with np.load(t.edit_cache("train")) as z:
        instructions, edit_codes = z[S.EDIT_INSTRUCTION][:16], z[S.EDIT_CODES][:16]
    assert edit_codes.shape == (16, per_scene, t.grid, t.grid)
    r, vocab = int(config.data.resolution), shapes_chat.ChatVocab()
    labels = ("caption", "obj_shape", "obj_color", "obj_size", "obj_center", "count")
    prompts = S.GenerationPrompts(t.prompt_len, 0.0, fraction, t.edit_prompt, resolution=r)
    rows, targets = [], []
    for i in range(16):
        element = {k: host[k][i] for k in labels}
        rng = np.random.default_rng([0, i])
        drawn = [S.draw_edit(element, rng, r) for _ in range(per_scene)]  # the same edits, redrawn
        assert [d[0] for d in drawn] == instructions[i].tolist() and all(d[1] is not None for d in drawn)
        element["caption"] = str(element["caption"]).encode()
        row = prompts.random_map({**element, "codes": scene_codes[i], S.EDIT_INSTRUCTION: instructions[i],
                                  S.EDIT_CODES: edit_codes[i]}, np.random.default_rng(i))
        assert "target_image" not in row and S.EDIT_CODES not in row
        ids = row["prompt"][row["prompt_valid"]].tolist()
        image = np.zeros((r, r, 3), np.uint8)  # a text-to-image row: the step takes the scene's codes
        for instruction, rendered in drawn:
            if ids == [x for x in shapes_chat.edit_ids(vocab, instruction, t.grid ** 2) if x != shapes_chat.PAD]:
                image = rendered
        assert (shapes_chat.IMAGE_PAD in ids) == bool(image.any())
        rows.append(row)
        targets.append(image)
    edits = sum(shapes_chat.IMAGE_PAD in x["prompt"] for x in rows)
    assert edits == 16 if fraction == 1.0 else 0 < edits < 16
    batch = {k: jnp.asarray(np.stack([x[k] for x in rows])) for k in ("prompt", "prompt_valid", "codes")}
    loss = jax.jit(lambda p, bb: t.loss_and_metrics(p, colls, bb))
    from_cache = loss(params["star"], {**batch, "target_codes": jnp.asarray(np.stack([x["target_codes"] for x in rows]))})
    in_step = loss(params["star"], {**batch, "target_image": jnp.asarray(np.stack(targets))})
    np.testing.assert_allclose(from_cache[0], in_step[0], rtol=1e-6)
    first = next(iter(t.build_dataset("train")))
    assert not {"image", "target_image", S.EDIT_INSTRUCTION} & set(first) and "target_codes" in first
    _assert_example_matches(t.train_batch_example(), first)
    with pytest.raises(ValueError, match="edits_per_scene"):
        S.STARTask(tiny_config(**{"data.edit_fraction": 1.0, "data.edits_per_scene": 1}), None).edits_per_scene
    with pytest.raises(ValueError, match="edit_order"):
        S.STARTask(tiny_config(**{"data.edit_order": "after"}), None).edit_instruction_first
    # an edit prompt that cannot fit is named at the config, with the length it needs (not mid-pipeline)
    need = len(t.edit_prompt(""))
    with pytest.raises(ValueError, match=f"max_prompt_len >= {need}"):
        S.STARTask(tiny_config(**{"data.max_prompt_len": need - 1}), None)


def test_prompt_dropout_trains_the_samplers_unconditional_row():
    vocab = shapes_chat.ChatVocab()
    ids = shapes_chat.generation_ids(vocab, "four purple crosses")
    element = {"caption": b"four purple crosses", "image": np.zeros((32, 32, 3), np.uint8)}
    out = S.GenerationPrompts(16, dropout=1.0).random_map(element, np.random.default_rng(0))
    want = star_sample.uncond_ids(ids, shapes_chat.FIM_PAD, shapes_chat.GENERATION_TAIL)
    assert out["prompt"][out["prompt_valid"]].tolist() == want
    assert want[0] == shapes_chat.IM_START and want[-1] == shapes_chat.VISION_START
    assert vocab.decode(want) == "assistant"  # nothing of the caption is left
    kept = S.GenerationPrompts(16, dropout=0.0).random_map(element, np.random.default_rng(0))
    assert kept["prompt"][kept["prompt_valid"]].tolist() == ids


@pytest.mark.slow
def test_tiny_run_trains_samples_scores_and_loads_back(tmp_path):
    from jaxunified.train.runs import load_run

    config = tiny_config(total_steps=8, **{"optim.lr": 3e-3})
    looplib.Trainer(config, tmp_path).run()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    evals = [x for x in lines if x["split"] == "eval"]
    assert {"val_loss", "val_token_acc", "geneval_overall", "ceiling_overall", "geneval_colors", "edit_success",
            "edit_token_acc", "edit_row_exact", "edit_copy_acc", "edit_change_acc"} <= set(evals[-1])
    assert list(tmp_path.glob("samples_test_*_colors.png"))

    _, model, variables = load_run(tmp_path)
    assert isinstance(model, STAR)
    # the next stage starts from this run's trained parts
    nxt = S.STARTask(tiny_config(**{"model.init_from": str(tmp_path)}), None)
    params, _ = nxt.init_variables(jax.random.key(5), nxt.dummy_batch())
    for k in S.TRAINED:
        for x, y in zip(jax.tree.leaves(nn.meta.unbox(params["star"][k])), jax.tree.leaves(variables["params"][k])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    prompt = shapes_chat.generation_ids(shapes_chat.ChatVocab(), "a red circle")
    codes = star_sample.generate_images(model, variables, [prompt], num_tokens=4, fim_pad_id=shapes_chat.FIM_PAD,
                                        keep_tail=shapes_chat.GENERATION_TAIL)
    assert codes.shape == (1, 4) and int(codes.max()) < model.config.image_vocab
