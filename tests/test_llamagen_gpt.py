"""LlamaGen GPT: golden parity through convert, KV-cache decode, t2i masks and training, variant
sizes, the jitted sampler (greedy / CFG chains), checkpoint formats and errors."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

from jaxunified import convert
from jaxunified.convert.common import CheckpointMismatchError
from jaxunified.models import llamagen_gpt as gpt
from jaxunified.nn.rope import apply_rope, rope_2d
from jaxunified.nn.transformer import stack_layers
from jaxunified.sample import decode
from jaxunified.sample.decode import cast_weights
from jaxunified.sample.llamagen import sample_images
from jaxunified.sample.strategies import Categorical, Greedy, Guidance

GOLDEN = "llamagen_gpt_c2i_tiny"

# sum(p.numel() for p in model.parameters()) of gpt.py's GPT_models at the c2i defaults (vocab
# 16384, 1000 classes + the null row, block 256), counted from its formula:
# 2·V·D (embeddings + head) + 1001·D + L·(4·D² + 3·D·ffn + 2·D) + D, ffn = find_multiple(int(8D/3), 256)
# (every variant here is MHA, so wqkv + wo = 4·D²).
REFERENCE_C2I = {
    "GPT-B": 110_888_448,      # "111M"
    "GPT-L": 342_910_976,      # "343M"
    "GPT-XL": 774_699_520,     # "775M"
    "GPT-XXL": 1_410_972_672,  # "1.4B"
    "GPT-XXXL": 3_893_027_840,  # "3.9B" (48 × 2560, 40 heads)
    "GPT-3B": 3_096_659_200,   # "3.1B" (24 × 3200, 32 heads; the released c2i_3B checkpoint)
}
# t2i (caption_dim 2048): the class table is replaced by cap_proj fc1 [2048→D] + fc2 [D→D].
REFERENCE_T2I = {"GPT-XL": 777_678_080, "GPT-1B": 1_205_954_560, "GPT-3B": 3_110_249_600, "GPT-7B": 6_635_655_168}

T2I_TINY = gpt.GPTConfig(vocab_size=32, dim=32, n_layer=2, n_head=4, n_kv_head=2, multiple_of=16, block_size=16,
                         cls_token_num=6, caption_dim=12, class_dropout_prob=0.1, token_dropout_p=0.0,
                         resid_dropout_p=0.0, ffn_dropout_p=0.0)
C2I_CFG_TINY = dataclasses.replace(gpt.VARIANTS["tiny"], class_dropout_prob=0.1)


def _formula(cfg: gpt.GPTConfig) -> int:
    d, ffn = cfg.dim, cfg.ffn_dim
    qkv = d * (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
    layer = qkv + d * d + 3 * d * ffn + 2 * d
    cond = (cfg.caption_dim * d + d * d) if cfg.caption_dim else (cfg.num_classes + int(cfg.class_dropout_prob > 0)) * d
    return 2 * cfg.vocab_size * d + cond + cfg.n_layer * layer + d


@pytest.fixture(scope="module")
def golden(golden_dir):
    model, variables = convert.load("llamagen_gpt", golden_dir / f"{GOLDEN}.safetensors",
                                    config=golden_dir / f"{GOLDEN}.json")
    return model, variables, np.load(golden_dir / f"{GOLDEN}.npz")


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("train",))
def _forward(model, variables, cond, tokens, cond_mask=None, train=False, key=None):
    rngs = None if key is None else {"dropout": key}
    return model.apply(variables, cond, tokens, cond_mask=cond_mask, train=train, rngs=rngs)


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(dec, variables, cond, cond_mask):
    return dec.apply(variables, cond, cond_mask=cond_mask, method="prefill", mutable=["cache"])


@functools.partial(jax.jit, static_argnums=(0,))
def _step(dec, variables, tokens, position, cond_mask):
    return dec.apply(variables, tokens, position, cond_mask=cond_mask, method="step", mutable=["cache"])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random_variables(model, seed=0, scale=0.3):
    """init, then noise on every parameter, so the zero-initialised head gives distinct logits."""
    real = nn.meta.unbox(model.init(jax.random.key(seed), gpt.dummy_cond(model.config, 1), jnp.zeros((1, 1), jnp.int32)))
    leaves, tree = jax.tree.flatten(real["params"])
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return {**real, "params": params}


def _captions(cfg, lengths, seed=0):
    """Left-padded caption states [B, cls, caption_dim] with junk in the pads, and their mask."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(lengths), cfg.cls_token_num, cfg.caption_dim)).astype(np.float32)
    mask = np.arange(cfg.cls_token_num)[None] >= cfg.cls_token_num - np.asarray(lengths)[:, None]
    return jnp.asarray(x), jnp.asarray(mask)


