"""RQ-Transformer (kakaobrain) port: golden parity of both paths, cached decoding, sampling, import errors, training."""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunified import convert
from jaxunified.convert.common import read_state_dict
from jaxunified.convert.rq_transformer import config_from_reference, convert_state_dict, load_rqvae_decoder
from jaxunified.models import depth_head as dh
from jaxunified.sample import rq as rq_sample
from jaxunified.sample.strategies import Categorical, Guidance

NAMES = ("rq_transformer_tiny", "rq_transformer_tiny_perdepth")


@pytest.fixture(scope="module", params=NAMES)
def golden(request, golden_dir):
    name = request.param
    kw = {"rqvae_path": golden_dir / "rq_transformer_tiny_rqvae.safetensors"} if name == "rq_transformer_tiny" else {}
    model, variables = convert.load("rq_transformer", golden_dir / f"{name}.safetensors", **kw)
    arrays = dict(np.load(golden_dir / f"{name}.npz"))
    meta = json.loads((golden_dir / f"{name}.json").read_text())
    return name, model, variables, arrays, meta


def test_config_from_golden_arch_is_the_tiny_variant(golden):
    name, model, _, _, meta = golden
    variant = "tiny" if name == "rq_transformer_tiny" else "tiny-perdepth"
    assert config_from_reference(meta["arch"]) == dh.VARIANTS[variant] == model.config


def test_logits_loss_and_code_embeddings_match_golden(golden):
    name, model, variables, g, _ = golden
    logits = model.apply(variables, g["codes"], g["cond"])
    chex.assert_shape(logits, g["logits"].shape)
    np.testing.assert_allclose(np.asarray(logits), g["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(float(dh.loss_fn(logits, jnp.asarray(g["codes"]))), float(g["loss"]), atol=1e-5)
    if "aux_code_emb" in g:
        b = g["codes"].shape[0]
        emb = model.apply(variables, g["codes"].reshape(b, -1, model.config.depth), method="code_embeddings")
        np.testing.assert_array_equal(np.asarray(emb), g["aux_code_emb"])


def test_greedy_cached_sampling_reproduces_golden_codes(golden):
    _, model, variables, g, _ = golden
    codes, logits = rq_sample.sample_codes(model, variables, g["cond"], return_logits=True)
    np.testing.assert_array_equal(np.asarray(codes), g["sampled_codes"])
    np.testing.assert_allclose(np.asarray(logits), g["sampled_logits"], atol=1e-4, rtol=0)


def test_kv_cache_decode_reproduces_teacher_forcing(golden):
    _, model, variables, g, _ = golden
    cached = rq_sample.cached_logits(model, variables, g["codes"], g["cond"])
    full = model.apply(variables, g["codes"], g["cond"])
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-5, rtol=0)


def test_rqvae_decoder_matches_golden_image(golden_dir):
    meta = json.loads((golden_dir / "rq_transformer_tiny.json").read_text())
    decoder, dvars = load_rqvae_decoder(golden_dir / "rq_transformer_tiny_rqvae.safetensors", meta["rqvae_arch"])
    g = np.load(golden_dir / "rq_transformer_tiny.npz")
    images = rq_sample.decode_images(decoder, dvars, g["sampled_codes"])
    np.testing.assert_allclose(np.asarray(images).transpose(0, 3, 1, 2), g["sampled_image"], atol=1e-4, rtol=0)


def _tiny_model(seed=0, name="tiny", **over):
    cfg = dh.variant(name, **over)
    model = dh.RQTransformer(cfg)
    variables = model.init(jax.random.key(seed), *dh.dummy_inputs(cfg, 2))
    return model, nn.meta.unbox(variables)


def test_per_depth_top_k_and_vocab_mask():
    # Unequal per-depth vocabularies on the per-depth path; each depth gets its own top-k.
    vocabs = (32, 16, 8, 8)
    model, variables = _tiny_model(1, "tiny-perdepth", vocab_size=vocabs)
    cond = jnp.array([1, 7])
    ks = (1, 2, 3, 0)
    strategies = tuple(Categorical(temperature=2.0, top_k=k) for k in ks)
    keys = jax.random.split(jax.random.key(3), 2)
    codes, logits = rq_sample.sample_codes(model, variables, cond, strategy=strategies, keys=keys,
                                           return_logits=True)
    codes, logits = np.asarray(codes), np.asarray(logits)
    for d, (k, v) in enumerate(zip(ks, vocabs)):
        assert (codes[..., d] < v).all()
        assert (logits[..., d, v:] == dh.MASK_VALUE).all()
        if k:
            kth = np.sort(logits[..., d, :], axis=-1)[..., -k]
            chosen = np.take_along_axis(logits[..., d, :], codes[..., d, None], axis=-1)[..., 0]
            assert (chosen >= kth).all(), f"depth {d} drew outside its top-{k}"
    np.testing.assert_array_equal(codes[..., 0], logits[..., 0, :].argmax(-1))
    # Per-row keys: a row's draw does not depend on the other rows of its batch.
    one = rq_sample.sample_codes(model, variables, cond[1:], strategy=strategies, keys=keys[1:])
    np.testing.assert_array_equal(np.asarray(one)[0], codes[1])


def test_guidance_scale_one_is_no_guidance_and_scale_two_guides_every_depth():
    model, variables = _tiny_model(2, null_cond=True)
    cond = jnp.array([3, 5])
    plain = rq_sample.sample_codes(model, variables, cond, return_logits=True)
    same = rq_sample.sample_codes(model, variables, cond, guidance=Guidance(1.0), return_logits=True)
    np.testing.assert_array_equal(np.asarray(same[0]), np.asarray(plain[0]))
    np.testing.assert_allclose(np.asarray(same[1]), np.asarray(plain[1]), atol=1e-5, rtol=0)
    codes, guided = rq_sample.sample_codes(model, variables, cond, guidance=Guidance(2.0), return_logits=True)
    null = jnp.full_like(cond, model.config.null_class)
    c = model.apply(variables, codes, cond)
    u = model.apply(variables, codes, null)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(u + 2.0 * (c - u)), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(guided).argmax(-1))
    # A released-style model has no null row: guiding it needs an explicit null class.
    bare, bare_vars = _tiny_model(2)
    with pytest.raises(ValueError, match="null_cond="):
        rq_sample.sample_codes(bare, bare_vars, cond, guidance=Guidance(2.0))


