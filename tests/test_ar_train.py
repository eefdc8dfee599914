"""Task ``ar``: cached batches give the image batch's loss, only the GPT trains while the frozen
VQ and text tower stay bit-identical, and a tiny run trains, samples, scores and loads back."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunified.data import cache
from jaxunified.train import ar as A
from jaxunified.train import loop as looplib
from tests import helpers
from tests.helpers import one_step


def tiny_config(**kw):
    return helpers.tiny_config("ar", **kw)


@pytest.fixture(scope="module")
def task():
    t, params, colls = helpers.tiny_task(A.ARTask, tiny_config())
    return t, params["gpt"], colls


def test_cached_batch_gives_the_image_batch_loss(task, tmp_path):
    t, gpt, colls = task
    source, data = cache.in_order_batches(t.config.data, "train", 16)
    host = next(data)
    images = {"image": jnp.asarray(host["image"]), "tokens": jnp.asarray(host["tokens"])}
    path = t.precompute_cache("train", tmp_path / "ar.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    g = t.grid
    assert arrays["codes"].shape == (256, g, g) and arrays["caption_states"].shape[:2] == (256, 16)
    _, cached_data = cache.in_order_batches(t.config.data, "train", 16, source=cache.CachedSource(source, arrays))
    cached = next(cached_data)
    assert "image" not in cached
    cached = {k: jnp.asarray(cached[k]) for k in A.CACHE_FIELDS}
    loss = jax.jit(lambda p, b: t.loss_and_metrics(p, colls, b, train=False))
    (ce_a, acc_a), (ce_b, acc_b) = loss(gpt, images), loss(gpt, cached)
    np.testing.assert_allclose(ce_b, ce_a, rtol=1e-6)
    np.testing.assert_array_equal(acc_b, acc_a)


def test_input_noise_feeds_noisy_codes_in_training_only(task):
    from jaxunified.losses.teacher_forcing import noisy_inputs

    t, gpt, colls = task
    config = t.config.copy_and_resolve_references()
    config.model.input_noise = 0.5
    noisy_task = A.ARTask(config, t.mesh)
    b, n, key = 3, t.grid ** 2, jax.random.key(2)
    codes = jax.random.randint(jax.random.key(0), (b, n), 0, t.vq.cfg.vq.codebook_size)
    states = jax.random.normal(jax.random.key(1), (b, 16, t.text_cfg.width))
    plain = t.logits(gpt, colls, states, codes, train=False)
    np.testing.assert_array_equal(noisy_task.logits(gpt, colls, states, codes, train=False), plain)  # eval: clean
    dropout, noise = jax.random.split(key)
    want = t.model.apply(t._gpt_vars(gpt, colls), states, noisy_inputs(codes[:, :-1], 0.5, noise), train=True,
                         rngs={"dropout": dropout})[:, t.model_cfg.cls_token_num - 1:]
    np.testing.assert_allclose(noisy_task.logits(gpt, colls, states, codes, train=True, rng=key), want, atol=1e-6)


def test_train_batch_example_has_the_cached_batches_fields(tmp_path):
    config = tiny_config(**{"data.cache_dir": str(tmp_path), "data.build_cache": True})
    t, _, _ = helpers.tiny_task(A.ARTask, config)
    first = next(iter(t.build_dataset("train")))  # builds the cache, then reads it
    example = t.train_batch_example()  # what bench and AOT plans compile the step for
    assert set(example) == set(A.CACHE_FIELDS) and set(example) <= set(first)
    for k, v in example.items():
        assert (v.shape[1:], v.dtype) == (first[k].shape[1:], first[k].dtype), k
    assert set(A.ARTask(tiny_config(), t.mesh).train_batch_example()) == {"image", "tokens"}


def test_step_trains_only_the_gpt_and_frozen_parts_stay_bit_identical(task):
    t, _, colls = task
    config = tiny_config()
    b = t.dummy_batch()
    b["image"] = np.random.default_rng(0).uniform(-1, 1, b["image"].shape).astype(np.float32)
    params, new_colls, metrics = one_step(config, jax.devices(), b)
    assert set(params) == {"gpt"}
    assert np.isfinite(metrics["loss"])
    before = jax.tree.leaves(colls["frozen"])
    after = jax.tree.leaves(new_colls["frozen"])
    assert len(before) == len(after)
    for x, y in zip(before, after):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(colls["gpt"]), jax.tree.leaves(new_colls["gpt"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the uncond embedding is not trained


@pytest.mark.slow
def test_tiny_run_trains_samples_scores_and_loads_back(tmp_path):
    from jaxunified.train.evaluate import evaluate_run
    from jaxunified.train.runs import load_run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nthree blue squares\n")
    config = tiny_config(total_steps=8, **{"optim.lr": 3e-3})
    looplib.Trainer(config, tmp_path).run()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    evals = [x for x in lines if x["split"] == "eval"]
    assert {"val_loss", "val_token_acc", "geneval_overall", "geneval_colors", "ceiling_overall"} <= set(evals[-1])
    again = evaluate_run(config, tmp_path)
    assert again["val_loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-5)
    assert again["geneval_overall"] == pytest.approx(evals[-1]["geneval_overall"])  # fixed sampling seed
    assert list(tmp_path.glob("samples_test_*_colors.png"))
    rows = json.loads(next(tmp_path.glob("samples_test_*.json")).read_text())
    assert len(rows) == 16 and {"caption", "passed", "reason"} <= set(rows[0])

    with_prompts = helpers.override(tiny_config(total_steps=8), **{"eval.prompts_file": str(prompts),
                                                                   "eval.negative_kinds": ("color", "swap"),
                                                                   "sample.best_of": 2})
    out = evaluate_run(with_prompts, tmp_path)
    assert out["geneval_overall"] >= 0.0 and out["plain_overall"] >= 0.0  # reranked, and the first draws
    # Every test caption has a colour to change; only two-object ones can swap.
    assert 0.0 <= out["prefers_caption_over_color"] <= 1.0 and 0.0 <= out["prefers_caption_over_swap"] <= 1.0
    rows = json.loads(sorted(tmp_path.glob("samples_test_*.json"))[-1].read_text())
    assert [r["caption"] for r in rows] == ["a red circle", "three blue squares"]

    _, model, variables = load_run(tmp_path)
    states = jnp.zeros((1, model.config.cls_token_num, model.config.caption_dim))
    logits = model.apply(variables, states, jnp.zeros((1, 3), jnp.int32))
    assert logits.shape[-1] == model.config.vocab_size


def test_best_of_n_keeps_the_siglip_favourite_among_independent_draws():
    from jaxunified.sample import rerank

    t, params, colls = helpers.tiny_task(A.ARTask, tiny_config(**{"sample.best_of": 3}))
    captions = ["a red circle", "two blue squares"]
    key = jax.random.key(1)
    images, codes, ranked = t.sample_candidates(params["gpt"], colls, captions, key=key, batch_size=4)
    assert images.shape[0] == codes.shape[0] == 6 and ranked.scores.shape == (2, 3)
    assert len({c.tobytes() for c in codes[:3]}) == 3  # a caption's draws are independent
    # The scores are the SigLIP's own image–caption logits (the diagonal of its B×B matrix).
    model, variables = t.scorer
    tokens = jnp.asarray(t.text_tokenizer.encode(rerank.repeat(captions, 3)))
    full = model.apply(variables, jnp.asarray(images), tokens)["logits_per_image"]
    np.testing.assert_allclose(ranked.scores.reshape(-1), np.diag(np.asarray(full)), rtol=1e-5, atol=1e-5)
    best_images, best_codes = t.sample(params["gpt"], colls, captions, key=key, batch_size=4)
    want = np.argmax(ranked.scores, axis=1) + np.array([0, 3])
    np.testing.assert_array_equal(best_codes, codes[want])
    np.testing.assert_array_equal(best_images, images[want])

    # Each caption's first draw is what the plain sampler draws, image for image; it scores nothing.
    plain = A.ARTask(tiny_config(), t.mesh)
    assert plain.scorer is None
    plain_images, plain_codes = plain.sample(params["gpt"], colls, captions, key=key, batch_size=4)
    np.testing.assert_array_equal(plain_codes, ranked.first(codes))
    np.testing.assert_array_equal(plain_images, ranked.first(images))

    with pytest.raises(ValueError, match="best_of must be >= 1"):
        A.ARTask(tiny_config(**{"sample.best_of": 0}), None)
    with pytest.raises(ValueError, match="deterministic strategy"):
        A.ARTask(tiny_config(**{"sample.best_of": 2, "sample.temperature": 0.0}), None)
    with pytest.raises(ValueError, match="no image tower"):
        A.ARTask(lm_text_config(**{"sample.best_of": 2}), None)


def test_hard_negatives_edit_one_thing_where_the_kind_applies():
    caps = ["a red circle", "a red circle and a blue square"]
    negs, ok = A.hard_negatives(caps, "swap", np.random.default_rng(0))
    assert ok.tolist() == [False, True] and negs == ["a red circle", "a red square and a blue circle"]
    negs, ok = A.hard_negatives(caps, "color", np.random.default_rng(0))
    assert ok.all() and all(n != c and len(n.split()) == len(c.split()) for n, c in zip(negs, caps))


def test_simplified_codes_decode_within_tolerance(task):
    t, _, colls = task
    t2 = A.ARTask(tiny_config(**{"tokenizer.simplify_tol": 0.3}), t.mesh)
    _, data = cache.in_order_batches(t2.config.data, "train", 16)
    batch = {"image": jnp.asarray(next(data)["image"])}
    fr = colls["frozen"]
    plain, simple = jax.jit(t.codes)(fr, batch), jax.jit(t2.codes)(fr, batch)
    assert plain.shape == simple.shape and 0 <= t2.fill_code < t2.vq.cfg.vq.codebook_size
    diff = jnp.abs(t2.decode_images(fr, simple) - t2.decode_images(fr, plain)).max()
    assert float(diff) <= 0.3 and bool((simple == t2.fill_code).mean() >= (plain == t2.fill_code).mean())
    assert t2.cache_key() != t.cache_key()


def test_text_encoder_select_layer_conditions_on_that_hidden_state_and_keys_the_cache(task):
    t, _, colls = task
    layered, _, _ = helpers.tiny_task(A.ARTask, tiny_config(**{"text_encoder.select_layer": -2}))
    tokens = jnp.asarray(t.text_tokenizer.encode(["a red circle", "two blue squares"]))
    frozen = colls["frozen"]
    hidden = t.text_model.apply({"params": frozen["text"]}, tokens, return_hidden=True)["hidden_states"]
    np.testing.assert_array_equal(np.asarray(layered.encode_text(frozen, tokens)), np.asarray(hidden[-2]))
    assert not np.allclose(np.asarray(t.encode_text(frozen, tokens)), np.asarray(hidden[-2]))
    assert layered.cache_key() != t.cache_key()
    with pytest.raises(ValueError, match="select_layer=-9"):
        A.ARTask(tiny_config(**{"text_encoder.select_layer": -9}), None)


def test_append_pooled_adds_the_pooled_output_as_one_more_condition_token(task):
    t, _, colls = task
    pooled, _, _ = helpers.tiny_task(A.ARTask, tiny_config(**{"text_encoder.select_layer": -2,
                                                               "text_encoder.append_pooled": True}))
    tokens = jnp.asarray(t.text_tokenizer.encode(["a red circle", "two blue squares"]))
    frozen = colls["frozen"]
    out = t.text_model.apply({"params": frozen["text"]}, tokens, return_hidden=True)
    states = np.asarray(pooled.encode_text(frozen, tokens))
    np.testing.assert_array_equal(states[:, :-1], np.asarray(out["hidden_states"][-2]))
    np.testing.assert_array_equal(states[:, -1], np.asarray(out["last_hidden"][:, -1]))
    assert pooled.model_cfg.cls_token_num == t.model_cfg.cls_token_num + 1
    assert pooled.cache_key() != t.cache_key()


def test_caption_contrast_is_softplus_of_the_nll_gap_on_rows_with_a_negative():
    deterministic = {f"model.overrides.{k}": 0.0 for k in ("class_dropout_prob", "token_dropout_p",
                                                            "resid_dropout_p", "ffn_dropout_p")}
    config = tiny_config(**{"loss.negative_kinds": ("swap",), "loss.negative_rows": 4, **deterministic})
    t, params, colls = helpers.tiny_task(A.ARTask, config)
    host = next(iter(t.build_dataset("train")))
    valid = host["neg_valid"][:, 0]
    assert host["neg_tokens"].shape[1] == 1 and 0 < valid.sum() < len(valid)  # one- and two-object captions
    same = (host["neg_tokens"][:, 0] == host["tokens"]).all(-1)
    np.testing.assert_array_equal(same, ~valid)  # the caption stands in where no swap applies
    batch = {k: jnp.asarray(host[k]) for k in ("image", "tokens", "neg_tokens", "neg_valid")}
    gpt, frozen = params["gpt"], colls["frozen"]
    loss, acc, contrast, prefers = jax.jit(lambda p: t.contrast_loss(p, colls, batch, jax.random.key(1)))(gpt)

    codes, states = t.codes(frozen, batch), t.caption_states(frozen, batch)
    nll = lambda s: t.token_losses(gpt, colls, s, codes, train=False)[0]  # noqa: E731
    true, neg = nll(states), nll(t.encode_text(frozen, batch["neg_tokens"][:, 0]))
    rows = np.flatnonzero(valid)[:4]  # rows with a negative come first
    gap = np.asarray(true.sum(-1) - neg.sum(-1))[rows]
    np.testing.assert_allclose(contrast, np.log1p(np.exp(gap)).mean(), rtol=1e-5)
    np.testing.assert_allclose(prefers, (gap < 0).mean())
    np.testing.assert_allclose(loss, np.asarray(true).mean(), rtol=1e-5)

    example = t.train_batch_example()  # what bench and AOT plans compile the step for
    assert {k: (v.shape[1:], v.dtype) for k, v in example.items()} == {k: (v.shape[1:], v.dtype)
                                                                      for k, v in batch.items()}
    _, _, metrics = jax.jit(lambda p: t.grad_fn({"gpt": p}, colls, batch, jax.random.key(1), 0))(gpt)
    np.testing.assert_allclose(metrics["contrast_loss"], contrast, rtol=1e-5)
    with pytest.raises(ValueError, match="set both or neither"):
        A.ARTask(tiny_config(**{"loss.negative_kinds": ("swap",)}), t.mesh).negative_rows


def lm_text_config(**kw):
    """The tiny preset with a (random) decoder LM as the text encoder, reading the shapes chat prompt."""
    return tiny_config(**{"text_encoder.family": "lm", "text_encoder.variant": "tiny", "data.text.tokenizer": "shapes_chat",
                          "data.text.path": "", "data.text.max_len": 16, **kw})


def test_an_lm_text_encoder_conditions_on_its_hidden_states_and_stays_frozen():
    t, _, colls = helpers.tiny_task(A.ARTask, lm_text_config(**{"text_encoder.select_layer": -2}))
    tokens = jnp.asarray(t.text_tokenizer.encode(["a red circle", "a blue square and a red circle"]))
    frozen = colls["frozen"]
    out = t.text_model.apply({"params": frozen["text"]}, tokens, return_hidden=True, compute_logits=False)
    np.testing.assert_array_equal(np.asarray(t.encode_text(frozen, tokens)), np.asarray(out["hidden_states"][-2]))
    embeddings = A.ARTask(lm_text_config(**{"text_encoder.select_layer": -(t.text_cfg.num_layers + 1)}), None)
    np.testing.assert_array_equal(np.asarray(embeddings.encode_text(frozen, tokens)),
                                  np.asarray(out["hidden_states"][0]))
    last, _, _ = helpers.tiny_task(A.ARTask, lm_text_config())
    np.testing.assert_array_equal(np.asarray(last.encode_text(frozen, tokens)), np.asarray(out["last_hidden"]))
    assert t.model_cfg.caption_dim == t.text_cfg.hidden_size and t.model_cfg.cls_token_num == 16
    assert t.cache_key() != last.cache_key()

    b = t.dummy_batch()
    b["image"] = np.random.default_rng(0).uniform(-1, 1, b["image"].shape).astype(np.float32)
    b["tokens"] = t.text_tokenizer.encode(["a red circle"] * b["tokens"].shape[0])
    params, new_colls, metrics = one_step(lm_text_config(**{"text_encoder.select_layer": -2}), jax.devices(), b)
    assert set(params) == {"gpt"} and np.isfinite(metrics["loss"])
    for x, y in zip(jax.tree.leaves(colls["frozen"]["text"]), jax.tree.leaves(new_colls["frozen"]["text"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_an_lm_text_encoder_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="select_layer=-5"):
        A.ARTask(lm_text_config(**{"text_encoder.select_layer": -5}), None)  # the tiny LM has 3 layers
    with pytest.raises(ValueError, match="append_pooled"):
        A.ARTask(lm_text_config(**{"text_encoder.append_pooled": True}), None)
    with pytest.raises(ValueError, match="not the LM's tokenizer"):  # bytes: 259 ids for a 128-id LM
        A.ARTask(lm_text_config(**{"data.text.tokenizer": "byte", "data.text.max_len": 56}), None)
    with pytest.raises(ValueError, match="text_encoder.family='t5'"):
        A.ARTask(tiny_config(**{"text_encoder.family": "t5"}), None)
    from jaxunified.train import planning

    with planning.shapes_only(), pytest.raises(ValueError, match="text_encoder: .* is not an mllm or LM run"):
        A.ARTask(lm_text_config(**{"text_encoder.kind": "workdir", "text_encoder.workdir": "/no/such/run",
                                   "text_encoder.preset": "configs/siglip.py:shapes"}), None)