def _decode_logits(model, variables, cond, tokens, cond_mask=None):
    """Prefill + one-token steps; → [B, T + 1, V] matching full[:, cls-1:]."""
    dec = model.clone(decode=True)
    c = model.config
    cache = gpt.init_cache(dec, tokens.shape[0], c.cls_token_num + tokens.shape[1])
    logits, state = _prefill(dec, {**variables, "cache": cache}, cond, cond_mask)
    out = [logits]
    for i in range(tokens.shape[1]):
        logits, state = _step(dec, {**variables, "cache": state["cache"]}, tokens[:, i], c.cls_token_num + i,
                              cond_mask)
        out.append(logits)
    return jnp.stack(out, axis=1)


# ---- parity ----

@pytest.mark.parametrize("scan", [False, True])
def test_golden_teacher_forced_logits(golden_dir, scan):
    model, variables = convert.load("llamagen_gpt", golden_dir / f"{GOLDEN}.safetensors",
                                    config=str(golden_dir / f"{GOLDEN}.json"), scan_layers=scan)
    ref = np.load(golden_dir / f"{GOLDEN}.npz")
    # Built without label dropout: the table has exactly num_classes rows, no null class.
    assert model.config.class_dropout_prob == 0.0 and not model.config.has_null_class
    logits = model.apply(variables, jnp.asarray(ref["cond"]), jnp.asarray(ref["idx"]))
    assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)


def test_condition_tokens_have_zero_rope_rows():
    c = T2I_TINY
    cos, sin = rope_2d(c.grid_size, c.grid_size, c.head_dim, c.rope_base, num_cond=c.cls_token_num)
    assert cos.shape == (c.cls_token_num + c.block_size, c.head_dim // 2)
    assert not np.asarray(cos[: c.cls_token_num]).any() and not np.asarray(sin[: c.cls_token_num]).any()


def test_identity_condition_rows_leave_condition_queries_and_keys_unrotated():
    c = T2I_TINY
    cos, sin = rope_2d(c.grid_size, c.grid_size, c.head_dim, c.rope_base, num_cond=c.cls_token_num,
                       cond_rows="identity")
    assert (np.asarray(cos[: c.cls_token_num]) == 1).all() and not np.asarray(sin[: c.cls_token_num]).any()
    ref = rope_2d(c.grid_size, c.grid_size, c.head_dim, c.rope_base, num_cond=c.cls_token_num)
    np.testing.assert_array_equal(cos[c.cls_token_num:], ref[0][c.cls_token_num:])
    # The condition tokens' queries and keys pass unchanged (zero rows would zero them).
    x = jax.random.normal(jax.random.key(0), (2, c.cls_token_num, c.n_head, c.head_dim))
    np.testing.assert_array_equal(apply_rope(x, cos[: c.cls_token_num], sin[: c.cls_token_num], interleaved=True), x)
    with pytest.raises(ValueError, match="cond_rope"):
        gpt.GPTConfig(cond_rope="none")


def test_sequence_condition_rows_encode_relative_word_order():
    c = T2I_TINY
    n = c.cls_token_num
    cos, sin = rope_2d(c.grid_size, c.grid_size, c.head_dim, c.rope_base, num_cond=n, cond_rows="sequence")
    ref = rope_2d(c.grid_size, c.grid_size, c.head_dim, c.rope_base, num_cond=n)
    np.testing.assert_array_equal(cos[n:], ref[0][n:])
    np.testing.assert_array_equal(sin[n:], ref[1][n:])
    # q·k between two condition tokens depends only on their offset: the same pair of vectors at
    # offsets (0, 1) and (2, 3) scores the same, and differently at (0, 2).
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, c.head_dim))

    def score(i, j):
        qi = apply_rope(q, cos[i:i + 1], sin[i:i + 1], interleaved=True)
        kj = apply_rope(k, cos[j:j + 1], sin[j:j + 1], interleaved=True)
        return float((qi * kj).sum())

    assert score(0, 1) == pytest.approx(score(2, 3), rel=1e-5)
    assert score(0, 1) != pytest.approx(score(0, 2), rel=1e-3)
    # The last condition token sits one step before the grid's (0, 0) on both axes.
    np.testing.assert_allclose(score(n - 1, n), score(0, 1), rtol=1e-5)