def test_text_condition_prefill_and_cond_logits():
    # CC3M-style: several condition tokens, their own classifier, a prefill before position 0.
    model, variables = _tiny_model(4, vocab_size_cond=20, block_size_cond=3)
    codes = jax.random.randint(jax.random.key(5), (2, 4, 4, 4), 0, 32)
    cond = jax.random.randint(jax.random.key(6), (2, 3), 0, 20)
    logits, cond_logits = model.apply(variables, codes, cond)
    chex.assert_shape(cond_logits, (2, 2, 20))
    cached = rq_sample.cached_logits(model, variables, codes, cond)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(logits), atol=1e-5, rtol=0)


def test_missing_key_and_bad_offsets_raise_one_clear_error(golden_dir):
    sd = read_state_dict(golden_dir / "rq_transformer_tiny_perdepth.safetensors")
    cfg = dh.VARIANTS["tiny-perdepth"]
    broken = {k: v for k, v in sd.items() if k != "head_transformer.blocks.1.attn.proj.weight"}
    broken["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(convert.CheckpointMismatchError) as err:
        convert_state_dict(broken, cfg)
    assert "params/depth_head/head_transformer/blocks_1/attn/out/kernel" in str(err.value)
    assert "extra.weight" in str(err.value)
    with pytest.raises(convert.CheckpointMismatchError, match="offsets"):
        convert_state_dict({**sd, "tok_emb.offsets": np.array([0, 1, 2, 3])}, cfg)
    with pytest.raises(ValueError, match="rqvae_path"):
        convert.load("rq_transformer", golden_dir / "rq_transformer_tiny.safetensors")


def test_pt_checkpoint_loads_like_safetensors(golden_dir, tmp_path):
    torch = pytest.importorskip("torch")
    sd = read_state_dict(golden_dir / "rq_transformer_tiny_perdepth.safetensors")
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {f"module.{k}": torch.from_numpy(np.array(v)) for k, v in sd.items()}}, path)
    config = json.loads((golden_dir / "rq_transformer_tiny_perdepth.json").read_text())
    model, variables = convert.load("rq_transformer", path, config=config)
    g = np.load(golden_dir / "rq_transformer_tiny_perdepth.npz")
    np.testing.assert_allclose(np.asarray(model.apply(variables, g["codes"], g["cond"])), g["logits"], atol=1e-4)


def test_released_variants_parameter_counts():
    counts = {name: dh.count_params(cfg) for name, cfg in dh.VARIANTS.items() if not name.startswith("tiny")}
    expected = {"ImageNet-480M": 480e6, "ImageNet-800M": 821e6, "ImageNet-1.4B": 1.39e9, "ImageNet-3.8B": 3.82e9,
                "CC3M-650M": 654e6, "FFHQ-350M": 355e6}
    for name, n in expected.items():
        assert abs(counts[name] - n) / n < 0.005, (name, counts[name])


def test_tiny_model_trains():
    model, variables = _tiny_model(7, null_cond=True, cond_dropout=0.1)
    codes = jax.random.randint(jax.random.key(8), (4, 4, 4, 4), 0, 32)
    cond = jnp.array([0, 1, 2, 3])
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    opt = optax.adam(3e-3)
    state = opt.init(params)

    def loss(p, key):
        logits = model.apply({"params": p, **rest}, codes, cond, train=True, rngs={"dropout": key})
        return dh.loss_fn(logits, codes)

    @jax.jit
    def step(p, s, key):
        value, grads = jax.value_and_grad(loss)(p, key)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    losses = []
    for i in range(20):
        params, state, value = step(params, state, jax.random.key(i))
        losses.append(float(value))
    assert losses[-1] < 0.7 * losses[0], losses
    # The codebook constant is not a parameter: training leaves it alone.
    assert "rqvae_codebook" not in params and "rqvae_codebook" in rest["constants"]
