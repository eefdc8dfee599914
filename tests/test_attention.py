"""nn/attention, nn/rope, nn/norm, nn/dense, nn/decoder: GQA, RoPE, KV cache, RMSNorm, DecoderBlock."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxunified.convert.common import attn_out_kernel, qkv_bias, qkv_kernel
from jaxunified.nn.attention import MultiHeadAttention, attend, causal_mask, padding_mask
from jaxunified.nn.decoder import DecoderBlock
from jaxunified.nn.dense import dense
from jaxunified.nn.norm import RMSNorm, l2_normalize
from jaxunified.nn.rope import apply_rope, rope_1d, rope_2d, rope_2d_angles

KEY = jax.random.PRNGKey(0)


def _rand(*shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32)


def _shapes(variables):
    return {"/".join(k): v.shape for k, v in flatten_dict(nn.meta.unbox(variables)).items()}


# ------------------------------------------------------------------ attention, GQA, masks


def test_gqa_equals_mha_with_repeated_kv_heads():
    q, k, v = _rand(2, 5, 6, 8), _rand(2, 7, 2, 8, seed=1), _rand(2, 7, 2, 8, seed=2)
    mask = padding_mask(jnp.arange(7)[None].repeat(2, 0) < jnp.array([[7], [4]]))
    ref = attend(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), mask)
    np.testing.assert_allclose(attend(q, k, v, mask), ref, atol=1e-6)
    # A per-head mask ([B, H, Lq, Lk]) groups the same way as the heads.
    hmask = jax.random.bernoulli(KEY, 0.7, (2, 6, 5, 7)).at[..., 0].set(True)
    ref = attend(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), hmask)
    np.testing.assert_allclose(attend(q, k, v, hmask), ref, atol=1e-6)

    # Module level: GQA params with repeated kv kernels in a plain MHA give the same outputs.
    x = _rand(2, 5, 48)
    gqa = MultiHeadAttention(6, num_kv_heads=2)
    params = gqa.init(KEY, x)["params"]
    assert _shapes(params)["key/kernel"] == (48, 2, 8)
    full = dict(nn.meta.unbox(params))
    for name in ("key", "value"):
        full[name] = jax.tree.map(lambda a: jnp.repeat(a, 3, axis=-2), full[name])
    mask = causal_mask(5)
    np.testing.assert_allclose(gqa.apply({"params": params}, x, mask=mask),
                               MultiHeadAttention(6).apply({"params": full}, x, mask=mask), atol=1e-5)


def test_default_mha_parameter_tree_is_plain():
    """No new option on: the q/k/v/out tree of before GQA/RoPE/cache (golden converters rely on it)."""
    shapes = _shapes(MultiHeadAttention(4).init(KEY, _rand(1, 3, 32))["params"])
    assert shapes == {"query/kernel": (32, 4, 8), "query/bias": (4, 8), "key/kernel": (32, 4, 8), "key/bias": (4, 8),
                      "value/kernel": (32, 4, 8), "value/bias": (4, 8), "out/kernel": (4, 8, 32), "out/bias": (32,)}
    shapes = _shapes(MultiHeadAttention(4, qkv_bias=False, out_bias=False).init(KEY, _rand(1, 3, 32))["params"])
    assert not any(p.endswith("bias") for p in shapes)


def test_padding_mask_hides_keys():
    x = _rand(2, 6, 32)
    valid = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    assert padding_mask(valid).shape == (2, 1, 1, 6)
    mha = MultiHeadAttention(4)
    params = mha.init(KEY, x)
    out = mha.apply(params, x, mask=padding_mask(valid))
    # Changing padded tokens changes nothing; the result is attention over the valid prefix.
    x2 = x.at[0, 4:].set(100.0)
    np.testing.assert_allclose(mha.apply(params, x2, mask=padding_mask(valid))[:, :4], out[:, :4], atol=1e-6)
    short = mha.apply(params, x[:1, :4])
    np.testing.assert_allclose(out[0, :4], short[0], atol=1e-5)


def test_dense_factory_axes():
    layer = dense((2, 4), ("embed", "heads", "kv"), name="p")
    boxed = layer.init(KEY, _rand(1, 8))["params"]
    assert boxed["kernel"].names == ("embed", "heads", "kv") and boxed["bias"].names == ("heads", "kv")
    assert isinstance(dense(3, ("embed", "mlp")), nn.Dense)
    with pytest.raises(ValueError, match="kernel axis names"):
        dense(3, ("embed",))


# ------------------------------------------------------------------ RoPE


def _np_rope_half(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.asarray(pos, np.float64)[:, None] * inv  # [T, D/2]
    emb = np.concatenate([ang, ang], -1)[None, :, None, :]
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * np.cos(emb) + rot * np.sin(emb)


def test_rope_1d_matches_numpy_and_preserves_norms():
    x = np.asarray(_rand(2, 5, 3, 16))
    pos = np.array([0, 1, 2, 7, 300])
    out = apply_rope(jnp.asarray(x), *rope_1d(pos, 16, 1e6))
    np.testing.assert_allclose(out, _np_rope_half(x, pos, 1e6), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    # Interleaved pairing = multiplying the complex numbers x[2i] + i·x[2i+1] by e^{i·angle}.
    xc = x[..., 0::2] + 1j * x[..., 1::2]
    z = xc * np.exp(1j * pos[:, None] * 1e4 ** (-np.arange(0, 16, 2) / 16))[None, :, None]
    ref = np.stack([z.real, z.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), *rope_1d(pos, 16), interleaved=True), ref, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_scores_depend_only_on_offset(interleaved):
    q, k = _rand(1, 1, 1, 8), _rand(1, 1, 1, 8, seed=1)

    def score(i, j):
        qi = apply_rope(q, *rope_1d(jnp.array([i]), 8), interleaved=interleaved)
        kj = apply_rope(k, *rope_1d(jnp.array([j]), 8), interleaved=interleaved)
        return float(jnp.sum(qi * kj))

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
    assert score(0, 0) == pytest.approx(score(17, 17), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_rope_2d_grid_and_condition_rows():
    h, w, d, cond = 3, 4, 16, 2
    cos, sin = rope_2d(h, w, d, num_cond=cond)
    assert cos.shape == sin.shape == (cond + h * w, d // 2)
    np.testing.assert_array_equal(cos[:cond], 0.0)
    np.testing.assert_array_equal(sin[:cond], 0.0)
    # LlamaGen: freqs over half the dims; [row freqs | col freqs] per grid cell, raster order.
    inv = 1.0 / 1e4 ** (np.arange(0, d // 2, 2)[: d // 4] / (d // 2))
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ang = np.concatenate([r.reshape(-1, 1) * inv, c.reshape(-1, 1) * inv], -1)
    np.testing.assert_allclose(cos[cond:], np.cos(ang), atol=1e-6)
    np.testing.assert_allclose(sin[cond:], np.sin(ang), atol=1e-6)
    # Arbitrary position ids give the same table; zero rows zero the condition tokens' q/k.
    np.testing.assert_allclose(rope_2d_angles(jnp.asarray(r.reshape(-1)), jnp.asarray(c.reshape(-1)), d), ang,
                               atol=1e-6)
    x = _rand(1, cond + h * w, 2, d)
    y = apply_rope(x, cos, sin, interleaved=True)
    np.testing.assert_array_equal(y[:, :cond], 0.0)


# ------------------------------------------------------------------ KV cache


def _decode_matches_full(module, x, prefill):
    """Prefill ``prefill`` tokens, then one-token steps; compare with the full causal forward."""
    dec = module.clone(decode=True)
    v = dec.init(KEY, x)  # sizes the cache: max_len = x's length
    params, cache = {"params": v["params"]}, v["cache"]
    mask = {"mask": causal_mask(x.shape[1])} if isinstance(module, MultiHeadAttention) else {}
    full = module.clone(decode=False).apply(params, x, **mask)

    step = jax.jit(lambda c, xt: dec.apply({**params, "cache": c}, xt, mutable=["cache"]))
    out, upd = step(cache, x[:, :prefill])
    outs = [out]
    for t in range(prefill, x.shape[1]):
        out, upd = step(upd["cache"], x[:, t: t + 1])
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
    return upd["cache"]


def test_kv_cache_prefill_then_steps_equals_full_recompute():
    x = _rand(2, 7, 48)
    mha = MultiHeadAttention(6, num_kv_heads=2, rope_theta=1e4)
    cache = _decode_matches_full(mha, x, prefill=3)
    shapes = _shapes(cache)
    assert shapes["cached_key"] == shapes["cached_value"] == (2, 2, 7, 8)  # [B, kv heads (not repeated), slots, D]
    assert int(cache["cache_index"]) == 7


def test_kv_cache_errors():
    x = _rand(1, 4, 32)
    dec = MultiHeadAttention(4, decode=True)
    v = dec.init(KEY, x)
    with pytest.raises(ValueError, match="'cache' collection"):
        dec.apply({"params": v["params"]}, x)
    with pytest.raises(ValueError, match="mutable"):
        dec.apply(v, x)
    _, upd = dec.apply(v, x[:, :3], mutable=["cache"])
    with pytest.raises(ValueError, match="overflow"):
        dec.apply({**v, **upd}, x[:, :2], mutable=["cache"])
    with pytest.raises(ValueError, match="self-attention"):
        dec.init(KEY, x, x)


# ------------------------------------------------------------------ norms, decoder block


def test_rms_norm_matches_numpy():
    x = np.asarray(_rand(2, 3, 16)) * 3
    norm = RMSNorm(1e-6)
    boxed = norm.init(KEY, x)["params"]
    assert boxed["scale"].names == ("norm",)
    scale = np.linspace(0.5, 2, 16).astype(np.float32)
    out = norm.apply({"params": {"scale": scale}}, jnp.asarray(x))
    ref = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    assert norm.apply({"params": {"scale": scale}}, jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_l2_normalize_float32():
    x = jnp.array([[3.0, 4.0], [0.0, 0.0]], jnp.bfloat16)
    out = l2_normalize(x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], atol=1e-6)


def test_decoder_block_cache_equals_recompute():
    x = _rand(2, 6, 32)
    blk = DecoderBlock(4, 64, num_kv_heads=2, rope_theta=1e4)
    _decode_matches_full(blk, x, prefill=2)


def test_decoder_block_matches_hf_qwen2(golden_dir):
    """The golden tiny Qwen2's layers 0 and 1 (GQA 4/2, rope_theta 1e6, biased q/k/v)."""
    from safetensors.numpy import load_file

    sd = load_file(golden_dir / "hf_qwen2_tiny.safetensors")
    ref = np.load(golden_dir / "hf_qwen2_tiny.npz")

    def layer(i):
        g = lambda k: sd[f"model.layers.{i}.{k}"]  # noqa: E731
        attn = {n: {"kernel": qkv_kernel(g(f"self_attn.{p}_proj.weight"), h),
                    "bias": qkv_bias(g(f"self_attn.{p}_proj.bias"), h)}
                for n, p, h in (("query", "q", 4), ("key", "k", 2), ("value", "v", 2))}
        attn["out"] = {"kernel": attn_out_kernel(g("self_attn.o_proj.weight"), 4)}
        return {
            "input_norm": {"scale": g("input_layernorm.weight")},
            "post_attention_norm": {"scale": g("post_attention_layernorm.weight")},
            "attn": attn,
            "mlp": {n: {"kernel": g(f"mlp.{n}_proj.weight").T} for n in ("gate", "up", "down")},
        }

    blk = DecoderBlock(4, 128, num_kv_heads=2, rope_theta=1e6)
    x = jnp.asarray(ref["hidden_0"])
    assert _shapes(blk.init(KEY, x)["params"]) == _shapes(layer(0))
    for i in range(2):
        x = blk.apply({"params": layer(i)}, x)
        np.testing.assert_allclose(x, ref[f"hidden_{i + 1}"], atol=1e-5)