def test_sequence_condition_rows_let_the_gpt_tell_word_order():
    """One layer: with zero rows the image tokens read a uniform average of the condition values, so
    a permuted caption gives the same image logits; with sequence rows it does not."""
    caption, mask = _captions(T2I_TINY, [6])
    perm = caption[:, ::-1]
    tokens = jax.random.randint(jax.random.key(3), (1, 10), 0, T2I_TINY.vocab_size)
    for rows, same in (("zero", True), ("sequence", False)):
        model = gpt.LlamaGenGPT(dataclasses.replace(T2I_TINY, n_layer=1, cond_rope=rows))
        v = _random_variables(model)
        a = _forward(model, v, caption, tokens, cond_mask=mask)[:, 6:]
        b = _forward(model, v, perm, tokens, cond_mask=mask)[:, 6:]
        assert np.allclose(a, b, atol=1e-5) == same, rows


# ---- KV cache ----

def test_c2i_decode_matches_full_sequence(golden):
    model, variables, ref = golden
    cond, idx = jnp.asarray(ref["cond"]), jnp.asarray(ref["idx"])
    full = _forward(model, variables, cond, idx)
    np.testing.assert_allclose(_decode_logits(model, variables, cond, idx), full, atol=1e-5)


@pytest.mark.parametrize("cond_rope,caption_layers", [("zero", 0), ("identity", 0), ("identity", 1), ("sequence", 0)])
def test_t2i_decode_matches_full_sequence_with_padded_captions(cond_rope, caption_layers):
    model = gpt.LlamaGenGPT(dataclasses.replace(T2I_TINY, cond_rope=cond_rope, caption_layers=caption_layers))
    v = _random_variables(model)
    caption, mask = _captions(T2I_TINY, [6, 3, 1])
    tokens = jax.random.randint(jax.random.key(3), (3, 10), 0, T2I_TINY.vocab_size)
    full = _forward(model, v, caption, tokens, cond_mask=mask)
    assert full.shape == (3, 6 + 10, 32) and np.isfinite(np.asarray(full)).all()
    dec = _decode_logits(model, v, caption, tokens, cond_mask=mask)
    np.testing.assert_allclose(dec, full[:, 5:], atol=1e-5, rtol=1e-5)
    # Pads are invisible to the image tokens: other junk in them changes no image-position logit.
    junk = jnp.where(mask[..., None], caption, 7.0)
    np.testing.assert_allclose(_forward(model, v, junk, tokens, cond_mask=mask)[:, 6:], full[:, 6:], atol=1e-5)
    # ...and without the mask they are seen.
    assert not np.allclose(_forward(model, v, junk, tokens)[:, 6:], full[:, 6:], atol=1e-3)


def test_caption_layers_see_the_whole_caption():
    """LlamaGen's embedder is per token; encoder blocks make an early caption token depend on later ones."""
    caption, _ = _captions(T2I_TINY, [6])
    later = caption.at[:, -1].add(1.0)
    for layers, changes in ((0, False), (2, True)):
        emb = gpt.CaptionEmbedder(T2I_TINY.caption_dim, T2I_TINY.dim, T2I_TINY.cls_token_num, 0.0,
                                  layers=layers, num_heads=T2I_TINY.n_head)
        v = emb.init(jax.random.key(0), caption, False)
        first = lambda c: np.asarray(emb.apply(v, c, False))[:, 0]
        assert np.allclose(first(caption), first(later)) != changes
    with pytest.raises(ValueError, match="caption_layers"):
        gpt.GPTConfig(caption_layers=1)  # class-conditional


def test_decode_needs_decode_model_and_cache():
    model = gpt.LlamaGenGPT(gpt.VARIANTS["tiny"])
    v = _random_variables(model)
    with pytest.raises(ValueError, match="decode=True"):
        model.apply(v, jnp.array([1]), method="prefill")
    with pytest.raises(ValueError, match="block_size"):
        gpt.init_cache(model.clone(decode=True), 1, 1 + 17)


# ---- t2i training ----

def _ce(logits, tokens, cls):
    pred = logits[:, cls - 1:]  # LlamaGen: inputs tokens[:, :-1], targets all of tokens
    return optax.softmax_cross_entropy_with_integer_labels(pred, tokens).mean()


def test_t2i_trains_and_uncond_embedding_is_a_constant():
    cfg = dataclasses.replace(T2I_TINY, token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1)
    model = gpt.LlamaGenGPT(cfg)
    v = nn.meta.unbox(model.init(jax.random.key(0), gpt.dummy_cond(cfg, 1), jnp.zeros((1, 1), jnp.int32)))
    assert set(v) == {"params", "constants"}
    null = v["constants"]["cls_embedding"]["uncond_embedding"]
    assert null.shape == (6, 12)
    assert abs(float(jnp.std(null)) * np.sqrt(12) - 1) < 0.35  # randn / √caption_dim
    assert gpt.count_params(cfg) == _formula(cfg)  # the constant is not a parameter
    caption, mask = _captions(cfg, [6, 4, 2, 5])
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, cfg.vocab_size)
    opt = optax.adam(3e-3)

    @jax.jit
    def update(params, opt_state, key):
        def loss_fn(p):
            logits = model.apply({"params": p, "constants": v["constants"]}, caption, tokens[:, :-1],
                                 cond_mask=mask, train=True, rngs={"dropout": key})
            return _ce(logits, tokens, cfg.cls_token_num)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = v["params"], opt.init(v["params"])
    losses = []
    for i in range(20):
        params, opt_state, loss = update(params, opt_state, jax.random.key(100 + i))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_caption_dropout_swaps_in_the_uncond_embedding():
    cfg = dataclasses.replace(T2I_TINY, class_dropout_prob=1.0)  # every row dropped; no other dropout
    model = gpt.LlamaGenGPT(cfg)
    v = _random_variables(model)
    caption, mask = _captions(cfg, [6, 2])
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size)
    dropped = _forward(model, v, caption, tokens, cond_mask=mask, train=True, key=jax.random.key(0))
    null = jnp.broadcast_to(v["constants"]["cls_embedding"]["uncond_embedding"], caption.shape)
    np.testing.assert_allclose(dropped, _forward(model, v, null, tokens, cond_mask=mask), atol=1e-5)
    assert not np.allclose(dropped, _forward(model, v, caption, tokens, cond_mask=mask), atol=1e-3)


def test_class_dropout_uses_the_null_row():
    cfg = dataclasses.replace(C2I_CFG_TINY, class_dropout_prob=1.0, token_dropout_p=0.0, resid_dropout_p=0.0,
                              ffn_dropout_p=0.0)
    model = gpt.LlamaGenGPT(cfg)
    v = _random_variables(model)
    assert v["params"]["cls_embedding"]["embedding_table"]["embedding"].shape == (11, 64)
    tokens = jnp.zeros((2, 3), jnp.int32)
    dropped = _forward(model, v, jnp.array([1, 2]), tokens, train=True, key=jax.random.key(0))
    np.testing.assert_allclose(dropped, _forward(model, v, jnp.array([10, 10]), tokens), atol=1e-6)


def test_bf16_compute_fp32_logits_and_remat_scan_grads(golden):
    model, variables, ref = golden
    cond, idx = jnp.asarray(ref["cond"]), jnp.asarray(ref["idx"])
    bf = gpt.LlamaGenGPT(dataclasses.replace(model.config, dtype="bfloat16"))
    out = _forward(bf, variables, cond, idx)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref["logits"], atol=0.1)

    def grads(cfg, params):
        m = gpt.LlamaGenGPT(cfg)
        targets = jnp.concatenate([idx, idx[:, :1]], 1)
        return jax.jit(jax.grad(lambda p: _ce(m.apply({"params": p}, cond, idx), targets, 1)))(params)

    plain = grads(model.config, variables["params"])
    stacked = stack_layers(variables["params"], 2)
    rematted = grads(dataclasses.replace(model.config, scan_layers=True, remat="full"), stacked)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), stack_layers(plain, 2), rematted)


def test_bf16_weights_decode_like_the_full_forward(golden):
    model, variables, ref = golden
    cond, idx = jnp.asarray(ref["cond"]), jnp.asarray(ref["idx"])
    bf = gpt.LlamaGenGPT(dataclasses.replace(model.config, dtype="bfloat16"))
    v16 = cast_weights(variables, "bfloat16")
    floats = [x for x in jax.tree.leaves(v16) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.bfloat16 for x in floats)
    assert cast_weights(variables, "float32") is variables
    full = _forward(bf, v16, cond, idx)
    assert full.dtype == jnp.float32
    np.testing.assert_allclose(_decode_logits(bf, v16, cond, idx), full, atol=0.05)
    np.testing.assert_allclose(full, ref["logits"], atol=0.15)
    tokens = sample_images(bf, v16, cond, num_tokens=8, strategy=Greedy())
    assert tokens.shape == (2, 8) and int(tokens.max()) < model.config.vocab_size
    # 16-bit compute or weights take the samplers' bf16 CPU compile (sample.decode.sampler_jit)
    assert decode._computes_in_16_bits(bf, variables) and decode._computes_in_16_bits(model, v16)
    assert not decode._computes_in_16_bits(model, variables)


# ---- sizes ----

@pytest.mark.parametrize("name", sorted(REFERENCE_C2I))
def test_c2i_parameter_counts(name):
    cfg = gpt.variant(name, scan_layers=True)
    assert gpt.count_params(cfg) == REFERENCE_C2I[name] == _formula(cfg)


@pytest.mark.parametrize("name", sorted(REFERENCE_T2I))
def test_t2i_parameter_counts(name):
    cfg = gpt.variant(name, caption_dim=2048, cls_token_num=120, scan_layers=True)
    assert gpt.count_params(cfg) == REFERENCE_T2I[name] == _formula(cfg)


def test_ffn_dim_follows_the_reference():
    assert gpt.variant("GPT-B").ffn_dim == 2048
    assert gpt.variant("GPT-XL").ffn_dim == 3584
    assert gpt.variant("GPT-XXXL").ffn_dim == 6912
    assert gpt.variant("GPT-B", ffn_dim_multiplier=1.3).ffn_dim == gpt.find_multiple(int(1.3 * 2048), 256)
    assert gpt.VARIANTS["tiny"].ffn_dim == 192  # the golden's w1: [192, 64]


# ---- sampler ----

def _argmax_chain_ok(model, v, cond, tokens, cond_mask=None, guidance=None, uncond=None):
    """Each sampled token is the (guided) argmax of the full forward over the tokens before it."""
    cls = model.config.cls_token_num
    logits = _forward(model, v, cond, tokens[:, :-1], cond_mask=cond_mask)[:, cls - 1:]
    if guidance is not None:
        u = _forward(model, v, uncond, tokens[:, :-1], cond_mask=cond_mask)[:, cls - 1:]
        guided = u + guidance.scale * (logits - u)
        n = jnp.arange(tokens.shape[1])[None, :, None]
        logits = guided if guidance.interval < 0 else jnp.where(n - 1 > guidance.interval, logits, guided)
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))


def test_greedy_sampler_is_the_teacher_forced_argmax_chain(golden):
    model, variables, ref = golden
    cond = jnp.asarray(ref["cond"])
    tokens = sample_images(model, variables, cond, num_tokens=16, strategy=Greedy())
    assert tokens.shape == (2, 16) and tokens.dtype == jnp.int32
    assert len(np.unique(np.asarray(tokens))) > 2  # not a degenerate constant chain
    _argmax_chain_ok(model, variables, cond, tokens)
    # Guidance needs the null row this checkpoint does not have.
    with pytest.raises(ValueError, match="null-class"):
        sample_images(model, variables, cond, num_tokens=4, guidance=Guidance(2.0))


@pytest.mark.parametrize("interval", [-1, 3])
def test_cfg_greedy_sampler_is_the_guided_argmax_chain(interval):
    model = gpt.LlamaGenGPT(C2I_CFG_TINY)
    v = _random_variables(model, seed=4)
    cond = jnp.array([3, 7, 0])
    g = Guidance(scale=3.0, interval=interval)
    tokens = sample_images(model, v, cond, num_tokens=12, strategy=Greedy(), guidance=g)
    _argmax_chain_ok(model, v, cond, tokens, guidance=g, uncond=jnp.full_like(cond, 10))
    assert not np.array_equal(tokens, sample_images(model, v, cond, num_tokens=12))


def test_t2i_sampler_with_padded_captions_and_cfg():
    model = gpt.LlamaGenGPT(T2I_TINY)
    v = _random_variables(model, seed=5)
    caption, mask = _captions(T2I_TINY, [6, 2])
    tokens = sample_images(model, v, caption, cond_mask=mask, num_tokens=16)
    _argmax_chain_ok(model, v, caption, tokens, cond_mask=mask)
    g = Guidance(scale=4.0)
    tokens = sample_images(model, v, caption, cond_mask=mask, num_tokens=8, guidance=g)
    null = jnp.broadcast_to(v["constants"]["cls_embedding"]["uncond_embedding"], caption.shape)
    _argmax_chain_ok(model, v, caption, tokens, cond_mask=mask, guidance=g, uncond=null)


@pytest.mark.parametrize("windows", [2, 5])
def test_cache_windows_give_the_same_tokens(windows):
    """Attending over growing cache prefixes draws the tokens of the one full-cache loop (t2i with
    padded captions, CFG, seeded top-k draws)."""
    model = gpt.LlamaGenGPT(T2I_TINY)
    v = _random_variables(model, seed=5)
    caption, mask = _captions(T2I_TINY, [6, 2])
    kw = dict(cond_mask=mask, num_tokens=16, guidance=Guidance(scale=3.0), strategy=Categorical(top_k=5),
              key=jax.random.key(2))
    np.testing.assert_array_equal(sample_images(model, v, caption, **kw),
                                  sample_images(model, v, caption, cache_windows=windows, **kw))


def test_categorical_sampler_is_seeded_per_row():
    model = gpt.LlamaGenGPT(C2I_CFG_TINY)
    v = _random_variables(model, seed=6)
    s = Categorical(temperature=1.0, top_k=8, top_p=0.9)
    a = sample_images(model, v, jnp.array([1, 2]), num_tokens=16, strategy=s, key=jax.random.key(0))
    b = sample_images(model, v, jnp.array([1, 2]), num_tokens=16, strategy=s, key=jax.random.key(0))
    c = sample_images(model, v, jnp.array([1, 2]), num_tokens=16, strategy=s, key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert ((np.asarray(a) >= 0) & (np.asarray(a) < 64)).all()
    with pytest.raises(ValueError, match="num_tokens"):
        sample_images(model, v, jnp.array([1]), num_tokens=17)


# ---- checkpoints ----

def test_pt_round_trip_under_model_key(tmp_path, golden_dir, golden):
    torch = pytest.importorskip("torch")
    sd = load_file(golden_dir / f"{GOLDEN}.safetensors")
    blob = {"model": {k: torch.from_numpy(v.copy()) for k, v in sd.items()}, "steps": 7, "optimizer": {}}
    blob["model"]["freqs_cis"] = torch.zeros(17, 8, 2)  # weightless buffer: dropped
    torch.save(blob, tmp_path / "c2i_tiny.pt")
    cfg = json.loads((golden_dir / f"{GOLDEN}.json").read_text())
    (tmp_path / "c2i_tiny.json").write_text(json.dumps(cfg))  # found beside the weights
    model, variables = convert.load("llamagen_gpt", tmp_path / "c2i_tiny.pt")
    _, ref_vars, ref = golden
    jax.tree.map(np.testing.assert_array_equal, variables, ref_vars)
    np.testing.assert_allclose(model.apply(variables, ref["cond"], ref["idx"]), ref["logits"], atol=1e-4)


def _to_reference_state_dict(cfg, variables):
    """Our variables → LlamaGen's key names and layouts (the converter's inverse)."""
    p = variables["params"]
    sd = {"tok_embeddings.weight": p["tok_embeddings"]["embedding"], "norm.weight": p["norm"]["scale"],
          "output.weight": p["output"].T}
    if cfg.caption_dim:
        for f in ("fc1", "fc2"):
            sd[f"cls_embedding.cap_proj.{f}.weight"] = p["cls_embedding"][f]["kernel"].T
        sd["cls_embedding.uncond_embedding"] = variables["constants"]["cls_embedding"]["uncond_embedding"]
    else:
        sd["cls_embedding.embedding_table.weight"] = p["cls_embedding"]["embedding_table"]["embedding"]
    for i in range(cfg.n_layer):
        lp, pre = p[f"layers_{i}"], f"layers.{i}."
        a = lp["attn"]
        sd[pre + "attention.wqkv.weight"] = np.concatenate(
            [a[n]["kernel"].reshape(cfg.dim, -1).T for n in ("query", "key", "value")], axis=0)
        sd[pre + "attention.wo.weight"] = a["out"]["kernel"].reshape(-1, cfg.dim).T
        for w, n in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            sd[pre + f"feed_forward.{w}.weight"] = lp["mlp"][n]["kernel"].T
        sd[pre + "attention_norm.weight"] = lp["input_norm"]["scale"]
        sd[pre + "ffn_norm.weight"] = lp["post_attention_norm"]["scale"]
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in sd.items()}


def test_t2i_safetensors_round_trip_with_uncond_embedding(tmp_path):
    model = gpt.LlamaGenGPT(T2I_TINY)
    v = _random_variables(model, seed=7)
    v["constants"]["cls_embedding"]["uncond_embedding"] = jnp.full((6, 12), 0.25)  # a checkpoint's own
    save_file(_to_reference_state_dict(T2I_TINY, v), str(tmp_path / "t2i.safetensors"))
    ref_args = {"model_type": "t2i", "caption_dim": 12, "vocab_size": 32, "dim": 32, "n_layer": 2, "n_head": 4,
                "n_kv_head": 2, "multiple_of": 16, "block_size": 16, "cls_token_num": 6, "drop_path_rate": 0.0}
    loaded, lv = convert.load("llamagen_gpt", tmp_path / "t2i.safetensors", config=ref_args)
    assert loaded.config.caption_dim == 12 and loaded.config.model_type == "t2i"
    np.testing.assert_array_equal(lv["constants"]["cls_embedding"]["uncond_embedding"], 0.25)
    caption, mask = _captions(T2I_TINY, [6, 1])
    tokens = jnp.zeros((2, 4), jnp.int32)
    np.testing.assert_allclose(_forward(loaded, lv, caption, tokens, cond_mask=mask),
                               _forward(model, v, caption, tokens, cond_mask=mask), atol=1e-5)


def test_variant_name_config_and_missing_key_error(tmp_path, golden_dir):
    sd = load_file(golden_dir / f"{GOLDEN}.safetensors")
    del sd["layers.1.ffn_norm.weight"]
    sd["layers.0.attention.bogus.weight"] = np.zeros((2, 2), np.float32)
    save_file(sd, str(tmp_path / "broken.safetensors"))
    cfg = json.loads((golden_dir / f"{GOLDEN}.json").read_text())
    with pytest.raises(CheckpointMismatchError) as e:
        convert.load("llamagen_gpt", tmp_path / "broken.safetensors", config=cfg)
    msg = str(e.value)
    assert "layers_1/post_attention_norm/scale" in msg and "layers.0.attention.bogus.weight" in msg
    # A variant name whose shapes differ: one error listing the mismatches.
    with pytest.raises(CheckpointMismatchError, match="shape mismatch|rows"):
        convert.load("llamagen_gpt", golden_dir / f"{GOLDEN}.safetensors", config="GPT-B")
    # The tiny variant by name (its class_dropout_prob 0 is the golden's).
    model, _ = convert.load("llamagen_gpt", golden_dir / f"{GOLDEN}.safetensors", config="tiny")
    assert model.config == gpt.VARIANTS["tiny"]
    with pytest.raises(ValueError, match="unknown LlamaGen GPT config keys"):
        convert.load("llamagen_gpt", golden_dir / f"{GOLDEN}.safetensors", config={**cfg, "n_layers": 2})
